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
CUDA graph and replayed.
"""
from __future__ import annotations

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
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        outside = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----- one decode step, graph-captured on CUDA -----
class DecodeRunner:
    """Runs `model.decode_step` on one cache; on CUDA through a graph per step variant.

    A variant is (attention needed, KV cache present, recurrent state present). Its first step runs eagerly (warm-up:
    compiles kernels, sets up libraries); the second captures a graph (capture runs nothing)
    and replays it; later steps only copy the inputs in and replay.
    """

    def __init__(self, model, cache: OryxCache, cuda_graphs: bool = True):
        self.model, self.cache = model, cache
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=model.device)
        self.modes = torch.zeros(model.cfg.n_layers, cache.batch, dtype=torch.bool, device=model.device)
        self.graphs: dict[tuple[bool, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.warmed: set[tuple[bool, bool, bool]] = set()

    def step(self, tokens, modes) -> torch.Tensor:
        """Logits [B, V] for tokens [B] (host ints) under modes (host bools: one, [B], or per layer [L, B])."""
        model, cache = self.model, self.cache
        tokens = model.check_tokens(torch.as_tensor(tokens, device="cpu"), 1)  # checked on the host: no device sync
        modes = torch.as_tensor(modes, device="cpu")
        L, B = self.modes.shape
        if modes.dtype != torch.bool or modes.shape not in ((), (1,), (B,), (1, B), (L, B)):
            raise ValueError(f"modes: expected a bool, bools [B] = [{B}] or [L, B] = [{L}, {B}], got {modes.dtype} "
                             f"{list(modes.shape)}")
        model.check_cache(cache, tokens.shape[0], 1)
        attend = bool(modes.any())
        check_cache_modes(cache, attend, not bool(modes.all()))
        self.tokens.copy_(tokens)
        self.modes.copy_(modes.expand(L, B))
        variant = (attend, cache.has_kv, cache.has_recurrent)
        if not self.use_graphs:
            logits = model.decode_step(self.tokens, self.modes, cache, attend)
        elif variant in self.graphs:
            graph, logits = self.graphs[variant]
            graph.replay()
        elif variant in self.warmed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = model.decode_step(self.tokens, self.modes, cache, attend)
            self.graphs[variant] = (graph, logits)
            graph.replay()
        else:
            logits = model.decode_step(self.tokens, self.modes, cache, attend)
            self.warmed.add(variant)
        cache.length += 1
        return logits

    def release(self) -> None:
        """Forgets the graphs of variants the cache can no longer run (after a drop), with their memory."""
        def runnable(variant):
            return (self.cache.has_kv or not variant[1]) and (self.cache.has_recurrent or not variant[2])

        self.graphs = {v: g for v, g in self.graphs.items() if runnable(v)}
        self.warmed = {v for v in self.warmed if runnable(v)}


# ----- text in, text out (oryx_core.generation's loop on this backend) -----
def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", *,
                    cuda_graphs: bool = True, **kwargs):
    """oryx_core.generation.stream_generate on an OryxModel; kwargs as there."""
    from .backend import TorchModel

    return generation.stream_generate(TorchModel(model, cuda_graphs=cuda_graphs), tokenizer, prompt, max_tokens,
                                      plan, **kwargs)


def generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", *,
             cuda_graphs: bool = True, **kwargs) -> generation.GenerationResponse:
    """oryx_core.generation.generate on an OryxModel: text, output tokens and stats; kwargs as there."""
    from .backend import TorchModel

    return generation.generate(TorchModel(model, cuda_graphs=cuda_graphs), tokenizer, prompt, max_tokens, plan,
                               **kwargs)
