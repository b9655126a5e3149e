"""Oryx models <-> backend containers: torch state-dict directories and MLX safetensors (plain or quantised).

Both containers are directories, HF-like, written atomically:

    config.json      the OryxConfig plus "format" ("torch-state-dict" or "mlx"), "dtype", "quantization"
    model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json   (when the model has one)

A torch directory is written and read by `safetensors.torch` (load it with
`model.load_state_dict(safetensors.torch.load_file(...))`: the keys are the spec names,
which are OryxModel's parameter names); an MLX directory by `mx.save_safetensors` /
`mx.load` (`model.load_weights(...)` of oryx_mlx's OryxModel reads it). Tensors cross
NumPy bit for bit through the backends' own converters (each backend module's
save_tensors / load_tensors, reached through oryx_core.backend), bfloat16 included, so
round trips through either are exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oryx_core.backend import get_backend
from oryx_core.config import ConfigError, OryxConfig
from oryx_core.safetensors_io import FormatError
from oryx_core.atomic import atomic_directory
from oryx_core.weights import DEFAULT_SHARD_BYTES, shard_file_name, shard_names

from oryx_core.files import member
from oryx_core.safetensors_io import read_header

from .sources import (HF_CONFIG, HF_SAFETENSORS, HF_SAFETENSORS_INDEX, ConvertedModel, index_shards, read_json,
                      tokenizer_json_of)

TORCH_FORMAT, MLX_FORMAT = "torch-state-dict", "mlx"
CONTAINER_KEYS = ("format", "dtype", "quantization")


def _stored_dtype(params: dict[str, np.ndarray]) -> str:
    floats = sorted({a.dtype.name for a in params.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"})
    return floats[0] if len(floats) == 1 else "mixed"


def _write_container(dst, model: ConvertedModel, fmt: str, backend: str, shard_format: str, shard_bytes: int) -> Path:
    """Writes config, shards (through the backend's save_tensors, tagged shard_format) and index atomically."""
    tensors = get_backend(backend)
    shards = shard_names(dict(sorted(model.params.items())), shard_bytes)

    def fill(tmp: Path):
        weight_map = {}
        for i, names in enumerate(shards):
            fname = HF_SAFETENSORS if len(shards) == 1 else shard_file_name(i, len(shards))
            tensors.save_tensors(tmp / fname, {n: model.params[n] for n in names}, metadata={"format": shard_format})
            weight_map.update({n: fname for n in names})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(a.nbytes for a in model.params.values())}, "weight_map": weight_map}
            (tmp / HF_SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        meta = {"format": fmt, "dtype": _stored_dtype(model.params), "quantization": model.quantization}
        (tmp / HF_CONFIG).write_text(json.dumps({**meta, **model.config.to_dict()}, indent=2))
        if model.tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer_json)

    return atomic_directory(dst, fill)


def _read_container(src, fmt: str, backend: str) -> ConvertedModel:
    tensors = get_backend(backend)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    raw = read_json(src / HF_CONFIG)
    if raw.get("format") != fmt:
        raise FormatError(f"{src / HF_CONFIG}: not a {fmt} directory (format {raw.get('format')!r})")
    meta = {k: raw.pop(k, None) for k in CONTAINER_KEYS}
    try:
        cfg = OryxConfig.from_dict(raw, str(src / HF_CONFIG))
    except ConfigError as e:
        raise FormatError(str(e)) from None
    index = src / HF_SAFETENSORS_INDEX
    if index.exists():
        files = index_shards(src, index)
    elif (src / HF_SAFETENSORS).exists() or (src / HF_SAFETENSORS).is_symlink():
        files = [member(src, HF_SAFETENSORS, str(src))]
    else:
        raise FormatError(f"{src}: missing {HF_SAFETENSORS}")
    params = {}
    for file in files:
        read_header(file)  # as strict as the safetensors package, whichever library then loads it
        try:
            params.update(tensors.load_tensors(file))
        except ValueError as e:
            raise FormatError(str(e)) from None
    return ConvertedModel(cfg, params, tokenizer_json_of(src), meta["quantization"])


# ----- torch -----
def write_torch_dir(dst, model: ConvertedModel, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    if model.quantization is not None:
        raise ValueError("--to torch-state-dict: the model is MLX-quantised; PyTorch has no such weights (pass --dequantize)")
    return _write_container(dst, model, TORCH_FORMAT, "torch", "pt", shard_bytes)


def read_torch_dir(src) -> ConvertedModel:
    return _read_container(src, TORCH_FORMAT, "torch")


# ----- MLX -----
def write_mlx_dir(dst, model: ConvertedModel, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    return _write_container(dst, model, MLX_FORMAT, "mlx", "mlx", shard_bytes)


def read_mlx_dir(src) -> ConvertedModel:
    return _read_container(src, MLX_FORMAT, "mlx")


# ----- MLX quantisation (the MLX backend decides what is quantised and how) -----
def mlx_model(model: ConvertedModel):
    """The MLX backend's model holding the model's weights (quantised modules where it has scales); validates them."""
    return get_backend("mlx").build_model(model.config, model.params, model.quantization)


def quantize(model: ConvertedModel, bits: int, group_size: int) -> ConvertedModel:
    """The model with the MLX backend's affine quantisation applied (floats in, packed weights + scales out)."""
    if model.quantization is not None:
        raise ValueError(f"--quantize: the source is already quantised ({model.quantization})")
    params = get_backend("mlx").quantize_params(model.config, model.params, bits, group_size)
    return ConvertedModel(model.config, params, model.tokenizer_json, {"bits": bits, "group_size": group_size})


def dequantize(model: ConvertedModel) -> ConvertedModel:
    """Float weights equal to what the quantised model computes with (mx.dequantize of each packed weight)."""
    if model.quantization is None:
        return model
    params = get_backend("mlx").dequantize_params(model.config, model.params, model.quantization)
    return ConvertedModel(model.config, params, model.tokenizer_json, None)
