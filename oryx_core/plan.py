"""Mode plans: which tokens run in attention mode (A) and which in recurrent mode (R).

A plan is written as text and resolved against a sequence length:

    attention | A                 every token in attention mode
    recurrent | R                 every token in recurrent mode
    prefill-attention             the prompt in attention, generated tokens recurrent
    last:10%   last:256           the last 10% (or last 256 tokens) in attention, the rest recurrent
    every:4:64                    chunks of 64 tokens; chunk 0, 4, 8, ... in attention
    A:0-512,R:512-                explicit spans: contiguous from 0, the last may be open

`resolve()` gives a boolean array, True where a token is in attention mode. v1 uses
one mode per token for all layers; the reference and the MLX model already take modes
broadcastable to [layers, batch, T], so a per-layer plan needs only a new kind here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


class PlanError(ValueError):
    """A mode plan that cannot be parsed or does not fit the sequence."""


POLICY_ALIASES = {
    "a": "attention", "attention": "attention", "all-attention": "attention",
    "r": "recurrent", "recurrent": "recurrent", "all-recurrent": "recurrent",
    "prefill-attention": "prefill-attention",
}
_SPAN = re.compile(r"^([AR]):(\d+)-(\d*)$")
MAX_PLAN_NUMBER = 2**53  # token counts, chunks and positions beyond this fit no sequence (and overflow int64 maths)


@dataclass(frozen=True)
class ModePlan:
    kind: str  # attention, recurrent, prefill-attention, last, every, spans
    spans: tuple[tuple[bool, int, int | None], ...] = ()  # (is_attention, start, end or None)
    last_fraction: float | None = None
    last_tokens: int | None = None
    every: int = 0
    chunk: int = 0

    # ----- parsing -----
    @classmethod
    def parse(cls, text: "str | ModePlan") -> "ModePlan":
        if isinstance(text, ModePlan):
            return text
        if not isinstance(text, str) or not text.strip():
            raise PlanError(f"plan: expected a non-empty string, got {text!r}")
        s = text.strip()
        low = s.lower()
        if low in POLICY_ALIASES:
            return cls(POLICY_ALIASES[low])
        if low.startswith("last:"):
            return cls._parse_last(s, s[5:])
        if low.startswith("every:"):
            return cls._parse_every(s)
        return cls._parse_spans(s)

    @classmethod
    def _parse_last(cls, text: str, amount: str) -> "ModePlan":
        try:
            if amount.endswith("%"):
                frac = float(amount[:-1]) / 100.0
                if not 0.0 <= frac <= 1.0:
                    raise ValueError
                return cls("last", last_fraction=frac)
            n = int(amount)
            if not 0 <= n <= MAX_PLAN_NUMBER:
                raise ValueError
            return cls("last", last_tokens=n)
        except ValueError:
            raise PlanError(f"plan {text!r}: 'last:' takes a percentage in [0%, 100%] or a token count in "
                            f"[0, 2^53]") from None

    @classmethod
    def _parse_every(cls, text: str) -> "ModePlan":
        parts = text.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            k, chunk = int(parts[1]), int(parts[2])
            if not (1 <= k <= MAX_PLAN_NUMBER and 1 <= chunk <= MAX_PLAN_NUMBER):
                raise ValueError
        except ValueError:
            raise PlanError(f"plan {text!r}: expected every:K:CHUNK with K, CHUNK in [1, 2^53] (e.g. every:4:64)") from None
        return cls("every", every=k, chunk=chunk)

    @classmethod
    def _parse_spans(cls, text: str) -> "ModePlan":
        spans = []
        expected_start = 0
        items = [p.strip() for p in text.split(",")]
        for n, item in enumerate(items):
            m = _SPAN.match(item.upper().replace(" ", ""))
            if not m:
                known = ", ".join(sorted(set(POLICY_ALIASES.values()))) + ", last:P%, every:K:CHUNK"
                raise PlanError(f"plan {text!r}: cannot read {item!r}; use spans like A:0-512,R:512- or one of: {known}")
            mode, start, end = m.group(1), int(m.group(2)), (int(m.group(3)) if m.group(3) else None)
            if max(start, end or 0) > MAX_PLAN_NUMBER:
                raise PlanError(f"plan {text!r}: span {item!r} reaches past token 2^53")
            if start != expected_start:
                what = "a gap" if start > expected_start else "an overlap"
                raise PlanError(f"plan {text!r}: span {item!r} starts at {start} but the previous one ends at "
                                f"{expected_start} ({what})")
            if end is None and n != len(items) - 1:
                raise PlanError(f"plan {text!r}: only the last span may be open-ended, not {item!r}")
            if end is not None and end <= start:
                raise PlanError(f"plan {text!r}: span {item!r} is empty or negative")
            spans.append((mode == "A", start, end))
            expected_start = end if end is not None else -1
        return cls("spans", spans=tuple(spans))

    # ----- text form -----
    def __str__(self) -> str:
        if self.kind in ("attention", "recurrent", "prefill-attention"):
            return self.kind
        if self.kind == "last":
            if self.last_fraction is not None:
                return f"last:{self.last_fraction * 100:g}%"
            return f"last:{self.last_tokens}"
        if self.kind == "every":
            return f"every:{self.every}:{self.chunk}"
        return ",".join(f"{'A' if a else 'R'}:{s}-{'' if e is None else e}" for a, s, e in self.spans)

    # ----- resolution -----
    def resolve(self, length: int, prompt_length: int | None = None) -> np.ndarray:
        """Boolean [length]: True where the token runs in attention mode."""
        if length < 0:
            raise PlanError(f"plan {self}: negative length {length}")
        return self.resolve_window(0, length, length, prompt_length)

    @property
    def needs_length(self) -> bool:
        """Whether a token's mode depends on the sequence's final length (last:), not only on its position."""
        return self.kind == "last"

    def resolve_window(self, start: int, stop: int, length: int | None,
                       prompt_length: int | None = None) -> np.ndarray:
        """Boolean [stop - start]: the modes of tokens start..stop-1 of a sequence of `length` tokens, equal to
        resolve(length)[start:stop] without building the whole sequence's modes. A text scored window by window
        resolves each window so, so that the plan's positions are positions in the whole text. `length` may be
        None (not known yet) unless the plan needs_length."""
        if not 0 <= start <= stop or (length is not None and stop > length):
            raise PlanError(f"plan {self}: tokens {start}-{stop} are not a window of a sequence of {length} tokens")
        t = np.arange(start, stop)
        if self.kind == "attention":
            return np.ones(len(t), dtype=bool)
        if self.kind == "recurrent":
            return np.zeros(len(t), dtype=bool)
        if self.kind == "prefill-attention":
            if prompt_length is None:
                raise PlanError(f"plan {self}: needs a prompt length; for plain text use spans such as A:0-512,R:512-")
            return t < prompt_length
        if self.kind == "last":
            if length is None:
                raise PlanError(f"plan {self}: needs the sequence's length")
            n = self.last_tokens if self.last_tokens is not None else int(round(self.last_fraction * length))
            return t >= length - n
        if self.kind == "every":
            return (t // self.chunk) % self.every == 0
        covered = self.spans[-1][2]
        seen = stop if length is None else length
        if covered is not None and seen > covered:
            raise PlanError(f"plan {self}: covers tokens 0-{covered} but the sequence has {seen}; "
                            f"leave the last span open (e.g. R:{covered}-)")
        modes = np.zeros(len(t), dtype=bool)
        for is_attention, span_start, span_end in self.spans:
            lo, hi = max(span_start, start), stop if span_end is None else min(span_end, stop)
            if hi > lo:
                modes[lo - start:hi - start] = is_attention
        return modes

    def attention_after(self, position: int, prompt_length: int | None = None) -> bool:
        """Whether any token at index >= position may still run in attention mode.

        Used by the KV `drop` policy: when False, the KV cache can be freed. Plans whose
        attention depends on the final length (last:) always answer True.
        """
        return self._mode_after(True, position, prompt_length)

    def recurrent_after(self, position: int, prompt_length: int | None = None) -> bool:
        """Whether any token at index >= position may still run in recurrent mode.

        Used by the recurrent-state `drop` policy: when False, the recurrent state (and the
        recurrent-only work of every later token) can be dropped. Plans whose modes depend
        on the final length (last:) always answer True, and so does prefill-attention (its
        generated tokens are recurrent, however many there are).
        """
        return self._mode_after(False, position, prompt_length)

    def _mode_after(self, attention: bool, position: int, prompt_length: int | None) -> bool:
        """Whether any token at index >= position may still run in the given mode."""
        if self.kind == "last":
            return True
        if self.kind == "every":  # chunk 0 of every K is attention; the others (if K > 1) recurrent
            return attention or self.every > 1
        if self.kind in ("attention", "recurrent"):
            return (self.kind == "attention") == attention
        if self.kind == "prefill-attention":
            if not attention:
                return True
            if prompt_length is None:
                raise PlanError(f"plan {self}: needs a prompt length")
            return position < prompt_length
        return any(is_attention == attention and (end is None or end > position)
                   for is_attention, _, end in self.spans)


def sample_training_modes(rng: np.random.Generator, batch: int, length: int, chunk: int = 64,
                          pure_share: float = 0.2) -> np.ndarray:
    """The mixed-training sampler of DESIGN.md: boolean [batch, length], True = attention.

    Each sequence is split into chunks; r ~ U[0,1] is drawn per sequence and each chunk
    is attention with probability r. A share `pure_share` of sequences is pure (half of
    them all-attention, half all-recurrent) so both modes also see whole sequences.
    """
    if chunk < 1 or length < 0 or batch < 0 or not 0.0 <= pure_share <= 1.0:
        raise PlanError(f"sample_training_modes: bad arguments batch={batch} length={length} chunk={chunk} "
                        f"pure_share={pure_share}")
    n_chunks = -(-length // chunk)
    ratio = rng.uniform(0.0, 1.0, size=(batch, 1))
    pure = rng.uniform(0.0, 1.0, size=batch) < pure_share
    ratio[pure, 0] = rng.integers(0, 2, size=int(pure.sum()))  # 1.0: all attention, 0.0: all recurrent
    chunk_modes = rng.uniform(0.0, 1.0, size=(batch, n_chunks)) < ratio
    return np.repeat(chunk_modes, chunk, axis=1)[:, :length]
