"""Text generation with the MLX model: `load`, `generate`, `stream_generate`, and `oryx generate --backend mlx`.

    model, tokenizer = load("ckpt/")
    text = generate(model, tokenizer, "Once upon a time", max_tokens=100, plan="prefill-attention")
    for r in stream_generate(model, tokenizer, prompt, plan="recurrent", kv_policy="drop"):
        print(r.text, end="")

Drop policies: `kv_policy` and `state_policy` ("auto", "keep", "drop") free the KV cache
once the plan has no attention-mode token left, and the recurrent state once it has no
recurrent-mode token left (later tokens then skip the recurrent-only work: an all-attention
plan decodes as a plain Transformer). "auto" drops only from a cache the call made itself,
which no one can read afterwards, and keeps a caller's `prompt_cache`, which a later call
may continue in either mode. Defaults: kv_policy "keep", state_policy "auto".

The mode plan is per call and is resolved over absolute positions: the prompt cache may
already hold earlier tokens (pass `prompt_cache=` to continue a conversation), and
`prompt_length` for plans such as prefill-attention is everything fed before generation
starts. A cache holds every token fed to the model; the last sampled token of a call is
not in it yet (feed it at the start of the next prompt to continue the same text).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from oryx_core.plan import ModePlan
from oryx_core.tokenizer import end_of_text_id
from oryx_core.tokenizer import tokenizer_for
from oryx_core.weights import load_checkpoint

from .cache import DROP_POLICIES, cache_offset, drop_kv, drop_recurrent
from .model import OryxModel
from .quantize import quantized_model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response (may be empty while a character is incomplete)
    token: int  # the token just sampled
    is_attention: bool  # the mode this token will be fed back in
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "length", "stop_token", "stop_string", or None while running


# ----- loading -----
def load_model(path, dtype: str | None = None) -> OryxModel:
    """An OryxModel from an Oryx checkpoint directory (full precision or quantised).

    dtype casts the floating-point weights (float32, float16, bfloat16); default: as stored.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = load_checkpoint(path)
    weights = {name: mx.array(value) for name, value in ckpt.params.items()}
    if ckpt.quantization is not None:
        model = quantized_model(ckpt.config, ckpt.quantization, weights, str(ckpt.path))
    else:
        model = OryxModel(ckpt.config)
    if dtype is not None:
        weights = {n: w.astype(DTYPES[dtype]) if mx.issubdtype(w.dtype, mx.floating) else w for n, w in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path, dtype: str | None = None):
    """(model, tokenizer) of a checkpoint directory; the tokenizer is a `tokenizers.Tokenizer`."""
    return load_model(path, dtype), tokenizer_for(path)


# ----- sampling -----
def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty: logits of the tokens marked in `seen` (bool [V]) are divided (if > 0) or
    multiplied by `penalty`."""
    if penalty == 1.0:
        return logits
    return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_token(logits, key, temperature: float, top_k: int, top_p: float) -> int:
    """One token from float32 logits [V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return int(mx.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.shape[0]:
        kth = mx.sort(logits)[-top_k]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits)
        probs = mx.softmax(logits[order])
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop_sorted = (mx.cumsum(probs) - probs) >= top_p
        drop = mx.zeros(logits.shape, mx.bool_)
        drop[order] = drop_sorted
        logits = mx.where(drop, -mx.inf, logits)
    return int(mx.random.categorical(logits, key=key))


def _check_arguments(max_tokens, temperature, top_k, top_p, repetition_penalty, policies: dict, prefill_step_size):
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be an integer >= 1, got {prefill_step_size!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    for name, policy in policies.items():
        if policy not in DROP_POLICIES:
            raise ValueError(f"{name} must be one of {DROP_POLICIES}, got {policy!r}")


class _TextStream:
    """Incremental decoding with stop strings.

    Held back: an incomplete UTF-8 character (at most 4 bytes, so after 4 held tokens the
    text is invalid rather than incomplete and goes out as it is), and the last
    len(longest stop string) - 1 characters, which could still become a stop string.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.pending: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was completed; its text is not emitted)."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=False)
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return "", False
        self.pending = []
        self.text += piece
        # no stop string can start before self.emitted: it would have been complete already
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop_strings) if i >= 0]
        end = min(hits) if hits else max(self.emitted, len(self.text) - self.holdback)
        out, self.emitted = self.text[self.emitted:end], end
        return out, bool(hits)

    def flush(self) -> str:
        if self.pending:
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=False)
            self.pending = []
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def _encode(tokenizer, prompt, vocab_size: int) -> list[int]:
    ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt: needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return ids


# ----- generation -----
def stream_generate(model: OryxModel, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention",
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    seed: int = 0, kv_policy: str = "keep", state_policy: str = "auto", prompt_cache=None,
                    stop_strings=(), stop_at_end_of_text: bool = True,
                    prefill_step_size: int = 2048, stop_token_ids=None) -> Iterator[GenerationResponse]:
    """Yields one GenerationResponse per generated token.

    prompt: text or token ids. plan: a mode plan (text or ModePlan) for this call.
    kv_policy / state_policy: when to free the KV cache / the recurrent state (module docstring).
    prompt_cache: a cache from `model.make_cache()` to continue from (updated in place).
    The prompt goes through the model in pieces of prefill_step_size tokens (bounds the
    attention scores' memory; the result is the same).
    Stops after max_tokens ("length"), at the end-of-text token ("stop_token", unless
    stop_at_end_of_text is False; stop_token_ids, when given, replaces that one id by a set, e.g. a
    chat's end-of-turn ids) or when the text completes a stop string ("stop_string"; the stop string
    is not emitted).
    """
    _check_arguments(max_tokens, temperature, top_k, top_p, repetition_penalty,
                     {"kv_policy": kv_policy, "state_policy": state_policy}, prefill_step_size)
    plan = ModePlan.parse(plan)
    ids = _encode(tokenizer, prompt, model.cfg.vocab_size)
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    start = cache_offset(cache)
    prompt_length = start + len(ids)
    modes = plan.resolve(prompt_length + max_tokens, prompt_length=prompt_length)
    if stop_token_ids is not None:
        end_ids = {int(t) for t in stop_token_ids}
    else:
        end_ids = {end_of_text_id(tokenizer)} - {None} if stop_at_end_of_text else set()
    key = mx.random.key(seed)
    text_stream = _TextStream(tokenizer, stop_strings)
    # tokens already in the text, as a mask kept up to date token by token (no per-token set of
    # the whole history); only built when a penalty reads it
    seen = None
    if repetition_penalty != 1.0:
        seen = mx.zeros((model.cfg.vocab_size,), mx.bool_)
        seen[mx.array(ids)] = True

    def drops(policy):
        return policy == "drop" or (policy == "auto" and prompt_cache is None)

    drop_kv_when_done, drop_state_when_done = drops(kv_policy), drops(state_policy)

    def drop_if_done(position):
        """Frees what no token from `position` on will read."""
        if drop_kv_when_done and not cache[0].kv_dropped and not plan.attention_after(position, prompt_length):
            drop_kv(cache)
        if (drop_state_when_done and not cache[0].recurrent_dropped
                and not plan.recurrent_after(position, prompt_length)):
            drop_recurrent(cache)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    drop_if_done(start)
    for chunk in range(start, prompt_length, prefill_step_size):
        end = min(chunk + prefill_step_size, prompt_length)
        logits = model(mx.array([ids[chunk - start:end - start]]), modes[chunk:end], cache)[0, -1].astype(mx.float32)
        mx.eval(logits, [layer.state for layer in cache])
    prompt_tps = len(ids) / (time.perf_counter() - tic)
    tic = time.perf_counter()
    for n in range(1, max_tokens + 1):
        position = prompt_length + n - 1  # where the sampled token will sit
        key, subkey = mx.random.split(key)
        token = sample_token(apply_repetition_penalty(logits, seen, repetition_penalty), subkey,
                             temperature, top_k, top_p)
        if seen is not None:
            seen[token] = True
        if token in end_ids:
            text, finished = text_stream.flush(), "stop_token"
        else:
            text, hit = text_stream.add(token)
            finished = "stop_string" if hit else ("length" if n == max_tokens else None)
            if finished == "length":
                text += text_stream.flush()
        drop_if_done(position)
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(text, token, bool(modes[position]), len(ids), prompt_tps, n,
                                 n / elapsed if elapsed > 0 else float("inf"), mx.get_peak_memory() / 1e9, finished)
        if finished:
            return
        logits = model(mx.array([[token]]), modes[position:position + 1], cache)[0, -1].astype(mx.float32)


def generate(model: OryxModel, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """The whole generated text; kwargs as for `stream_generate`. verbose prints it as it comes and the speeds."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(_speed_line(last), file=sys.stderr)
    return text


def _speed_line(r: GenerationResponse) -> str:
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s; generation: {r.generation_tokens} tokens, "
            f"{r.generation_tps:.1f} tokens/s; peak memory {r.peak_memory:.3f} GB")


def cli_generate(args) -> None:
    """`oryx generate --backend mlx`: args from the shared generate parser (path, prompt, plan, max_tokens,
    temperature, top_k, top_p, repetition_penalty, seed, kv_policy, state_policy, json; dtype and stop where
    present). The call owns its cache, so the default state_policy "auto" drops the recurrent state once the
    plan has no recurrent token left."""
    dtype = getattr(args, "dtype", None)
    model, tokenizer = load(args.path, dtype)
    responses = stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, plan=args.plan,
                                temperature=args.temperature, top_k=args.top_k or 0,
                                top_p=1.0 if args.top_p is None else args.top_p,
                                repetition_penalty=args.repetition_penalty,
                                seed=args.seed, kv_policy=args.kv_policy,
                                state_policy=args.state_policy,
                                stop_strings=getattr(args, "stop", None) or ())
    text, tokens, last = "", [], None
    for last in responses:
        text += last.text
        tokens.append(last.token)
        if not args.json:
            print(last.text, end="", flush=True)
    stats = {"prompt_tokens": last.prompt_tokens, "generated_tokens": last.generation_tokens,
             "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
             "peak_memory_bytes": int(last.peak_memory * 1e9), "stop_reason": last.finish_reason} if last else {}
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "backend": "mlx", "dtype": dtype, "plan": args.plan,
                          **stats}, indent=2))
    else:
        print()
        if last is not None:
            print(_speed_line(last), file=sys.stderr)
