"""Affine 4/8-bit quantisation of the MLX model, stored in the Oryx checkpoint format.

What is quantised: every projection (nn.Linear) and the embedding (which is also the tied
LM head), group-wise along the input dimension, as `nn.quantize` does. What stays in full
precision: the recurrent gates (a_proj, b_proj, dt_proj: a few rows each, and errors there
compound through the decay over the whole sequence), A_log, dt_bias, D_skip, the convs and
the norms (none of these is a Linear or an Embedding), and any projection whose input width
is not a multiple of the group size.

On disk: config.json "quantization": {"bits", "group_size"}; for a quantised module the
packed `<module>.weight` (uint32), `<module>.scales` and `<module>.biases`; everything else
under its spec name and shape. `oryx_core.weights.load_checkpoint` skips its spec check for
quantised checkpoints, so `check_quantized_weights` does it here.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from oryx_core.config import OryxConfig
from oryx_core.safetensors_io import FormatError
from oryx_core.spec import parameter_specs
from oryx_core.weights import FULL_PRECISION_MODULES, save_checkpoint
from oryx_core.weights import QUANT_BITS as BITS
from oryx_core.weights import QUANT_GROUP_SIZES as GROUP_SIZES

from .model import OryxModel


def _check_settings(bits, group_size, where: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{where}: bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def is_quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    return path.rsplit(".", 1)[-1] not in FULL_PRECISION_MODULES and module.weight.shape[-1] % group_size == 0


def quantize_model(model: OryxModel, bits: int = 4, group_size: int = 64) -> OryxModel:
    """Quantises the model in place (see the module docstring for what stays full precision)."""
    _check_settings(bits, group_size, "quantize")
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ValueError("quantize: the model is already quantised")
    from tqdm.auto import tqdm

    # module by module (what nn.quantize does in one call), evaluated as it goes, so a progress bar shows the work
    targets = [(path, module) for path, module in model.named_modules() if is_quantizable(path, module, group_size)]
    quantized = []
    for path, module in tqdm(targets, desc="quantizing", unit="matrix", disable=None, leave=False):
        packed = module.to_quantized(group_size=group_size, bits=bits)
        mx.eval(packed.parameters())
        quantized.append((path, packed))
    model.update_modules(tree_unflatten(quantized))
    return model


def check_quantized_weights(cfg: OryxConfig, quantization: dict, weights: dict, where: str) -> set[str]:
    """Validates a quantised checkpoint's tensors; returns the module paths that are quantised.

    Each spec tensor is either stored as in the spec, or (for a quantisable module's weight)
    packed with its scales and biases. One-line FormatError for anything else.
    """
    if not isinstance(quantization, dict) or set(quantization) != {"bits", "group_size"}:
        raise FormatError(f"{where}: config.json quantization must be {{\"bits\": N, \"group_size\": G}}, "
                          f"got {quantization!r}")
    bits, group_size = quantization["bits"], quantization["group_size"]
    try:
        _check_settings(bits, group_size, f"{where}: config.json quantization")
    except ValueError as e:
        raise FormatError(str(e)) from None
    modules = dict(OryxModel(cfg).named_modules())
    quantized = {name[:-len(".scales")] for name in weights if name.endswith(".scales")}
    expected = set()
    for spec in parameter_specs(cfg):
        module_path = spec.name[:-len(".weight")] if spec.name.endswith(".weight") else None
        if module_path in quantized:
            if not is_quantizable(module_path, modules[module_path], group_size):
                raise FormatError(f"{where}: tensor {module_path + '.scales'!r}: {module_path} must stay full precision")
            _check_packed(module_path, spec.shape, bits, group_size, weights, where)
            expected |= {spec.name, module_path + ".scales", module_path + ".biases"}
            continue
        if spec.name not in weights:
            raise FormatError(f"{where}: missing tensor {spec.name!r}")
        if tuple(weights[spec.name].shape) != spec.shape:
            raise FormatError(f"{where}: tensor {spec.name!r} has shape {list(weights[spec.name].shape)}, "
                              f"the config needs {list(spec.shape)}")
        expected.add(spec.name)
    extra = sorted(set(weights) - expected)
    if extra:
        raise FormatError(f"{where}: unexpected tensors {extra[:5]}")
    return quantized


def _check_packed(module_path, shape, bits, group_size, weights, where) -> None:
    rows, cols = shape
    wanted = {".weight": ((rows, cols * bits // 32), mx.uint32),
              ".scales": ((rows, cols // group_size), None), ".biases": ((rows, cols // group_size), None)}
    for suffix, (want_shape, want_dtype) in wanted.items():
        name = module_path + suffix
        if name not in weights:
            raise FormatError(f"{where}: missing tensor {name!r} of a quantised module")
        tensor = weights[name]
        if tuple(tensor.shape) != want_shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, {bits}-bit groups of "
                              f"{group_size} need {list(want_shape)}")
        if want_dtype is not None and tensor.dtype != want_dtype:
            raise FormatError(f"{where}: tensor {name!r} is {tensor.dtype}, packed weights are uint32")
        if want_dtype is None and not mx.issubdtype(tensor.dtype, mx.floating):
            raise FormatError(f"{where}: tensor {name!r} is {tensor.dtype}, scales and biases are floating point")


def quantized_model(cfg: OryxConfig, quantization: dict, weights: dict, where: str) -> OryxModel:
    """An OryxModel whose modules are quantised exactly where `weights` (mx arrays) holds scales."""
    quantized = check_quantized_weights(cfg, quantization, weights, where)
    model = OryxModel(cfg)
    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=lambda path, module: path in quantized)
    return model


def to_numpy(array: mx.array) -> np.ndarray:
    """mx -> numpy without a float round trip (bfloat16 through its bits)."""
    if array.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(array)


def save_quantized(model: OryxModel, path, bits: int, group_size: int, tokenizer_json: str | None = None) -> Path:
    params = {name: to_numpy(value) for name, value in tree_flatten(model.parameters())}
    return save_checkpoint(path, model.cfg, params, tokenizer_json=tokenizer_json,
                           quantization={"bits": bits, "group_size": group_size})

