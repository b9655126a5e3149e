"""The Oryx weight format: a directory, HF-like, written atomically and validated on load.

    config.json                    the OryxConfig plus format version, dtype, quantization
    model-00001-of-0000N.safetensors
    model.safetensors.index.json   weight_map, total_size, and a sha256 per shard
    tokenizer.json                 (optional) a `tokenizers` tokenizer

Saving writes a sibling temp directory and renames it into place, so an interrupted save
never leaves a half-written checkpoint. Loading checks the format version, the config,
every shard's checksum and header, and every tensor against the spec (missing, extra,
misshapen, wrong dtype), each failure a one-line `FormatError`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .config import ConfigError, OryxConfig
from .safetensors_io import FormatError, dtype_name, encode, load_file
from .spec import parameter_specs

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # HF-style: chat template and end-of-turn ids (oryx_core.chat)
DEFAULT_SHARD_BYTES = 16 * 1024 * 1024
FORMAT_KEYS = ("format", "format_version", "dtype", "quantization", "architectures", "model_type")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Checkpoint:
    config: OryxConfig
    params: dict[str, np.ndarray]
    dtype: str = "float32"
    quantization: dict | None = None  # e.g. {"bits": 4, "group_size": 64} for MLX-quantised weights
    path: Path | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir()) if self.path else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----- saving -----
def save_checkpoint(path: str | Path, config: OryxConfig, params: dict[str, np.ndarray], dtype: str | None = None,
                    tokenizer_json: str | None = None, quantization: dict | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_config: dict | None = None) -> Path:
    """Writes a checkpoint directory atomically. `dtype` casts float tensors (default: keep).
    `tokenizer_config` (chat template, end-of-turn ids; oryx_core.chat) goes to tokenizer_config.json."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise FormatError(f"--dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if quantization is None:
        check_against_spec(config, params, "params")
    tensors = {}
    for name, value in params.items():
        arr = np.asarray(value)
        if dtype is not None and _is_float(arr):
            arr = arr.astype(_np_dtype(dtype))
        tensors[name] = arr
    float_dtypes = sorted({a.dtype.name for a in tensors.values() if _is_float(a)})
    stored = dtype or (float_dtypes[0] if len(float_dtypes) == 1 else "mixed")

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)

    def fill(tmp: Path):
        weight_map, sums = {}, {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (tmp / fname).write_bytes(encode(shard, {"format": "pt"}))
            sums[fname] = _sha256(tmp / fname)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"format_version": FORMAT_VERSION, "total_size": sum(a.nbytes for a in tensors.values()),
                              "shard_sha256": sums}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        meta = {"format": "oryx", "format_version": FORMAT_VERSION, "dtype": stored, "quantization": quantization,
                "architectures": ["OryxForCausalLM"], "model_type": "oryx"}
        (tmp / CONFIG_FILE).write_text(json.dumps({**meta, **config.to_dict()}, indent=2))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if tokenizer_config is not None:
            (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))

    return atomic_directory(path, fill)


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


# ----- loading -----
def read_config(path: str | Path) -> tuple[OryxConfig, dict]:
    """(config, format metadata) of a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise FormatError(f"{path}: a checkpoint is a directory (config.json + safetensors shards), not a file")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise FormatError(f"{path}: missing {CONFIG_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != "oryx":
        raise FormatError(f"{cfg_path}: not an Oryx checkpoint (no \"format\": \"oryx\")")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{cfg_path}: unknown format_version {version!r} (this Oryx reads {FORMAT_VERSION})")
    meta = {k: raw.pop(k) for k in FORMAT_KEYS if k in raw}
    try:
        cfg = OryxConfig.from_dict(raw, str(cfg_path))
    except ConfigError as e:
        raise FormatError(str(e)) from None
    return cfg, meta


def load_checkpoint(path: str | Path, verify_checksums: bool = True) -> Checkpoint:
    path = Path(path)
    cfg, meta = read_config(path)
    index_path = path / INDEX_FILE
    if not index_path.exists():
        raise FormatError(f"{path}: missing {INDEX_FILE}")
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        sums = index.get("metadata", {}).get("shard_sha256", {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise FormatError(f"{index_path}: corrupt index (needs a weight_map)") from None
    params = {}
    for fname in sorted(set(weight_map.values())):
        shard = path / fname
        if not shard.exists():
            raise FormatError(f"{path}: missing shard {fname} named in {INDEX_FILE}")
        if verify_checksums and fname in sums and _sha256(shard) != sums[fname]:
            raise FormatError(f"{shard}: checksum mismatch: the file is corrupt or was changed after saving")
        tensors, _ = load_file(shard)
        for name in tensors:
            if weight_map.get(name) != fname:
                raise FormatError(f"{shard}: tensor {name!r} is not listed for this shard in {INDEX_FILE}")
        params.update(tensors)
    listed_missing = sorted(set(weight_map) - set(params))
    if listed_missing:
        raise FormatError(f"{path}: tensors listed in {INDEX_FILE} but absent from their shards: {listed_missing[:5]}")
    quantization = meta.get("quantization")
    if quantization is None:
        check_against_spec(cfg, params, str(path))
        _check_dtypes(params, meta.get("dtype"), path)
    tok = path / TOKENIZER_FILE
    extra = {TOKENIZER_FILE: tok.read_bytes()} if tok.exists() else {}
    if (path / TOKENIZER_CONFIG_FILE).exists():
        extra[TOKENIZER_CONFIG_FILE] = (path / TOKENIZER_CONFIG_FILE).read_bytes()
    return Checkpoint(cfg, params, meta.get("dtype", "float32"), quantization, path, extra)


def check_against_spec(cfg: OryxConfig, params: dict, where: str) -> None:
    """Every tensor the spec names is present with its shape, and no other: else one FormatError."""
    specs = {s.name: s for s in parameter_specs(cfg)}
    missing = sorted(set(specs) - set(params))
    if missing:
        raise FormatError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(set(params) - set(specs))
    if extra:
        raise FormatError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")
    for name, spec in specs.items():
        shape = tuple(np.shape(params[name]))
        if shape != spec.shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {list(shape)}, the config needs {list(spec.shape)}")


def _check_dtypes(params: dict, dtype: str | None, path: Path) -> None:
    if dtype not in (*FLOAT_DTYPES, "mixed"):
        raise FormatError(f"{path / CONFIG_FILE}: unknown dtype {dtype!r}")
    for name, arr in params.items():
        if dtype != "mixed" and arr.dtype.name != dtype:
            raise FormatError(f"{path}: tensor {name!r} is {dtype_name(arr.dtype)} but config.json says dtype {dtype}")
