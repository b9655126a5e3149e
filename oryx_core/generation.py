"""Text generation on any backend with a cache: argument checks, the mode plan, the KV and recurrent-state
drop policies, incremental detokenization with stop strings, and one response type.

    from oryx_core.backend import load_model
    from oryx_core.generation import generate, stream_generate
    model = load_model("runs/tiny", backend="torch")          # or "mlx"
    tokenizer = tokenizer_for("runs/tiny")
    for r in stream_generate(model, tokenizer, "Once upon", max_tokens=64, plan="prefill-attention"):
        print(r.text, end="")
    result = generate(model, tokenizer, "Once upon", max_tokens=64, temperature=0.8, top_p=0.9, seed=1)
    result.text, result.tokens, result.stats.generation_tps

The backend (oryx_core.backend.LoadedModel) owns tensors, kernels, caches, CUDA graphs and
sampling on its device; everything else is here, once for every backend.

Modes: token i of the whole sequence (the cache's earlier tokens, the prompt, then the
generated tokens) runs in mode plan.resolve(prompt_length + max_tokens, prompt_length)[i],
where prompt_length counts everything fed before the first generated token.

Drop policies: `kv_policy` "keep" | "drop" frees the KV cache once the plan has no
attention-mode token left; `state_policy` "auto" | "keep" | "drop" frees the recurrent
state once it has no recurrent-mode token left (later tokens then skip the recurrent-only
work). "auto" drops the state only from a cache the call made itself, which no one can read
afterwards, and keeps a caller's `prompt_cache`, which a later call may continue in either mode.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

from .plan import ModePlan, PlanError
from .tokenizer import end_of_text_id

KV_POLICIES = ("keep", "drop")
STATE_POLICIES = ("auto", "keep", "drop")
FINISH_REASONS = ("length", "stop_token", "stop_string")
MAX_SEED = 2**63 - 1
UTF8_MAX_BYTES = 4  # a token run this long that still decodes to an incomplete character is invalid, not incomplete


# ----- parameters and their checks -----
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn: greedy at temperature 0, else from the softmax of logits / temperature
    restricted to the top_k most likely tokens (0 = all) and to the smallest set holding top_p of the mass
    (1 = all). repetition_penalty divides the positive logits (multiplies the negative ones) of every token
    already in the text, prompt included (1 = off)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_sampling(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(sampling: SamplingParams) -> None:
    """Refuses sampling parameters out of range, naming the parameter and its flag."""
    s = sampling
    if not _is_number(s.temperature) or s.temperature < 0:
        raise ValueError(f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {s.temperature!r}")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise ValueError(f"top_k (--top-k) must be an integer >= 0 (0 = off), got {s.top_k!r}")
    if not _is_number(s.top_p) or not 0 < s.top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be in (0, 1] (1 = off), got {s.top_p!r}")
    if not _is_number(s.repetition_penalty) or s.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty (--repetition-penalty) must be a finite number > 0 (1 = off), "
                         f"got {s.repetition_penalty!r}")
    if not _is_int(s.seed) or not 0 <= s.seed <= MAX_SEED:
        raise ValueError(f"seed (--seed) must be an integer in [0, 2^63 - 1], got {s.seed!r}")


def check_positive_int(value, name: str, flag: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} ({flag}) must be an integer >= 1, got {value!r}")
    return value


def check_generation(config, cached: int, prompt_length: int, max_tokens, kv_policy: str, state_policy: str,
                     prefill_step_size) -> None:
    """Refuses generation arguments that cannot run, each with one line naming the parameter and its flag.

    cached: tokens already in the cache; prompt_length: the new prompt's tokens.
    """
    if not _is_int(max_tokens) or max_tokens < 0:
        raise ValueError(f"max_tokens (--max-tokens) must be an integer >= 0 (0 = prefill only), got {max_tokens!r}")
    check_positive_int(prefill_step_size, "prefill_step_size", "--prefill-step-size")
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy (--kv-policy) must be one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
    if state_policy not in STATE_POLICIES:
        raise ValueError(f"state_policy (--state-policy) must be one of {', '.join(STATE_POLICIES)}, "
                         f"got {state_policy!r}")
    if prompt_length < 1:
        raise ValueError("prompt (--prompt): needs at least one token")
    limit = config.max_context
    if cached + prompt_length > limit:
        raise ValueError(f"prompt (--prompt): {cached + prompt_length} tokens"
                         f"{f' with the {cached} already cached' if cached else ''} exceed the model's context of "
                         f"{limit} tokens")
    if cached + prompt_length + max_tokens > limit:
        raise ValueError(f"max_tokens (--max-tokens): {prompt_length} prompt tokens"
                         f"{f' after {cached} cached' if cached else ''} + {max_tokens} new exceed the model's "
                         f"context of {limit} tokens; ask for at most {limit - cached - prompt_length}")


def resolve_plan(plan, length: int, prompt_length: int):
    """The plan (text or ModePlan) and its modes, bool [length]; plan errors name --plan."""
    plan = ModePlan.parse(plan)
    return plan, plan.resolve(length, prompt_length=prompt_length)


# ----- responses -----
@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled by this call
    generation_tokens: int = 0  # tokens sampled (a stop token included)
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0  # from the end of the prefill (whose logits give token 1) to the last token
    # Memory, measured after the prompt, after each drop and after the last token (a response before the last
    # carries the latest of those: asking every token costs the host more than a GPU decode step)
    peak_memory_bytes: int | None = None  # where the backend can tell
    cache_bytes: int = 0  # what the cache holds
    finish_reason: str | None = None  # one of FINISH_REASONS once finished, None while running

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}


@dataclass
class GenerationResponse:
    """What `stream_generate` yields per sampled token and what `generate` returns.

    Streamed: `text` is the new text that became final with this token (may be empty while a
    character or a possible stop string is incomplete), `tokens` the output tokens sampled at
    this step (empty for a stop token, which is not part of the output). From `generate`: the
    whole text and every output token. `is_attention`: the mode the last sampled token runs in
    when fed back.
    """
    text: str
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    is_attention: bool | None = None

    @property
    def token(self) -> int | None:
        return self.tokens[-1] if self.tokens else None

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason


def speed_line(stats: GenerationStats) -> str:
    """The one line `oryx generate` prints after the text (on stderr)."""
    memory = f"; peak memory {stats.peak_memory_bytes / 2**20:.1f} MiB" if stats.peak_memory_bytes else ""
    return (f"[prompt {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s; generation "
            f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s; finish {stats.finish_reason}; "
            f"cache {stats.cache_bytes / 2**20:.2f} MiB{memory}]")


def json_result(response: GenerationResponse, model, plan, kv_policy: str, state_policy: str) -> dict:
    """The one `--json` object of `oryx generate`, the same keys on every backend."""
    return {"text": response.text, "tokens": response.tokens, "backend": model.backend, "device": model.device,
            "dtype": model.dtype, "plan": str(ModePlan.parse(plan)), "kv_policy": kv_policy,
            "state_policy": state_policy, **response.stats.to_dict()}


# ----- text out, a token at a time -----
class TextStream:
    """Incremental detokenization with stop strings, in time linear in the output.

    Each token is decoded once, by the tokenizers library's DecodeStream (which decodes it
    against the few tokens before it, so decoders that depend on context stay right). Held
    back: tokens that end in an incomplete UTF-8 character (at most UTF8_MAX_BYTES of them;
    beyond that the bytes are invalid and go out as U+FFFD), and the last
    len(longest stop string) - 1 characters, which may still become a stop string.
    """

    def __init__(self, tokenizer, stop_strings=(), skip_special_tokens: bool = False):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop_strings = [s for s in stop_strings if s]
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.pending: list[int] = []  # tokens whose text is not out of the decoder yet
        self.tail = ""  # decoded text not yet handed out (at most holdback + one token's text, between calls)
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        """(text final now, whether a stop string was completed: then the text ends before it)."""
        if self.stopped:
            raise ValueError("TextStream: a stop string was already completed")
        piece = self.decoder.step(self.tokenizer, token)
        if piece is None:
            self.pending.append(token)
            if len(self.pending) < UTF8_MAX_BYTES:
                return "", False
            piece = self._decode_pending()
        self.pending = []
        self.tail += piece
        hits = [i for i in (self.tail.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            out, self.tail = self.tail[:min(hits)], ""
            return out, True
        cut = max(0, len(self.tail) - self.holdback)
        out, self.tail = self.tail[:cut], self.tail[cut:]
        return out, False

    def _decode_pending(self) -> str:
        """The held tokens as text (U+FFFD for invalid bytes); the decoder starts afresh after them."""
        from tokenizers.decoders import DecodeStream

        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        self.decoder = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return text

    def flush(self) -> str:
        """Everything held back (the output has ended)."""
        if self.stopped:
            return ""
        text = (self._decode_pending() if self.pending else "")
        out = self.tail + text
        self.pending, self.tail = [], ""
        return out


class NoText:
    """TextStream's stand-in when there is no tokenizer: tokens only."""

    def add(self, token: int) -> tuple[str, bool]:
        return "", False

    def flush(self) -> str:
        return ""


# ----- the generation loop -----
def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    seed: int = 0, kv_policy: str = "keep", state_policy: str = "auto", stop_strings=(),
                    stop_at_end_of_text: bool = True, stop_token_ids=None, prompt_cache=None,
                    prefill_step_size: int = 2048) -> Iterator[GenerationResponse]:
    """Yields one GenerationResponse per sampled token; the last one has stats.finish_reason set.

    model: a LoadedModel (oryx_core.backend). tokenizer: a tokenizers.Tokenizer, or None for a prompt of
    token ids and no text (every response's text is empty; no end-of-text id unless stop_token_ids). prompt: text or token ids. plan: a mode plan for
    this call (module docstring). prompt_cache: a cache from `model.make_cache()` to continue
    (updated in place; the last sampled token is not in it yet: feed it at the start of the next
    prompt to continue the same text). The prompt goes through the model in pieces of
    prefill_step_size tokens (bounds the attention scores' memory; the result is the same).
    Stops after max_tokens ("length"; 0 only prefills, yielding one empty response), at a stop token ("stop_token": the tokenizer's end-of-text
    token unless stop_at_end_of_text is False; stop_token_ids, when given, replaces it by a set,
    e.g. a chat's end-of-turn ids) or when the text completes a stop string ("stop_string"; the
    stop string is not emitted).
    """
    import numpy as np

    sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    if tokenizer is None and isinstance(prompt, str):
        raise ValueError("prompt (--prompt): text needs a tokenizer; pass token ids or a tokenizer")
    ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
    vocab = model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt (--prompt): token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    cached = 0 if prompt_cache is None else model.cache_length(prompt_cache)
    check_generation(model.config, cached, len(ids), max_tokens, kv_policy, state_policy, prefill_step_size)
    prompt_length = cached + len(ids)
    total = prompt_length + max_tokens
    plan, modes = resolve_plan(plan, total, prompt_length)
    drop_kv = kv_policy == "drop"
    drop_state = state_policy == "drop" or (state_policy == "auto" and prompt_cache is None)
    kv_dropped = state_dropped = False
    if prompt_cache is None:
        kv_dropped = drop_kv and not plan.attention_after(0, prompt_length)
        cache = model.make_cache(1, total, kv=not kv_dropped)
    else:
        cache = prompt_cache
    # a cache this call made goes back to the backend when the call ends, however it ends (a backend may reuse
    # it, with the graphs it captured for it, in a later call)
    release = getattr(model, "release_cache", None) if prompt_cache is None else None
    try:
        def drop_if_done(position: int) -> None:
            """Frees what no token from `position` on reads, once the device has finished the steps queued before (a
            step run ahead may still read it, and a backend may free the step programs that need it)."""
            nonlocal kv_dropped, state_dropped
            if drop_kv and not kv_dropped and not plan.attention_after(position, prompt_length):
                model.synchronize()
                model.drop_kv(cache)
                kv_dropped = True
                measure_memory()
            if drop_state and not state_dropped and not plan.recurrent_after(position, prompt_length):
                model.synchronize()
                model.drop_recurrent(cache)
                state_dropped = True
                measure_memory()

        def measure_memory() -> None:
            stats.cache_bytes = model.cache_nbytes(cache)
            stats.peak_memory_bytes = model.peak_memory_bytes()

        if stop_token_ids is not None:
            end_ids = {int(t) for t in stop_token_ids}
        else:
            end_ids = {end_of_text_id(tokenizer)} - {None} if stop_at_end_of_text and tokenizer is not None else set()
        text = TextStream(tokenizer, stop_strings) if tokenizer is not None else NoText()
        sample = model.sampler(sampling, ids)
        # Greedy decoding on a cache of this call's own runs ahead: token n + 1's step is queued before token n is
        # read, so the device never waits for the host. When generation stops early, the step queued for the next
        # token has fed the last token into the cache, which only this call could read; a caller's prompt_cache must
        # end without it (the docstring's contract), so it takes the step-by-step loop.
        chain = getattr(model, "greedy_chain", None)
        ahead = (chain is not None and prompt_cache is None and sampling.temperature == 0
                 and sampling.repetition_penalty == 1.0)
        stats = GenerationStats(prompt_tokens=len(ids))
        model.reset_peak_memory()
        model.synchronize()
        start = time.perf_counter()
        drop_if_done(cached)
        for begin in range(cached, prompt_length, prefill_step_size):
            end = min(begin + prefill_step_size, prompt_length)
            chunk = np.asarray([ids[begin - cached:end - cached]], dtype=np.int64)
            logits = model.prefill(cache, chunk, modes[None, begin:end])
        model.synchronize()
        stats.prompt_seconds = time.perf_counter() - start
        measure_memory()
        if max_tokens == 0:  # prefill only (e.g. to continue the cache in a later call)
            stats.finish_reason = "length"
            yield GenerationResponse("", [], stats, None)
            return
        start = time.perf_counter()
        picks = chain(cache) if ahead else None
        pick = picks.first(logits) if ahead else None
        for n in range(1, max_tokens + 1):
            position = prompt_length + n - 1  # where the sampled token sits
            if ahead:
                drop_if_done(position)  # what the queued step needs is decided by its position alone
                following = picks.step(modes[position:position + 1]) if n < max_tokens else None
                token = picks.read(pick)
            else:
                token = sample(logits)
            stats.generation_tokens = n
            if token in end_ids:
                piece, tokens, finish = text.flush(), [], "stop_token"
            else:
                piece, hit = text.add(token)
                tokens = [token]
                finish = "stop_string" if hit else ("length" if n == max_tokens else None)
                if finish == "length":
                    piece += text.flush()
            if not ahead:
                drop_if_done(position)
                model.synchronize()
            stats.generation_seconds = time.perf_counter() - start  # ahead: token n was read, so its step is done
            stats.finish_reason = finish
            if finish:
                measure_memory()
            yield GenerationResponse(piece, tokens, dataclasses.replace(stats), bool(modes[position]))
            if finish:
                return
            if ahead:
                pick = following
            else:
                logits = model.step(cache, np.asarray([token], dtype=np.int64), modes[position:position + 1])
    finally:
        if release is not None:
            release(cache)


def generate(model, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention",
             **kwargs) -> GenerationResponse:
    """The whole completion: text, output tokens and the final stats; arguments as for `stream_generate`."""
    pieces, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, plan, **kwargs):
        pieces.append(last.text)
        tokens.extend(last.tokens)
    return GenerationResponse("".join(pieces), tokens, last.stats, last.is_attention)



__all__ = ["KV_POLICIES", "STATE_POLICIES", "FINISH_REASONS", "SamplingParams", "GenerationStats",
           "GenerationResponse", "TextStream", "check_sampling", "check_generation", "check_positive_int",
           "resolve_plan", "speed_line", "json_result", "stream_generate", "generate", "PlanError"]
