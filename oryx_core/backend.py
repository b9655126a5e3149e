"""The interface every backend implements, and the one place oryx_core names its backends.

A backend is a module with `load(path, dtype=None, device=None) -> LoadedModel`. Everything
above it (`oryx eval`, `oryx generate`, oryx_core.generation, oryx_convert) reaches a backend
only through `get_backend(name)` and the `LoadedModel` protocol, so no backend imports another
and the core imports torch or mlx only when that backend is asked for.

Shapes, one convention for every backend: tokens int [B, T] and modes bool [B, T] (True =
attention mode) for a forward or a prefill; tokens [B] and modes [B] for one decode step.
Logits come back as the backend's own array ([B, T, V] from `forward` as float32 NumPy; the
last position's [B, V] from `prefill` and `step`, left on the device for the backend's sampler).

A cache holds, per layer, the KV cache, the conv windows and the recurrent state of `batch`
sequences. Every token fed through it appends its key/value and advances the recurrent state
whatever its mode; `drop_kv` frees the KV cache (attention-mode tokens are then refused) and
`drop_recurrent` frees the recurrent state (recurrent-mode tokens are then refused, and later
tokens skip the recurrent-only work).

Conversion (oryx_convert) asks the torch and MLX modules for NumPy-level functions beside
`load`: to_numpy, save_tensors(path, arrays, metadata), load_tensors(path) (both bit-exact,
bfloat16 included); torch adds load_pickled_state_dict and add_hf_files; MLX adds
build_model, quantize_params, dequantize_params and export_mlx_lm.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import numpy as np

from .config import OryxConfig


class BackendEntry(NamedTuple):
    module: str  # implements `load`
    extra: str | None  # the pip extra that installs it
    score_dtype: str | None  # the dtype `oryx eval` scores in (None: as stored)


BACKENDS: dict[str, BackendEntry] = {
    "reference": BackendEntry("oryx_core.reference_backend", None, "float64"),
    "torch": BackendEntry("oryx_torch.backend", "cuda", "float32"),
    "mlx": BackendEntry("oryx_mlx.backend", "mlx", None),
}
GENERATION_BACKENDS = ("torch", "mlx")  # the backends with a cache (`oryx generate`)
OPTIONAL_LIBRARIES = ("torch", "triton", "mlx", "mlx_lm")  # what the extras install


class BackendUnavailable(ValueError):
    """The backend's extra is not installed (a user error: the message says what to install)."""


@runtime_checkable
class LoadedModel(Protocol):
    backend: str  # its name in BACKENDS
    config: OryxConfig
    device: str  # where it runs ("cpu", "cuda:0", "gpu")
    dtype: str  # compute dtype of the activations ("float32", "bfloat16", "float16", "float64")

    def forward(self, tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        """Stateless forward: tokens int64 [B, T], modes bool [B, T] -> float32 logits [B, T, V]."""

    def make_cache(self, batch: int = 1, capacity: int | None = None, kv: bool = True) -> Any:
        """An empty cache for `batch` sequences of up to `capacity` tokens (default: the model's max_context;
        a backend whose cache grows may ignore it); kv=False: without a KV cache (as if dropped), so a
        plan with no attention token never allocates one."""

    def cache_length(self, cache) -> int:
        """Tokens the cache has seen (the next token's position)."""

    def cache_nbytes(self, cache) -> int:
        """Bytes the cache holds now."""

    def prefill(self, cache, tokens: np.ndarray, modes: np.ndarray) -> Any:
        """Feeds tokens [B, T] under modes [B, T] through the cache; the last position's logits [B, V]."""

    def step(self, cache, tokens: np.ndarray, modes: np.ndarray) -> Any:
        """Feeds one token per sequence (tokens [B], modes [B]); their logits [B, V]."""

    def drop_kv(self, cache) -> None:
        """Frees every layer's KV cache."""

    def drop_recurrent(self, cache) -> None:
        """Frees every layer's recurrent state (and what only the recurrence reads)."""

    def sampler(self, sampling, prompt_ids: list[int]) -> Callable[[Any], int]:
        """A function from one sequence's logits (row 0 of `prefill`/`step`) to the next token, drawing with
        `sampling` (oryx_core.generation.SamplingParams: temperature, top-k, top-p, repetition penalty over
        the prompt and every token drawn so far, seed)."""

    def reset_peak_memory(self) -> None:
        ...

    def peak_memory_bytes(self) -> int | None:
        """Peak memory the backend allocated since `reset_peak_memory` (None where it cannot tell)."""

    def synchronize(self) -> None:
        """Waits for queued device work (so host clocks time it)."""

    # Optional: `release_cache(cache)`: the caller made the cache with make_cache and will not read it again; the
    # backend may keep it (and what it prepared for it) for a later make_cache. oryx_core.generation calls it
    # for the caches it makes.
    # Optional: `greedy_chain(cache)` -> an object with first(logits) -> pick, step(modes) -> pick and
    # read(pick) -> int, where a pick is one sequence's greedy token still on the device: `first` picks from
    # prefill's logits, `step` feeds the latest pick through the cache (as `step` would its host token) and picks
    # again, without waiting; `read` waits for that one pick. oryx_core.generation then queues token n + 1's
    # step before reading token n, so the device never waits for the host between tokens.


class Backend(Protocol):
    def load(self, path, dtype: str | None = None, device: str | None = None) -> LoadedModel:
        ...


def backend_names() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend module registered as `name`; imported on first use."""
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module_name, extra, _ = BACKENDS[name]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing.split(".")[0] not in (module_name.split(".")[0], *OPTIONAL_LIBRARIES):
            raise  # an import inside an installed backend failed: a bug, not a missing extra
        hint = f"; install it with pip install 'oryx[{extra}]'" if extra else ""
        raise BackendUnavailable(f"--backend {name}: not available (cannot import {missing}){hint}") from None


def load_model(path, backend: str, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """A checkpoint loaded by the named backend."""
    return get_backend(backend).load(path, dtype=dtype, device=device)
