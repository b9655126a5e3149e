"""The MLX model behind oryx_core.backend's interface (`--backend mlx`)."""
from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np

from .cache import LayerCache, cache_offset, drop_kv, drop_recurrent
from .generate import apply_repetition_penalty, load_model, sample
from .model import OryxModel


def resolve_device(device: str | None):
    """The MLX device a --device flag names: cpu or gpu (default: MLX's default device)."""
    if device is None:
        return mx.default_device()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"--device {device}: the mlx backend runs on cpu or gpu")
    if device == "gpu" and not mx.metal.is_available():
        raise ValueError("--device gpu: no Metal GPU here (mlx runs on the CPU); use --device cpu")
    return mx.Device(mx.cpu if device == "cpu" else mx.gpu)


class MLXModel:
    """An oryx_mlx OryxModel as an oryx_core.backend.LoadedModel."""
    backend = "mlx"

    def __init__(self, model: OryxModel, device=None):
        self.model = model
        self.config = model.cfg
        self._device = device
        self.device = (device or mx.default_device()).type.name
        self.dtype = str(model.norm.weight.dtype).rsplit(".", 1)[-1]

    def _stream(self):
        """The stream of the device this model was loaded for (MLX's default when none was named)."""
        return contextlib.nullcontext() if self._device is None else mx.stream(self._device)

    def _run(self, tokens, modes: np.ndarray, cache, last_only: bool = False, picked: bool = False):
        with self._stream():
            return self.model(tokens if picked else mx.array(tokens), modes, cache, last_only=last_only,
                              picked=picked)

    def forward(self, tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        logits = self._run(np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool), None)
        return np.array(logits.astype(mx.float32))

    def make_cache(self, batch: int = 1, capacity: int | None = None, kv: bool = True) -> list[LayerCache]:
        cache = self.model.make_cache()  # grows as it fills: batch and capacity come from the first tokens
        if not kv:
            drop_kv(cache)
        return cache

    def cache_length(self, cache: list[LayerCache]) -> int:
        return cache_offset(cache)

    def cache_nbytes(self, cache: list[LayerCache]) -> int:
        return sum(layer.nbytes for layer in cache)

    def prefill(self, cache, tokens: np.ndarray, modes: np.ndarray):
        logits = self._run(np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool), cache,
                           last_only=True)[:, -1]
        logits = logits.astype(mx.float32)
        mx.eval(logits, [layer.state for layer in cache])  # one prefill piece at a time bounds the memory
        return logits

    def step(self, cache, tokens: np.ndarray, modes: np.ndarray):
        tokens, modes = np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool)
        return self._run(tokens[:, None], modes[:, None], cache)[:, -1].astype(mx.float32)

    def greedy_chain(self, cache) -> "GreedyChain":
        return GreedyChain(self, cache)

    def drop_kv(self, cache) -> None:
        drop_kv(cache)

    def drop_recurrent(self, cache) -> None:
        drop_recurrent(cache)

    def sampler(self, sampling, prompt_ids):
        key = mx.random.key(sampling.seed)
        seen = None  # tokens already in the text, a mask kept up to date; built only when a penalty reads it
        if sampling.repetition_penalty != 1.0:
            seen = mx.zeros((self.config.vocab_size,), mx.bool_)
            seen[mx.array(list(prompt_ids))] = True

        def draw(logits) -> int:
            nonlocal key
            key, subkey = mx.random.split(key)
            token = int(sample(apply_repetition_penalty(logits[:1], seen, sampling.repetition_penalty),
                               sampling.temperature, sampling.top_k, sampling.top_p, subkey)[0])
            if seen is not None:
                seen[token] = True
            return token

        return draw

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory_bytes(self) -> int | None:
        return int(mx.get_peak_memory())

    def synchronize(self) -> None:
        mx.synchronize()


class GreedyChain:
    """oryx_core.backend's greedy_chain: each pick an mx.array whose computation is started (mx.async_eval) and
    fed to the next step unevaluated, so building step n + 1's graph overlaps computing step n."""

    def __init__(self, backend: MLXModel, cache):
        self.backend, self.cache = backend, cache
        self.last = None

    def first(self, logits):
        return self._pick(logits)

    def step(self, modes):
        modes = np.asarray(modes, dtype=bool)
        logits = self.backend._run(self.last[:, None], modes[:, None], self.cache, picked=True)[:, -1]
        return self._pick(logits)

    def read(self, pick) -> int:
        return int(pick[0].item())

    def _pick(self, logits):
        with self.backend._stream():  # on the stream the step ran on
            self.last = mx.argmax(logits, axis=-1)
        mx.async_eval(self.last)
        return self.last


def load(path, dtype: str | None = None, device: str | None = None) -> MLXModel:
    """A checkpoint (full precision or quantised) in `dtype` (default: as stored)."""
    resolved = resolve_device(device)
    return MLXModel(load_model(path, dtype), None if device is None else resolved)


# ----- what oryx_convert asks of this backend (NumPy in, NumPy out) -----
def to_numpy(array) -> np.ndarray:
    """mx -> NumPy without a float round trip (bfloat16 through its bits)."""
    from .quantize import to_numpy as convert

    return convert(array)


def save_tensors(path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    mx.save_safetensors(str(path), {n: mx.array(a) for n, a in arrays.items()}, metadata=metadata)


def load_tensors(path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; ValueError for a file MLX cannot read."""
    try:
        return {n: to_numpy(a) for n, a in mx.load(str(path)).items()}
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def build_model(config, params: dict[str, np.ndarray], quantization: dict | None) -> OryxModel:
    """The MLX model holding these weights (quantised modules where they have scales); validates them."""
    from .quantize import quantized_model

    weights = {n: mx.array(a) for n, a in params.items()}
    model = OryxModel(config) if quantization is None else quantized_model(config, quantization, weights, "model")
    model.load_weights(list(weights.items()), strict=True)
    return model


def quantize_params(config, params: dict[str, np.ndarray], bits: int, group_size: int) -> dict[str, np.ndarray]:
    """Float weights -> this backend's affine quantisation (packed weights, scales, biases)."""
    from mlx.utils import tree_flatten

    from .quantize import quantize_model

    quantized = quantize_model(build_model(config, params, None), bits, group_size)
    return {n: to_numpy(a) for n, a in tree_flatten(quantized.parameters())}


def dequantize_params(config, params: dict[str, np.ndarray], quantization: dict) -> dict[str, np.ndarray]:
    """Float weights equal to what the quantised model computes with (mx.dequantize of each packed weight)."""
    bits, group_size = quantization["bits"], quantization["group_size"]
    build_model(config, params, quantization)  # validates the packed tensors against the spec
    out = {}
    for name, value in params.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module is not None and module + ".scales" in params:
            value = to_numpy(mx.dequantize(mx.array(value), mx.array(params[module + ".scales"]),
                                           mx.array(params[module + ".biases"]), group_size=group_size, bits=bits))
        out[name] = value
    return out


def export_mlx_lm(src, dst, plan: str = "attention", bits: int | None = None, group_size: int = 64):
    """Exports checkpoint src to a directory mlx_lm.load runs."""
    from .export import export_mlx_lm as export

    return export(src, dst, plan=plan, bits=bits, group_size=group_size)
