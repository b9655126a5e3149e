"""Recurrent adapters: a checkpoint stored as a base plus only its recurrent-mode tensors.

An adapter directory holds

    adapter.json                        format, the base it names, the config keys it changes, and the
                                        sha256 of every base tensor it keeps (the ones it was trained on)
    adapter-0000i-of-0000N.safetensors  the recurrent-mode tensors (the spec's RECURRENT ones), each shard
                                        <= 16 MiB; matrices bfloat16, vectors and conv taps float32
    adapter.safetensors.index.json      weight map and a sha256 per shard
    tokenizer.json, tokenizer_config.json   the base's, copied

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
SHARD_BYTES = 16 * 2**20


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


def _stored(name: str, value: np.ndarray) -> np.ndarray:
    """Matrices (projections) in bfloat16; vectors and conv taps in float32, where rounding would move the
    recurrence's decay rates and step sizes."""
    import ml_dtypes

    value = np.asarray(value)
    if value.ndim == 2 and ".conv_" not in name:
        return value.astype(ml_dtypes.bfloat16)
    return value.astype(np.float32)


def save_adapter(path: str | Path, base: str | Path, config: OryxConfig, params: dict[str, np.ndarray],
                 base_ref: str | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes the recurrent tensors of `params` (a model with `config`) as an adapter on `base`.

    `base_ref` is what adapter.json names (default: base's path relative to the adapter's parent,
    or absolute). The kept tensors' sha256 come from `base` as stored.
    """
    from .weights import load_checkpoint, shard_file_name, shard_names

    path = Path(path)
    base_ckpt = load_checkpoint(base)
    names = adapter_names(config)
    kept = [s.name for s in parameter_specs(config) if s.mode != RECURRENT]
    for name in kept:
        if name not in base_ckpt.params:
            raise FormatError(f"{base}: has no tensor {name!r}, which the adapted model keeps from its base")
        if not np.array_equal(np.asarray(base_ckpt.params[name]), np.asarray(params[name])):
            raise FormatError(f"params: tensor {name!r} differs from the base's; an adapter holds only "
                              f"recurrent-mode tensors")
    base_config = base_ckpt.config.to_dict()
    changes = {k: v for k, v in config.to_dict().items() if base_config.get(k) != v}
    stored = {name: _stored(name, params[name]) for name in names}
    shards = [{name: stored[name] for name in group}
              for group in shard_names(stored, shard_bytes - 4096)]  # room for the safetensors header
    if base_ref is None:
        base_ref = str(Path(base).resolve())
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "base": base_ref, "config": changes,
            "base_sha256": {name: tensor_sha256(base_ckpt.params[name]) for name in kept}}

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
                    base_ref: str | None = None) -> Path:
    """The adapter of a whole checkpoint (e.g. `oryx retrofit`'s result) on `base` (default: the SRC
    its config names under extra.retrofit_src, else an error)."""
    from .weights import load_checkpoint

    ckpt = load_checkpoint(model_dir)
    if base is None:
        raise ValueError(f"{model_dir}: name the base the adapter applies to")
    return save_adapter(path, base, ckpt.config, ckpt.params, base_ref)


def read_adapter_meta(path: Path) -> dict:
    meta_path = path / ADAPTER_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{meta_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise FormatError(f"{meta_path}: not an Oryx adapter (no \"format\": \"{ADAPTER_FORMAT}\")")
    if meta.get("format_version") != ADAPTER_VERSION:
        raise FormatError(f"{meta_path}: unknown format_version {meta.get('format_version')!r} "
                          f"(this Oryx reads {ADAPTER_VERSION})")
    for key, kind in (("base", str), ("config", dict), ("base_sha256", dict)):
        if not isinstance(meta.get(key), kind):
            raise FormatError(f"{meta_path}: missing or malformed {key!r}")
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
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise FormatError(f"{path}: adapter tensors do not fit the config: missing {missing[:3]}, unexpected {extra[:3]}")
    dtype = next(iter(base_ckpt.params.values())).dtype
    params = {name: value for name, value in base_ckpt.params.items() if name not in wanted}
    params.update({name: np.asarray(value).astype(dtype) for name, value in tensors.items()})
    check_against_spec(cfg, params, str(path))
    return Checkpoint(cfg, params, base_ckpt.dtype, None, path, dict(base_ckpt.extra_files))
