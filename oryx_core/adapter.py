"""Recurrent adapters: a checkpoint stored as a base plus only its recurrent-mode tensors.

An adapter directory holds

    adapter.json                        format, the base it names, the config keys it changes, and the
                                        sha256 of every base tensor it keeps (the ones it was trained on)
    adapter-0000i-of-0000N.safetensors  the recurrent-mode tensors (the spec's RECURRENT ones), each shard
                                        <= 16 MiB; matrices bfloat16, vectors and conv taps float32
    adapter.safetensors.index.json      weight map and a sha256 per shard
    tokenizer.json, tokenizer_config.json   the base's, copied

An adapter may also carry low-rank deltas of base tensors it does not replace (the shared projections a
mixed-mode stage adapted, `oryx retrofit --shared-rank`): for a base matrix W [out, in] the factor pair
`W.lowrank_a` [rank, in] and `W.lowrank_b` [out, rank] (bfloat16), and the merged tensor is
W + lowrank_b @ lowrank_a, computed in float32 and cast to the base's dtype (`merge_lowrank`, the one
definition every loader and writer uses). Such an adapter has format_version 2 and lists the adapted
tensors under "lowrank"; the base's sha256 record still covers W itself (the unadapted tensor).

`load_checkpoint(adapter_dir)` (oryx_core.weights) loads the base, checks each kept tensor's sha256,
and returns the merged checkpoint, with the adapter's tensors cast to the base's dtype; so every
backend that loads through the core loader gets merged parameters. A base that does not match is
refused with one line naming the tensor.

The base is a path (relative to the adapter directory, or absolute) or `named:<NAME>`, a base that
oryx_core.default knows how to build (e.g. the SmolLM2 conversion it caches on first use).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .config import ConfigError, OryxConfig
from .safetensors_io import FormatError, encode, load_file
from .spec import RECURRENT, parameter_specs

ADAPTER_FILE = "adapter.json"
ADAPTER_INDEX = "adapter.safetensors.index.json"
ADAPTER_FORMAT = "oryx-adapter"
ADAPTER_VERSION = 1
LOWRANK_VERSION = 2  # written only by adapters that carry low-rank deltas; readers take both
SHARD_BYTES = 16 * 2**20
ADAPTER_BYTES = 32 * 2**20  # every shard of one adapter together
LOWRANK_A, LOWRANK_B = ".lowrank_a", ".lowrank_b"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def tensor_sha256(array: np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_names(cfg: OryxConfig) -> list[str]:
    return [s.name for s in parameter_specs(cfg) if s.mode == RECURRENT]


def lowrank_factor_names(name: str) -> tuple[str, str]:
    return name + LOWRANK_A, name + LOWRANK_B


def round_lowrank(factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The factor pairs as an adapter stores them (bfloat16), back in float32: merging these gives exactly what
    loading the adapter gives."""
    import ml_dtypes

    return {name: tuple(np.asarray(f, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32) for f in pair)
            for name, pair in factors.items()}


def merge_lowrank(base: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """base + b @ a in float32, in base's dtype: how a low-rank delta is merged everywhere."""
    base = np.asarray(base)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != base.shape:
        raise FormatError(f"low-rank factors {list(a.shape)} and {list(b.shape)} do not fit a tensor of shape "
                          f"{list(base.shape)} (need [rank, in] and [out, rank])")
    return (base.astype(np.float32) + b @ a).astype(base.dtype)


def merge_lowrank_params(params: dict[str, np.ndarray],
                         factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """`params` with each tensor named in `factors` replaced by its merged value."""
    merged = dict(params)
    for name, (a, b) in factors.items():
        if name not in params:
            raise FormatError(f"low-rank delta for {name!r}: the model has no such tensor")
        merged[name] = merge_lowrank(params[name], a, b)
    return merged


def stored_form(name: str, value: np.ndarray) -> np.ndarray:
    """Matrices (projections) in bfloat16; vectors and conv taps in float32, where rounding would move the
    recurrence's decay rates and step sizes."""
    import ml_dtypes

    value = np.asarray(value)
    if value.ndim == 2 and ".conv_" not in name:
        return value.astype(ml_dtypes.bfloat16)
    return value.astype(np.float32)


def save_adapter(path: str | Path, base: str | Path, config: OryxConfig, params: dict[str, np.ndarray],
                 base_ref: str | None = None, shard_bytes: int = SHARD_BYTES,
                 lowrank: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Writes the recurrent tensors of `params` (a model with `config`) as an adapter on `base`.

    `base_ref` is what adapter.json names (default: base's path relative to the adapter's parent,
    or absolute). The kept tensors' sha256 come from `base` as stored. `lowrank` ({name: (a, b)}) adds
    low-rank deltas of kept tensors; `params` then holds those tensors merged (merge_lowrank of the base's
    tensor and the factors as stored), which is checked, so the adapter loads to exactly `params`.
    """
    from .weights import load_checkpoint, shard_file_name, shard_names

    path = Path(path)
    base_ckpt = load_checkpoint(base)
    names = adapter_names(config)
    kept = [s.name for s in parameter_specs(config) if s.mode != RECURRENT]
    lowrank = round_lowrank(lowrank or {})
    unknown = sorted(set(lowrank) - set(kept))
    if unknown:
        raise FormatError(f"lowrank: {unknown[0]!r} is not a tensor the adapted model keeps from its base")
    for name in kept:
        if name not in base_ckpt.params:
            raise FormatError(f"{base}: has no tensor {name!r}, which the adapted model keeps from its base")
        want = np.asarray(base_ckpt.params[name])
        if name in lowrank:
            want = merge_lowrank(want, *lowrank[name])
        if not np.array_equal(want, np.asarray(params[name])):
            raise FormatError(f"params: tensor {name!r} differs from the base's" +
                              (" merged with its low-rank delta" if name in lowrank else
                               "; an adapter holds only recurrent-mode tensors and low-rank deltas"))
    base_config = base_ckpt.config.to_dict()
    changes = {k: v for k, v in config.to_dict().items() if base_config.get(k) != v}
    stored = {name: stored_form(name, params[name]) for name in names}
    for name, pair in lowrank.items():
        for fname, factor in zip(lowrank_factor_names(name), pair):
            stored[fname] = stored_form(fname, factor)
    total = sum(v.nbytes for v in stored.values())
    if total > ADAPTER_BYTES - 64 * 1024:  # room for the shards' headers and the index
        raise FormatError(f"{path}: the adapter's tensors take {total / 2**20:.1f} MiB, over the "
                          f"{ADAPTER_BYTES // 2**20} MiB an adapter may hold (lower the rank or adapt fewer tensors)")
    shards = [{name: stored[name] for name in group}
              for group in shard_names(stored, shard_bytes - 4096)]  # room for the safetensors header
    if base_ref is None:
        base_ref = str(Path(base).resolve())
    meta = {"format": ADAPTER_FORMAT, "format_version": LOWRANK_VERSION if lowrank else ADAPTER_VERSION,
            "base": base_ref, "config": changes,
            "base_sha256": {name: tensor_sha256(base_ckpt.params[name]) for name in kept}}
    if lowrank:
        meta["lowrank"] = sorted(lowrank)

    def fill(tmp: Path) -> None:
        weight_map, sums = {}, {}
        for i, shard in enumerate(shards):
            fname = shard_file_name(i, len(shards), "adapter")
            (tmp / fname).write_bytes(encode(shard))
            sums[fname] = _file_sha256(tmp / fname)
            weight_map.update({name: fname for name in shard})
        (tmp / ADAPTER_INDEX).write_text(json.dumps({"metadata": {"shard_sha256": sums}, "weight_map": weight_map},
                                                    indent=2))
        (tmp / ADAPTER_FILE).write_text(json.dumps(meta, indent=2))
        for fname, data in base_ckpt.extra_files.items():  # the tokenizer (and chat template): every backend
            (tmp / fname).write_bytes(data)                 # finds it where it looks, in the model's directory

    atomic_directory(path, fill)
    return path


def save_adapter_of(model_dir: str | Path, path: str | Path, base: str | Path | None = None,
                    base_ref: str | None = None,
                    lowrank: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """The adapter of a whole checkpoint (e.g. `oryx retrofit`'s result) on `base`; `lowrank` as save_adapter's."""
    from .weights import load_checkpoint

    ckpt = load_checkpoint(model_dir)
    if base is None:
        raise ValueError(f"{model_dir}: name the base the adapter applies to")
    return save_adapter(path, base, ckpt.config, ckpt.params, base_ref, lowrank=lowrank)


def adapter_base(path: str | Path) -> tuple[Path, str]:
    """(base directory, the reference adapter.json gives) of an adapter: a new adapter trained from this
    adapted model applies to the same base."""
    path = Path(path)
    meta = read_adapter_meta(path)
    base = resolve_base(meta["base"], path)
    return base, meta["base"] if meta["base"].startswith("named:") else str(base)


def read_adapter_meta(path: Path) -> dict:
    meta_path = path / ADAPTER_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{meta_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise FormatError(f"{meta_path}: not an Oryx adapter (no \"format\": \"{ADAPTER_FORMAT}\")")
    if meta.get("format_version") not in (ADAPTER_VERSION, LOWRANK_VERSION):
        raise FormatError(f"{meta_path}: unknown format_version {meta.get('format_version')!r} "
                          f"(this Oryx reads {ADAPTER_VERSION} and {LOWRANK_VERSION})")
    for key, kind in (("base", str), ("config", dict), ("base_sha256", dict)):
        if not isinstance(meta.get(key), kind):
            raise FormatError(f"{meta_path}: missing or malformed {key!r}")
    lowrank = meta.setdefault("lowrank", [])
    if not isinstance(lowrank, list) or not all(isinstance(n, str) for n in lowrank):
        raise FormatError(f"{meta_path}: malformed 'lowrank' (a list of tensor names)")
    if lowrank and meta["format_version"] != LOWRANK_VERSION:
        raise FormatError(f"{meta_path}: 'lowrank' needs format_version {LOWRANK_VERSION}")
    return meta


def resolve_base(ref: str, adapter_dir: Path) -> Path:
    if ref.startswith("named:"):
        from .default import named_base

        return named_base(ref[len("named:"):])
    base = Path(ref).expanduser()
    return base if base.is_absolute() else (adapter_dir / base).resolve()


def adapter_config(path: str | Path, base: str | Path | None = None) -> tuple[OryxConfig, dict]:
    """(merged config, adapter.json) without loading any tensor (the base's config is read)."""
    from .weights import read_config

    path = Path(path)
    meta = read_adapter_meta(path)
    base_cfg, _ = read_config(Path(base) if base is not None else resolve_base(meta["base"], path))
    try:
        cfg = OryxConfig.from_dict({**base_cfg.to_dict(), **meta["config"]}, str(path / ADAPTER_FILE))
    except ConfigError as e:
        raise FormatError(str(e)) from None
    return cfg, meta


def load_adapter(path: str | Path, base: str | Path | None = None, verify_checksums: bool = True):
    """The merged Checkpoint of an adapter directory and its base (default: the base adapter.json names)."""
    from .weights import Checkpoint, check_against_spec, load_checkpoint

    path = Path(path)
    meta = read_adapter_meta(path)
    base_path = Path(base) if base is not None else resolve_base(meta["base"], path)
    if is_adapter(base_path):
        raise FormatError(f"{path}: its base {base_path} is itself an adapter; adapters apply to whole checkpoints")
    base_ckpt = load_checkpoint(base_path, verify_checksums=verify_checksums)
    if base_ckpt.quantization is not None:
        raise FormatError(f"{path}: its base {base_path} is quantized; adapters apply to float checkpoints")
    for name, digest in meta["base_sha256"].items():
        if name not in base_ckpt.params:
            raise FormatError(f"{path}: base {base_path} does not match this adapter: it has no tensor {name!r}")
        if tensor_sha256(base_ckpt.params[name]) != digest:
            raise FormatError(f"{path}: base {base_path} does not match this adapter: tensor {name!r} differs "
                              f"from the one it was trained on")
    try:
        cfg = OryxConfig.from_dict({**base_ckpt.config.to_dict(), **meta["config"]}, str(path / ADAPTER_FILE))
    except ConfigError as e:
        raise FormatError(str(e)) from None
    index_path = path / ADAPTER_INDEX
    try:
        index = json.loads(index_path.read_text())
        weight_map, sums = index["weight_map"], index.get("metadata", {}).get("shard_sha256", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise FormatError(f"{index_path}: missing or corrupt (needs a weight_map)") from None
    tensors = {}
    for fname in sorted(set(weight_map.values())):
        shard = path / fname
        if not shard.is_file():
            raise FormatError(f"{path}: missing shard {fname} named in {ADAPTER_INDEX}")
        if verify_checksums and fname in sums and _file_sha256(shard) != sums[fname]:
            raise FormatError(f"{shard}: checksum mismatch: the file is corrupt or was changed after saving")
        tensors.update(load_file(shard)[0])
    wanted = set(adapter_names(cfg))
    factor_names = {f for name in meta["lowrank"] for f in lowrank_factor_names(name)}
    if set(tensors) != wanted | factor_names:
        missing, extra = sorted((wanted | factor_names) - set(tensors)), sorted(set(tensors) - wanted - factor_names)
        raise FormatError(f"{path}: adapter tensors do not fit the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in meta["lowrank"]:
        if name in wanted or name not in meta["base_sha256"]:
            raise FormatError(f"{path / ADAPTER_FILE}: 'lowrank' names {name!r}, which is not a base tensor "
                              f"this adapter keeps")
    dtype = next(iter(base_ckpt.params.values())).dtype
    params = {name: value for name, value in base_ckpt.params.items() if name not in wanted}
    params.update({name: np.asarray(value).astype(dtype) for name, value in tensors.items() if name in wanted})
    try:
        params = merge_lowrank_params(params, {name: tuple(tensors[f] for f in lowrank_factor_names(name))
                                               for name in meta["lowrank"]})
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    check_against_spec(cfg, params, str(path))
    return Checkpoint(cfg, params, base_ckpt.dtype, None, path, dict(base_ckpt.extra_files))
