"""The PyTorch model behind oryx_core.backend's interface (`--backend torch`)."""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from oryx_core.weights import FLOAT_DTYPES

from .cache import OryxCache
from .generate import DecodeRunner, GreedyChain, apply_repetition_penalty, sample
from .model import OryxModel


def resolve_device(device: str | None) -> torch.device:
    """The device a --device flag names (default: cuda if present, else cpu); one-line errors."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {device}: the torch backend runs on cpu or cuda")
    return resolved


def host_tensor(array, dtype) -> torch.Tensor:
    """A CPU tensor of a host array of tokens or modes: its memory shared when NumPy lets it be written, else
    copied (a broadcast or read-only view; torch has no read-only tensors, and these arrays are small)."""
    array = np.asarray(array, dtype=dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


POOLED_CACHES = 4  # released caches a TorchModel keeps for reuse (with their graphs); the oldest goes first


class TorchModel:
    """An OryxModel as an oryx_core.backend.LoadedModel.

    pool_caches (default: where CUDA graphs run): a cache given back through `release_cache` is kept, with the
    graphs its runner captured, and handed out again, emptied in place, by a later `make_cache` of the same batch
    and KV choice that needs from half its capacity up to all of it (the smallest such); so a process that
    generates many times (a server, a benchmark, a notebook) captures a step's graphs once rather than once per
    call."""
    backend = "torch"

    def __init__(self, model: OryxModel, cuda_graphs: bool = True, pool_caches: bool | None = None):
        self.model = model.eval()
        self.config = model.cfg
        self.device = str(model.device)
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.cuda_graphs = cuda_graphs
        self.pool_caches = cuda_graphs and model.device.type == "cuda" if pool_caches is None else pool_caches
        self._runners: weakref.WeakKeyDictionary[OryxCache, DecodeRunner] = weakref.WeakKeyDictionary()
        self._pool: list[OryxCache] = []  # oldest first
        self._pool_key = None  # _captured_weights_key() when the pooled caches were given back
        self._pool_lock = threading.Lock()

    def forward(self, tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(host_tensor(tokens, np.int64), host_tensor(modes, bool))
        return logits.float().cpu().numpy()

    def make_cache(self, batch: int = 1, capacity: int | None = None, kv: bool = True) -> OryxCache:
        capacity = capacity or self.config.max_context
        if self.pool_caches:
            key = self._captured_weights_key()
            with self._pool_lock:
                self._forget_pool_unless(key)
                fits = [c for c in self._pool if c.batch == batch and c.with_kv == kv
                        and capacity <= c.capacity <= 2 * capacity]
                cache = min(fits, key=lambda c: c.capacity, default=None)
                if cache is not None:
                    self._pool.remove(cache)
            if cache is not None:
                with torch.inference_mode():
                    cache.refill()
                return cache
        with torch.inference_mode():
            cache = self.model.make_cache(batch, capacity, with_kv=kv)
        self._runners[cache] = DecodeRunner(self.model, cache, self.cuda_graphs)
        return cache

    def release_cache(self, cache: OryxCache) -> None:
        """Gives back a cache of this model's that its user no longer reads (oryx_core.generation does, for the
        caches it makes): pooled, or left to the garbage collector."""
        if not self.pool_caches or cache not in self._runners:
            return
        key = self._captured_weights_key()
        with self._pool_lock:
            self._forget_pool_unless(key)
            if all(c is not cache for c in self._pool):
                self._pool.append(cache)
            del self._pool[:-POOLED_CACHES]

    def _captured_weights_key(self) -> tuple:
        """The addresses of what a captured step reads besides its cache: every parameter and every fused
        projection weight (built now where missing: training mode drops them, and a rebuilt one may sit
        elsewhere). A pooled cache's graphs are replayed only while these are the same; otherwise the pool is
        emptied."""
        layers = self.model.layers
        parts = [layer.mixer for layer in layers] + [layer.mlp for layer in layers if layer.mlp is not None]
        with torch.inference_mode():
            return (tuple(p.data_ptr() for p in self.model.parameters()),
                    tuple(part._fused_weight().data_ptr() for part in parts))

    def _forget_pool_unless(self, key: tuple) -> None:
        """Empties the pool unless its caches were given back while the weights sat at `key` (then the pool's key);
        under _pool_lock."""
        if key != self._pool_key:
            self._pool.clear()
            self._pool_key = key

    def free_pooled_caches(self) -> None:
        """Forgets the pooled caches and their graphs (their memory returns to torch's allocator)."""
        with self._pool_lock:
            self._pool.clear()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache_length(self, cache: OryxCache) -> int:
        return cache.length

    def cache_nbytes(self, cache: OryxCache) -> int:
        return cache.nbytes()

    def prefill(self, cache: OryxCache, tokens: np.ndarray, modes: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            # the vocabulary projection of the last position only: sampling reads no other
            return self.model(host_tensor(tokens, np.int64), host_tensor(modes, bool), cache=cache,
                              last_only=True)[:, -1]

    def _runner(self, cache: OryxCache) -> DecodeRunner:
        """The cache's decode runner (made here for a cache this model did not make)."""
        runner = self._runners.get(cache)
        if runner is None:
            runner = self._runners[cache] = DecodeRunner(self.model, cache, self.cuda_graphs)
        return runner

    def step(self, cache: OryxCache, tokens: np.ndarray, modes: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return self._runner(cache).step(host_tensor(tokens, np.int64), host_tensor(modes, bool))

    def greedy_chain(self, cache: OryxCache) -> GreedyChain:
        return GreedyChain(self._runner(cache))

    def _after_drop(self, cache: OryxCache) -> None:
        runner = self._runners.get(cache)
        if runner is not None:
            runner.release()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop_kv(self, cache: OryxCache) -> None:
        cache.drop_kv()
        self._after_drop(cache)

    def drop_recurrent(self, cache: OryxCache) -> None:
        cache.drop_recurrent()
        self._after_drop(cache)

    def sampler(self, sampling, prompt_ids):
        device = self.model.device
        generator = torch.Generator().manual_seed(sampling.seed)  # host draws, as oryx_torch.batch's
        seen = None  # tokens already in the text, a mask kept on the device; built only when a penalty reads it
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
            seen[list(prompt_ids)] = True

        def draw(logits: torch.Tensor) -> int:
            with torch.inference_mode():
                logits = apply_repetition_penalty(logits[:1], seen, sampling.repetition_penalty)
                token = int(sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)[0])
                if seen is not None:
                    seen[token] = True
            return token

        return draw

    def reset_peak_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)

    def peak_memory_bytes(self) -> int | None:
        if self.model.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.model.device))
        return None

    def synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)


def load(path, dtype: str | None = None, device: str | None = None, cuda_graphs: bool = True) -> TorchModel:
    """A checkpoint on `device` (default cuda if present, else cpu) in `dtype` (default: bfloat16 on CUDA,
    float32 on the CPU)."""
    resolved = resolve_device(device)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    dtype = dtype or ("bfloat16" if resolved.type == "cuda" else "float32")
    return TorchModel(OryxModel.from_checkpoint(path, dtype=dtype, device=resolved), cuda_graphs=cuda_graphs)


# ----- what oryx_convert asks of this backend (NumPy in, NumPy out) -----
def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """torch -> NumPy bit for bit (bfloat16 through ml_dtypes)."""
    from .model import torch_to_numpy

    return torch_to_numpy(tensor)


def save_tensors(path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from .model import numpy_to_torch

    save_file({n: numpy_to_torch(a) for n, a in arrays.items()}, str(path), metadata=metadata)


def load_tensors(path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; ValueError for a file safetensors cannot read."""
    from safetensors.torch import load_file

    try:
        return {n: to_numpy(t) for n, t in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own SafetensorError on corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_pickled_state_dict(path) -> dict[str, np.ndarray]:
    """A pytorch_model.bin state dict, loaded with weights_only=True (no arbitrary pickle code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a loadable torch state dict ({e.__class__.__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {name: to_numpy(t) for name, t in state.items() if isinstance(t, torch.Tensor)}


def add_hf_files(path, plan: str = "attention"):
    """Makes the Oryx checkpoint at `path` loadable by transformers."""
    from .hf import add_hf_files as add

    return add(path, plan)
