"""Oryx models <-> backend containers: torch state-dict directories and MLX safetensors (plain or quantised).

Both containers are directories, HF-like, written atomically:

    config.json      the OryxConfig plus "format" ("torch-state-dict" or "mlx"), "dtype", "quantization"
    model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json   (when the model has one)

A torch directory is written and read by `safetensors.torch` (load it with
`model.load_state_dict(safetensors.torch.load_file(...))`: the keys are the spec names,
which are OryxModel's parameter names); an MLX directory by `mx.save_safetensors` /
`mx.load` (`model.load_weights(...)` of oryx_mlx's OryxModel reads it). Tensors cross
NumPy bit for bit through the backends' own converters (oryx_torch.model's
numpy_to_torch / torch_to_numpy, oryx_mlx.quantize's to_numpy), bfloat16 included, so
round trips through either are exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oryx_core.config import ConfigError, OryxConfig
from oryx_core.safetensors_io import FormatError
from oryx_core.atomic import atomic_directory
from oryx_core.weights import DEFAULT_SHARD_BYTES

from oryx_core.files import member
from oryx_core.safetensors_io import read_header

from .sources import (HF_CONFIG, HF_SAFETENSORS, HF_SAFETENSORS_INDEX, ConvertedModel, index_shards, read_json,
                      tokenizer_json_of)

TORCH_FORMAT, MLX_FORMAT = "torch-state-dict", "mlx"
CONTAINER_KEYS = ("format", "dtype", "quantization")


def shard_names(params: dict[str, np.ndarray], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most shard_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name in sorted(params):
        nbytes = params[name].nbytes
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _stored_dtype(params: dict[str, np.ndarray]) -> str:
    floats = sorted({a.dtype.name for a in params.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"})
    return floats[0] if len(floats) == 1 else "mixed"


def _write_container(dst, model: ConvertedModel, fmt: str, save_shard, shard_bytes: int) -> Path:
    """Writes config, shards (through save_shard(path, {name: array})) and index atomically."""
    shards = shard_names(model.params, shard_bytes)

    def fill(tmp: Path):
        weight_map = {}
        for i, names in enumerate(shards):
            fname = HF_SAFETENSORS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_shard(tmp / fname, {n: model.params[n] for n in names})
            weight_map.update({n: fname for n in names})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(a.nbytes for a in model.params.values())}, "weight_map": weight_map}
            (tmp / HF_SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        meta = {"format": fmt, "dtype": _stored_dtype(model.params), "quantization": model.quantization}
        (tmp / HF_CONFIG).write_text(json.dumps({**meta, **model.config.to_dict()}, indent=2))
        if model.tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer_json)

    return atomic_directory(dst, fill)


def _read_container(src, fmt: str, load_shard) -> ConvertedModel:
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
        params.update(load_shard(file))
    return ConvertedModel(cfg, params, tokenizer_json_of(src), meta["quantization"])


# ----- torch -----
def write_torch_dir(dst, model: ConvertedModel, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    if model.quantization is not None:
        raise ValueError("--to torch-state-dict: the model is MLX-quantised; PyTorch has no such weights (pass --dequantize)")
    from oryx_torch.model import numpy_to_torch
    from safetensors.torch import save_file

    def save_shard(path, arrays):
        save_file({n: numpy_to_torch(a) for n, a in arrays.items()}, str(path), metadata={"format": "pt"})

    return _write_container(dst, model, TORCH_FORMAT, save_shard, shard_bytes)


def read_torch_dir(src) -> ConvertedModel:
    from oryx_torch.model import torch_to_numpy
    from safetensors.torch import load_file

    def load_shard(path):
        try:
            return {n: torch_to_numpy(t) for n, t in load_file(str(path)).items()}
        except Exception as e:  # safetensors raises its own SafetensorError on corrupt files
            raise FormatError(f"{path}: not a readable safetensors file ({e})") from None

    return _read_container(src, TORCH_FORMAT, load_shard)


# ----- MLX -----
def write_mlx_dir(dst, model: ConvertedModel, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    import mlx.core as mx

    def save_shard(path, arrays):
        mx.save_safetensors(str(path), {n: mx.array(a) for n, a in arrays.items()}, metadata={"format": "mlx"})

    return _write_container(dst, model, MLX_FORMAT, save_shard, shard_bytes)


def read_mlx_dir(src) -> ConvertedModel:
    import mlx.core as mx
    from oryx_mlx.quantize import to_numpy

    def load_shard(path):
        try:
            return {n: to_numpy(a) for n, a in mx.load(str(path)).items()}
        except (RuntimeError, ValueError) as e:
            raise FormatError(f"{path}: not a readable safetensors file ({e})") from None

    return _read_container(src, MLX_FORMAT, load_shard)


# ----- MLX quantisation (oryx_mlx decides what is quantised and how) -----
def mlx_model(model: ConvertedModel):
    """oryx_mlx's OryxModel holding the model's weights (quantised modules where it has scales); validates them."""
    import mlx.core as mx
    from oryx_mlx.model import OryxModel
    from oryx_mlx.quantize import quantized_model

    weights = {n: mx.array(a) for n, a in model.params.items()}
    if model.quantization is None:
        oryx_model = OryxModel(model.config)
    else:
        oryx_model = quantized_model(model.config, model.quantization, weights, "model")
    oryx_model.load_weights(list(weights.items()), strict=True)
    return oryx_model


def quantize(model: ConvertedModel, bits: int, group_size: int) -> ConvertedModel:
    """The model with oryx_mlx's affine quantisation applied (floats in, packed weights + scales out)."""
    if model.quantization is not None:
        raise ValueError(f"--quantize: the source is already quantised ({model.quantization})")
    from mlx.utils import tree_flatten
    from oryx_mlx.quantize import quantize_model, to_numpy

    quantized = quantize_model(mlx_model(model), bits, group_size)
    params = {n: to_numpy(a) for n, a in tree_flatten(quantized.parameters())}
    return ConvertedModel(model.config, params, model.tokenizer_json, {"bits": bits, "group_size": group_size})


def dequantize(model: ConvertedModel) -> ConvertedModel:
    """Float weights equal to what the quantised model computes with (mx.dequantize of each packed weight)."""
    if model.quantization is None:
        return model
    import mlx.core as mx
    from oryx_mlx.quantize import to_numpy

    bits, group_size = model.quantization["bits"], model.quantization["group_size"]
    mlx_model(model)  # validates the packed tensors against the spec
    params = {}
    for name, value in model.params.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module is not None and module + ".scales" in model.params:
            scales = model.params[module + ".scales"]
            value = to_numpy(mx.dequantize(mx.array(value), mx.array(scales), mx.array(model.params[module + ".biases"]),
                                               group_size=group_size, bits=bits))
        params[name] = value
    return ConvertedModel(model.config, params, model.tokenizer_json, None)
