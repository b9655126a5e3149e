"""OryxConfig: the hyper-parameters every backend reads, validated, with JSON round trip and presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MIXERS = ("gdn", "mamba2")
CONV_ACTIVATIONS = ("silu", "none")
O_NORM_GROUPINGS = ("head", "all")
# Which input projections the two modes share (oryx_core.spec): "kv" keys and values (the design's block),
# "none" only the output path (each mode has its own query, keys and values), "qkv" the query too, "kv-proj"
# the key and value projections but not their convolutions (the recurrence has its own).
SHARINGS = ("kv", "none", "qkv", "kv-proj")
# Upper bounds far above any real model, so that a config can never ask for more than memory can hold
# before its tensors are checked (n_layers 10**8 would otherwise build 10**9 tensor specs).
INT_LIMITS = {"vocab_size": 1 << 24, "d_model": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
              "head_dim": 1 << 12, "value_head_dim": 1 << 12, "mlp_hidden": 1 << 18, "conv_width": 64,
              "max_context": 1 << 24}
BOOL_FIELDS = ("rope", "tie_embeddings", "conv_bias", "gate_before_norm", "output_norm", "output_gate")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """A config that cannot describe a valid Oryx model."""


@dataclass(frozen=True)
class OryxConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_head_dim: int | None = None  # None: same as head_dim
    mlp_hidden: int = 0  # 0: no MLP sub-block (as in pure Mamba-2 stacks)
    norm_eps: float = 1e-5
    rope: bool = True
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    mixer: str = "gdn"
    conv_width: int = 4
    max_context: int = 2048
    # Flags that let imports be exact; the defaults are the design's block.
    conv_bias: bool = False
    conv_activation: str | None = None  # None: "silu" for gdn, "none" for mamba2
    gate_before_norm: bool = False  # False: RMSNorm(o)*w*SiLU(g); True: RMSNorm(o*SiLU(g))*w
    o_norm_grouping: str = "head"  # RMSNorm statistics per head, or over all heads at once
    output_norm: bool = True  # False only for imports without one (Llama): no o_norm
    output_gate: bool = True  # False only for imports without one (Llama): no g_proj, no SiLU gate
    # GDN readout o = scale * S^T q_hat; None: head_dim^-1/2. A model without an output norm (a retrofitted
    # Llama) needs 1.0: with unit-norm queries and keys the readout is then at most a stored value's size,
    # as an attention readout is, where head_dim^-1/2 would cap it at an eighth of that (head_dim 64).
    recurrent_scale: float | None = None
    sharing: str = "kv"
    extra: dict = field(default_factory=dict, compare=False)

    # ----- derived quantities -----
    @property
    def v_head_dim(self) -> int:
        return self.value_head_dim or self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads that read one key/value head (and its recurrent state)."""
        return self.n_heads // self.n_kv_heads

    @property
    def recurrent_kv_convs(self) -> bool:
        """Whether the recurrence reads keys and values through convolutions of its own (conv_k_rec, conv_v_rec)."""
        return self.sharing in ("none", "kv-proj")

    @property
    def gdn_scale(self) -> float:
        return self.head_dim ** -0.5 if self.recurrent_scale is None else float(self.recurrent_scale)

    @property
    def conv_act(self) -> str:
        if self.conv_activation is not None:
            return self.conv_activation
        return "silu" if self.mixer == "gdn" else "none"

    # ----- validation -----
    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "conv_width", "max_context"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= INT_LIMITS[name]:
                problems.append(f"{name} must be a positive integer (at most {INT_LIMITS[name]}), got {value!r:.40}")
        if self.value_head_dim is not None and (not _is_int(self.value_head_dim)
                                                or not 1 <= self.value_head_dim <= INT_LIMITS["value_head_dim"]):
            problems.append(f"value_head_dim must be a positive integer (at most {INT_LIMITS['value_head_dim']}) or null, "
                            f"got {self.value_head_dim!r:.40}")
        if not _is_int(self.mlp_hidden) or not 0 <= self.mlp_hidden <= INT_LIMITS["mlp_hidden"]:
            problems.append(f"mlp_hidden must be an integer >= 0 (at most {INT_LIMITS['mlp_hidden']}), got {self.mlp_hidden!r:.40}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r:.40}")
        if not isinstance(self.extra, dict):
            problems.append(f"extra must be an object, got {type(self.extra).__name__}")
        if self.mixer not in MIXERS:
            problems.append(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.conv_activation not in (None, *CONV_ACTIVATIONS):
            problems.append(f"conv_activation must be one of {CONV_ACTIVATIONS} or null, got {self.conv_activation!r}")
        if self.sharing not in SHARINGS:
            problems.append(f"sharing must be one of {SHARINGS}, got {self.sharing!r:.40}")
        if self.o_norm_grouping not in O_NORM_GROUPINGS:
            problems.append(f"o_norm_grouping must be one of {O_NORM_GROUPINGS}, got {self.o_norm_grouping!r}")
        if not (_is_real(self.norm_eps) and 0 < self.norm_eps < 1):
            problems.append(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if self.recurrent_scale is not None and not (_is_real(self.recurrent_scale) and self.recurrent_scale > 0):
            problems.append(f"recurrent_scale must be > 0 or null, got {self.recurrent_scale!r}")
        if not (_is_real(self.rope_theta) and self.rope_theta > 0):
            problems.append(f"rope_theta must be a finite number > 0, got {self.rope_theta!r:.40}")
        if not problems:
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
            if self.rope and self.head_dim % 2:
                problems.append(f"head_dim must be even when rope is on, got {self.head_dim}")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    # ----- serialisation -----
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        if d["sharing"] == "kv":  # the default is left out, so a default model's config.json is what it always was
            d.pop("sharing")
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "OryxConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"{source}: missing config keys {missing}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "OryxConfig":
        from .files import FormatError, parse_json

        try:
            d = parse_json(text, source)
        except FormatError as e:
            raise ConfigError(str(e)) from None
        return cls.from_dict(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "OryxConfig":
        from .files import FormatError, read_json

        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: cannot read (No such file or directory)")
        try:
            d = read_json(path)
        except FormatError as e:
            raise ConfigError(str(e)) from None
        return cls.from_dict(d, str(path))

    def replace(self, **changes) -> "OryxConfig":
        return dataclasses.replace(self, **changes)


def _ladder(d_model: int, n_layers: int, vocab_size: int = 32000, head_dim: int = 64, max_context: int = 2048) -> dict:
    """A rung of the scale ladder, shaped like fla's Gated DeltaNet blocks.

    Keys and queries are half as wide as the model (H*d = D/2) and values twice the
    key head size (d_v = 2d, so H*d_v = D). With a SwiGLU MLP of ~8/3 D this keeps
    the two mode-specific queries near 8% of the weights: tied fraction >= 0.90.
    """
    n_heads = d_model // (2 * head_dim)
    mlp_hidden = int(math.ceil(8 * d_model / 3 / 64) * 64)
    return dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                head_dim=head_dim, value_head_dim=2 * head_dim, mlp_hidden=mlp_hidden, max_context=max_context)


PRESETS: dict[str, dict] = {
    # Test-sized: small enough for float64 references in milliseconds.
    "tiny": dict(vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, value_head_dim=16,
                 mlp_hidden=192, max_context=512),
    "20m": _ladder(384, 8, vocab_size=8192),
    "125m": _ladder(768, 12),
    "350m": _ladder(1024, 24),
    "760m": _ladder(1536, 24),
    "1.4b": _ladder(2048, 24),
}


def preset(name: str, mixer: str = "gdn", **overrides) -> OryxConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return OryxConfig(**{**PRESETS[key], "mixer": mixer, **overrides})
