"""Text generation with an OryxModel: sampling, the decode loop under a mode plan, CUDA graphs.

    for piece in stream_generate(model, tokenizer, "Once upon", max_new_tokens=64, plan="prefill-attention"):
        print(piece.text, end="")
    result = generate(model, tokenizer, "Once upon", temperature=0.8, top_p=0.9, seed=1)

The prompt is prefilled with the parallel form (optionally in chunks), then one token at
a time goes through `OryxModel.decode_step`. On CUDA each distinct step shape
(attention on/off, KV cache kept/dropped) runs once eagerly (compiling the Triton
kernels) and is then captured into a CUDA graph and replayed. Under the `drop` KV
policy the KV cache is freed as soon as the plan has no attention token left.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from oryx_core.plan import ModePlan
from oryx_core.tokenizer import end_of_text_id

from .cache import KV_POLICIES, OryxCache


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0  # from the end of the prefill (whose logits give token 1) to the last token
    peak_memory_bytes: int | None = None  # CUDA only
    cache_bytes: int = 0
    stop_reason: str = ""  # "length", "stop_token" or "stop_string"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}


@dataclass
class GenerationPiece:
    """What stream_generate yields: the next piece of text (may be empty) and the token behind it."""
    text: str
    token: int | None
    stats: GenerationStats


@dataclass
class GenerationResult:
    text: str
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


# ----- sampling -----
def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


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

    A variant is (attention needed, KV cache present). Its first step runs eagerly (warm-up:
    compiles kernels, sets up libraries); the second captures a graph (capture runs nothing)
    and replays it; later steps only copy the inputs in and replay.
    """

    def __init__(self, model, cache: OryxCache, cuda_graphs: bool = True):
        self.model, self.cache = model, cache
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=model.device)
        self.modes = torch.zeros(cache.batch, dtype=torch.bool, device=model.device)
        self.graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.warmed: set[tuple[bool, bool]] = set()

    def step(self, tokens, modes) -> torch.Tensor:
        """Logits [B, V] for tokens [B] (host ints) under modes [B] (host bools)."""
        model, cache = self.model, self.cache
        tokens = model.check_tokens(torch.as_tensor(tokens, device="cpu"), 1)  # checked on the host: no device sync
        modes = torch.as_tensor(modes, device="cpu")
        if modes.dtype != torch.bool or modes.shape not in ((), (1,), tokens.shape):
            raise ValueError(f"modes: expected a bool or bools [B] = {list(tokens.shape)}, got {modes.dtype} "
                             f"{list(modes.shape)}")
        model.check_cache(cache, tokens.shape[0], 1)
        attend = bool(modes.any())
        if attend and not cache.has_kv:
            raise ValueError("plan: attention-mode token after the KV cache was dropped; use --kv-policy keep")
        self.tokens.copy_(tokens)
        self.modes.copy_(modes.expand(tokens.shape))
        variant = (attend, cache.has_kv)
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


# ----- the token loop -----
def generate_tokens(model, prompt_ids, max_new_tokens: int = 256, plan="prefill-attention", temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, kv_policy: str = "keep",
                    cuda_graphs: bool = True, prefill_chunk: int | None = None,
                    repetition_penalty: float = 1.0) -> Iterator[tuple[int, GenerationStats]]:
    """Yields (token, stats) for each generated token; the caller stops iterating to stop.

    Token i of the whole sequence (prompt then generated) runs in the mode
    plan.resolve(prompt + max_new_tokens, prompt_length)[i].
    """
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("prompt: needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    plan = ModePlan.parse(plan)
    P, total = len(prompt_ids), len(prompt_ids) + max_new_tokens
    modes = plan.resolve(total, prompt_length=P)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = GenerationStats(prompt_tokens=P)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        with_kv = kv_policy == "keep" or plan.attention_after(0, P)
        cache = model.new_cache(1, total, kv_policy, with_kv=with_kv)
        start = _now(device)
        chunk = prefill_chunk or P
        for begin in range(0, P, chunk):
            end = min(begin + chunk, P)
            cache.maybe_drop_kv(plan, P)
            logits = model(torch.tensor([prompt_ids[begin:end]]), modes[None, begin:end], cache=cache)[:, -1]
        stats.prompt_seconds = _now(device) - start
        runner = DecodeRunner(model, cache, cuda_graphs)
        # tokens already in the text, as a mask on the device kept up to date token by token;
        # only built when a penalty reads it
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
            seen[prompt_ids] = True
        start = _now(device)
        for i in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = int(sample(logits, temperature, top_k, top_p, generator)[0])
            if seen is not None:
                seen[token] = True
            stats.generated_tokens = i + 1
            stats.generation_seconds = _now(device) - start
            stats.cache_bytes = cache.nbytes()
            if device.type == "cuda":
                stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
            yield token, stats
            if i + 1 == max_new_tokens:
                break
            cache.maybe_drop_kv(plan, P)
            logits = runner.step([token], modes[P + i:P + i + 1])


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----- text in, text out -----
def stream_generate(model, tokenizer, prompt: str, max_new_tokens: int = 256, plan="prefill-attention",
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop_tokens=None, stop_strings=(), kv_policy: str = "keep", cuda_graphs: bool = True,
                    prefill_chunk: int | None = None, repetition_penalty: float = 1.0) -> Iterator[GenerationPiece]:
    """Yields text pieces as they become final.

    Stops at max_new_tokens, at a stop token (default: the tokenizer's <|endoftext|>) or at a
    stop string (which is not emitted). Text is held back while it ends in an incomplete
    UTF-8 character or could still be the start of a stop string.
    """
    if stop_tokens is None:
        stop_tokens = {t for t in [end_of_text_id(tokenizer)] if t is not None}
    stop_strings = [s for s in stop_strings if s]
    holdback = max((len(s) for s in stop_strings), default=1) - 1
    prompt_ids = tokenizer.encode(prompt).ids
    generated, emitted = [], 0
    stats = GenerationStats(prompt_tokens=len(prompt_ids), stop_reason="length")
    for token, stats in generate_tokens(model, prompt_ids, max_new_tokens, plan, temperature, top_k, top_p, seed,
                                        kv_policy, cuda_graphs, prefill_chunk, repetition_penalty):
        if token in stop_tokens:
            stats.stop_reason = "stop_token"
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if hits:
            stats.stop_reason = "stop_string"
            yield GenerationPiece(text[emitted:min(hits)], token, stats)
            return
        stable = len(text.rstrip("\ufffd")) - holdback  # U+FFFD: a character still missing bytes
        if stable > emitted:
            yield GenerationPiece(text[emitted:stable], token, stats)
            emitted = stable
        else:
            yield GenerationPiece("", token, stats)
    else:
        stats.stop_reason = "length"
    text = tokenizer.decode(generated)
    yield GenerationPiece(text[emitted:], None, stats)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 256, **kwargs) -> GenerationResult:
    """The whole completion at once; same arguments as stream_generate."""
    pieces, tokens, stats = [], [], GenerationStats()
    for piece in stream_generate(model, tokenizer, prompt, max_new_tokens, **kwargs):
        pieces.append(piece.text)
        stats = piece.stats
        if piece.token is not None:
            tokens.append(piece.token)
    return GenerationResult("".join(pieces), tokens, stats)

