"""The PyTorch side of generation: sampling on the device and the decode step (CUDA graphs).

The loop, the plan, the drop policies, stop strings and the response type are
oryx_core.generation's, shared with every backend; `generate` and `stream_generate` here
take an OryxModel and run that loop through oryx_torch.backend.TorchModel:

    model = OryxModel.from_checkpoint(path, dtype=torch.float32, device="cpu").eval()
    for r in stream_generate(model, tokenizer, "Once upon", max_tokens=64, plan="prefill-attention"):
        print(r.text, end="")
    result = generate(model, tokenizer, "Once upon", temperature=0.8, top_p=0.9, seed=1)

On CUDA each distinct step shape (attention on/off, KV cache kept/dropped, recurrent state
kept/dropped) runs once eagerly (compiling the Triton kernels) and is then captured into a
CUDA graph and replayed. With `ORYX_COMPILED_DECODE=1` (or `compiled=True`) the step is
first compiled by torch.compile (fullgraph: inductor fuses the norms, gates, convs, RoPE and
casts between the matmuls and the Triton decode kernels, which are custom ops), and it is that
compiled step the graph captures, with the greedy pick inside it. It is opt-in until it has
been checked and timed on a GPU (tests/torch/test_compiled_decode.py's gpu tests,
bench/gpu_generation.sh); the CPU checks pass.
"""
from __future__ import annotations

import contextlib
import os

import torch

from oryx_core import generation

from .cache import OryxCache
from .model import check_cache_modes


# ----- sampling -----
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty on logits [B, V]: the tokens marked in `seen` (bool [V]) get their logit
    divided by `penalty` if positive, multiplied by it if negative (the MLX backend's rule, so
    both pick the same)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling, one uniform
    number per row drawn from `generator` (sample_rows)."""
    if temperature == 0:
        return logits.float().argmax(-1)
    B = logits.shape[0]
    device = generator.device if generator is not None else logits.device
    uniform = torch.rand(B, generator=generator, device=device).to(logits.device)
    full = lambda value, dtype: torch.full((B,), value, dtype=dtype, device=logits.device)  # noqa: E731
    return sample_rows(logits, full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32),
                       uniform)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """Next tokens [B] from logits [B, V], each row under its own settings (tensors [B]): greedy where temperature
    is 0; else the logits / temperature keep the top_k largest (0: all; ties with the k-th kept), then the
    smallest set of most likely tokens holding top_p of the mass (1: all; the most likely always stays), and the
    token is the one whose interval of the remaining distribution's cumulative sum holds `uniform` (in [0, 1)):
    a draw from that distribution. No host sync and fixed shapes, so it runs inside a CUDA graph."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    V = logits.shape[-1]
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    kth = ordered.gather(-1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # a token is dropped when the tokens ranked above it already hold top_p of the mass
    outside = ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    probs = probs.masked_fill(outside, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniform[:, None].to(cdf.dtype) * cdf[:, -1:]
    rank = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)
    drawn = order.gather(-1, rank)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)


# ----- one decode step, compiled and graph-captured on CUDA -----
def compiled_decode_default(device) -> bool:
    """Whether decode steps are compiled unless told: on CUDA, when ORYX_COMPILED_DECODE=1."""
    return torch.device(device).type == "cuda" and os.environ.get("ORYX_COMPILED_DECODE", "0") == "1"


def decode_and_pick(model, tokens, modes, cache: OryxCache, attend: bool, pick: bool = True, parts=None,
                    sampling=None):
    """model.decode_step, then (with `pick`) the next tokens, also written into `tokens` so that a following
    step can read them on the device: (logits [B, V], picked [B] or None). The pick is greedy, or with
    `sampling` (float [4, B]: temperature, top_k, top_p, a uniform number per row) sample_rows'. `parts`:
    compiled_parts(), the same step as three compiled functions (the inputs, one layer's step run for every
    layer, the logits and pick)."""
    if parts is None:
        return logits_and_pick(model, None, tokens, cache, pick, sampling,
                               model.decode_step(tokens, modes, cache, attend))
    inputs, layer, head = parts
    x, rope = inputs(model, tokens, cache)
    for i, block in enumerate(model.layers):
        x = layer(block, x, modes[i] if modes.dim() == 2 else modes, rope, cache.layers[i], cache.position, attend)
    return head(model, x, tokens, cache, pick, sampling)


def decode_inputs(model, tokens, cache: OryxCache):
    """model.decode_inputs as a plain function, what `compiled_parts` compiles."""
    return model.decode_inputs(tokens, cache)


def layer_step(layer, x, modes, rope, layer_cache, position, attend: bool):
    """One layer's decode step (OryxLayer.step) as a plain function, what `compiled_parts` compiles."""
    return layer.step(x, modes, rope, layer_cache, position, attend)


def logits_and_pick(model, x, tokens, cache: OryxCache, pick: bool, sampling=None, logits=None):
    """The step's logits (model.decode_logits of x, unless given) and, with `pick`, the next tokens (greedy, or
    sample_rows under `sampling`, as in decode_and_pick) written into `tokens` too."""
    if logits is None:
        logits = model.decode_logits(x, cache)
    if not pick:
        return logits, None
    if sampling is None:
        picked = logits.argmax(-1)
    else:
        picked = sample_rows(logits, sampling[0], sampling[1].long(), sampling[2], sampling[3])
    tokens.copy_(picked)
    return logits, picked


# Compiled variants kept per process and function (dynamo's limit): batch size 1 and any other (the second
# size makes the batch dynamic), attention on/off, KV cache or recurrent state dropped, greedy pick on/off and
# each distinct model structure; beyond this many a part runs eagerly.
COMPILED_VARIANTS = 64
_COMPILED_PARTS: dict = {}
# the (dtype, device) of the model the compiled parts last ran for, per backend
_COMPILED_FOR: dict = {}


def compiled_parts(backend: str = "inductor"):
    """(inputs, layer step, logits and pick), each compiled (fullgraph). The layer step is one layer's: dynamo
    lifts a layer's parameters and cache tensors to graph inputs and guards on their shapes, not on which layer
    they belong to, so one compilation serves every layer of every model of that shape (compiling the whole
    unrolled step would take the number of layers times as long)."""
    if backend not in _COMPILED_PARTS:
        _COMPILED_PARTS[backend] = tuple(torch.compile(fn, fullgraph=True, backend=backend)
                                         for fn in (decode_inputs, layer_step, logits_and_pick))
    return _COMPILED_PARTS[backend]


def run_decode_step(model, tokens, modes, cache: OryxCache, attend: bool, pick: bool = True, compiled: bool = False,
                    backend: str = "inductor", sampling=None):
    """decode_and_pick; through compiled_parts(backend) when `compiled`."""
    if not compiled:
        return decode_and_pick(model, tokens, modes, cache, attend, pick, None, sampling)
    import torch._inductor.config as inductor_config

    # shape_padding off: a decode matmul has one row per sequence, so padding its operands to aligned shapes buys
    # nothing, and inductor's padding benchmark (torch 2.11, CUDA) fails with "expected mat1 and mat2 to have the
    # same dtype" when this step recompiles for a model whose dtype changed
    forget_compiled_parts_for_other_dtypes(model, backend)
    with frozen_projections(model), torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS), \
            inductor_config.patch(shape_padding=False):
        return decode_and_pick(model, tokens, modes, cache, attend, pick, compiled_parts(backend), sampling)


def forget_compiled_parts_for_other_dtypes(model, backend: str) -> None:
    """Drops every compiled graph (torch._dynamo.reset) when the compiled step last ran for a model of another
    dtype or device. On CUDA (torch 2.11), steps compiled for an fp32 model and then run for the same model cast to
    bf16 ran a recompiled graph that multiplied an fp32 input by the bf16 projection weight (a dtype error; an
    illegal memory access in an earlier run); starting afresh avoids it. Alternating dtypes in one process
    therefore compiles again at each change."""
    weight = model.embed.weight
    key = (weight.dtype, weight.device)
    if _COMPILED_FOR.get(backend, key) != key:
        torch._dynamo.reset()
        _COMPILED_PARTS.clear()
        _COMPILED_FOR.clear()
    _COMPILED_FOR[backend] = key


@contextlib.contextmanager
def frozen_projections(model):
    """Inside, each mixer's concatenated input projection and each MLP's [gate; up] projection are built once
    (now) and a compiled no-grad step reads them rather than concatenating the weights in its graph (the MLP then
    runs one matmul where it ran two); the weights must not change inside (a CUDA graph captures their addresses
    anyway)."""
    parts = [layer.mixer for layer in model.layers] + [layer.mlp for layer in model.layers if layer.mlp is not None]
    for part in parts:
        part._fused_weight()
        part.frozen_projections = True
    try:
        yield
    finally:
        for part in parts:
            part.frozen_projections = False


class DecodeRunner:
    """Runs `model.decode_step` on one cache; on CUDA through a graph per step variant.

    A variant is (attention needed, KV cache present, recurrent state present). Its first step runs eagerly (warm-up:
    compiles kernels, and with `compiled` the step itself, sets up libraries); the second captures a graph
    (capture runs nothing) and replays it; later steps only copy the inputs in and replay. Every step also
    picks the greedy tokens on the device (`greedy_step` returns them, and can feed them to the next step
    without a trip through the host).

    compiled: torch.compile the step (None: compiled_decode_default); compile_backend: torch.compile's backend.
    """

    def __init__(self, model, cache: OryxCache, cuda_graphs: bool = True, compiled: bool | None = None,
                 compile_backend: str = "inductor"):
        self.model, self.cache = model, cache
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        self.compiled = compiled_decode_default(model.device) if compiled is None else compiled
        self.compile_backend = compile_backend
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=model.device)
        self.modes = torch.zeros(model.cfg.n_layers, cache.batch, dtype=torch.bool, device=model.device)
        self._host_modes = None  # what self.modes holds, on the host
        self.graphs: dict[tuple[bool, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.warmed: set[tuple[bool, bool, bool]] = set()
        if self.compiled:  # one compiled step for every cache capacity, rather than one per capacity
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, 2)

    def step(self, tokens, modes) -> torch.Tensor:
        """Logits [B, V] for tokens [B] (host ints) under modes (host bools: one, [B], or per layer [L, B])."""
        return self._step(tokens, modes, pick=False)[0]

    def greedy_step(self, tokens, modes) -> torch.Tensor:
        """The greedy next tokens [B] on the device, picked inside the step (a graph replay on CUDA), for tokens
        [B] (host ints), or None: the tokens the previous step picked, read on the device."""
        return self._step(tokens, modes, pick=True)[1]

    def _step(self, tokens, modes, pick: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, greedy tokens): a graph always picks (one small kernel); an eager step only with `pick`."""
        model, cache = self.model, self.cache
        L, B = self.modes.shape
        if tokens is not None:
            tokens = model.check_tokens(torch.as_tensor(tokens, device="cpu"), 1)  # checked on the host: no sync
        modes = torch.as_tensor(modes, device="cpu")
        if modes.dtype != torch.bool or modes.shape not in ((), (1,), (B,), (1, B), (L, B)):
            raise ValueError(f"modes: expected a bool, bools [B] = [{B}] or [L, B] = [{L}, {B}], got {modes.dtype} "
                             f"{list(modes.shape)}")
        model.check_cache(cache, B if tokens is None else tokens.shape[0], 1)
        attend = bool(modes.any())
        check_cache_modes(cache, attend, not bool(modes.all()))
        if tokens is not None:
            self.tokens.copy_(tokens)
        modes = modes.expand(L, B)
        if self._host_modes is None or not torch.equal(self._host_modes, modes):
            # a host-to-device copy only when the modes change: steps queued ahead then wait for nothing
            self.modes.copy_(modes)
            self._host_modes = modes.clone()
        variant = (attend, cache.has_kv, cache.has_recurrent)
        if not self.use_graphs:
            out = self._run(attend, pick)
        elif variant in self.graphs:
            graph, *out = self.graphs[variant]
            graph.replay()
        elif variant in self.warmed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(attend, True)
            self.graphs[variant] = (graph, *out)
            graph.replay()
        else:
            out = self._run(attend, True)
            self.warmed.add(variant)
        cache.length += 1
        return tuple(out)

    def _run(self, attend: bool, pick: bool):
        return run_decode_step(self.model, self.tokens, self.modes, self.cache, attend, pick, self.compiled,
                               self.compile_backend)

    def release(self) -> None:
        """Forgets the graphs of variants the cache can no longer run (after a drop), with their memory."""
        def runnable(variant):
            return (self.cache.has_kv or not variant[1]) and (self.cache.has_recurrent or not variant[2])

        self.graphs = {v: g for v, g in self.graphs.items() if runnable(v)}
        self.warmed = {v for v in self.warmed if runnable(v)}


class GreedyChain:
    """oryx_core.backend's greedy_chain on a DecodeRunner: each pick stays on the device (the runner's step writes
    it where the next step reads its token) and is copied to the host asynchronously, so the next step can be
    queued before the host has the token. Two host slots suffice: a pick is read before the step after next is
    queued."""

    def __init__(self, runner: "DecodeRunner"):
        self.runner = runner
        cuda = runner.model.device.type == "cuda"
        self.host = torch.zeros(2, runner.cache.batch, dtype=torch.long, pin_memory=cuda)
        self.slot = 0

    def first(self, logits: torch.Tensor):
        """The greedy token of prefill's logits [B, V], made the next step's input on the device."""
        with torch.inference_mode():
            picked = logits.argmax(-1)
            self.runner.tokens.copy_(picked)
            return self._to_host(picked)

    def step(self, modes):
        """Feeds the latest pick through the cache under modes (host bools, as DecodeRunner.step's) and picks."""
        with torch.inference_mode():
            return self._to_host(self.runner.greedy_step(None, modes))

    def read(self, pick) -> int:
        host, done = pick
        if done is not None:
            done.synchronize()
        return int(host[0])

    def _to_host(self, picked: torch.Tensor):
        host = self.host[self.slot]
        self.slot ^= 1
        host.copy_(picked, non_blocking=True)  # queued before the next replay overwrites the graph's pick
        if picked.device.type != "cuda":
            return host, None
        done = torch.cuda.Event()
        done.record()
        return host, done


# ----- text in, text out (oryx_core.generation's loop on this backend) -----
class LoadedModels(dict):
    """as_loaded_model's TorchModels of one OryxModel, by `cuda_graphs`; a copy or a pickle of the model gets an
    empty one (they hold device caches, graphs and a lock)."""

    def __reduce__(self):
        return LoadedModels, ()


def as_loaded_model(model, cuda_graphs: bool = True):
    """The oryx_torch.backend.TorchModel that generation runs `model` through: one per model and `cuda_graphs`,
    kept on the model, so that later calls reuse its pooled caches and the graphs captured for them."""
    from .backend import TorchModel

    loaded = model.__dict__.setdefault("_loaded_models", LoadedModels())
    current = loaded.get(cuda_graphs)
    where = (str(model.device), str(model.dtype).removeprefix("torch."))
    if current is None or (current.device, current.dtype) != where:
        current = loaded[cuda_graphs] = TorchModel(model, cuda_graphs=cuda_graphs)  # moved or cast: start afresh
    return current


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", *,
                    cuda_graphs: bool = True, **kwargs):
    """oryx_core.generation.stream_generate on an OryxModel; kwargs as there."""
    return generation.stream_generate(as_loaded_model(model, cuda_graphs), tokenizer, prompt, max_tokens, plan,
                                      **kwargs)


def generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", *,
             cuda_graphs: bool = True, **kwargs) -> generation.GenerationResponse:
    """oryx_core.generation.generate on an OryxModel: text, output tokens and stats; kwargs as there."""
    return generation.generate(as_loaded_model(model, cuda_graphs), tokenizer, prompt, max_tokens, plan, **kwargs)
