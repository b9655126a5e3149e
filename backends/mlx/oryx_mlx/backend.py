"""The MLX model behind oryx_core.backend's interface (`--backend mlx`)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import LayerCache, cache_offset, drop_kv, drop_recurrent
from .generate import apply_repetition_penalty, load_model, sample_token
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

    def _run(self, tokens: np.ndarray, modes: np.ndarray, cache):
        if self._device is not None:
            with mx.stream(self._device):
                return self.model(mx.array(tokens), modes, cache)
        return self.model(mx.array(tokens), modes, cache)

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
        logits = self._run(np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool), cache)[:, -1]
        logits = logits.astype(mx.float32)
        mx.eval(logits, [layer.state for layer in cache])  # one prefill piece at a time bounds the memory
        return logits

    def step(self, cache, tokens: np.ndarray, modes: np.ndarray):
        tokens, modes = np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool)
        return self._run(tokens[:, None], modes[:, None], cache)[:, -1].astype(mx.float32)

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
            token = sample_token(apply_repetition_penalty(logits[0], seen, sampling.repetition_penalty), subkey,
                                 sampling.temperature, sampling.top_k, sampling.top_p)
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


def load(path, dtype: str | None = None, device: str | None = None) -> MLXModel:
    """A checkpoint (full precision or quantised) in `dtype` (default: as stored)."""
    resolved = resolve_device(device)
    return MLXModel(load_model(path, dtype), None if device is None else resolved)
