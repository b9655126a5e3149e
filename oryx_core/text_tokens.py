"""A text file's tokens, read and tokenised in pieces, and scored window by window as they arrive, so that the
memory `oryx eval --text` needs depends on the window and the piece size, never on the file's size, and
`--max-tokens N` reads only as much of the file as N tokens need.

The tokens are those of tokenising the whole text at once. Pieces end only at a point where no tokenizer
Oryx reads (byte-level, GPT-2 / Llama-3 style regex pre-tokenisation, SentencePiece-style Metaspace) joins
the characters on either side into one pre-token: after a letter or digit followed by a space. Each piece
after the first is tokenised with the character before it in front and that character's tokens dropped, so
that a tokenizer which marks the start of its input (a prepended "▁", a BOS token) marks it once, as for the
whole text. A text with no such point in
MAX_PIECE_CHARS characters is cut after a newline followed by a letter or digit (where only Metaspace joins),
else anywhere: only there may a token or two differ from whole-text tokenisation.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

PIECE_CHARS = 1 << 18  # characters read before a piece is cut at the last safe point
MAX_PIECE_CHARS = 1 << 20
READ_BYTES = 1 << 16


def read_text_pieces(path, flag: str = "--text", read_bytes: int = READ_BYTES) -> Iterator[str]:
    """The UTF-8 text of a file in pieces of up to read_bytes bytes; one-line errors name the flag and file."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(read_bytes)
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{flag} {path}: not UTF-8 text (byte {offset + e.start})") from None
                if text:
                    yield text
                if not block:
                    return
                offset += len(block)
    except IsADirectoryError:
        raise ValueError(f"{flag} {path}: is a directory, not a text file") from None
    except OSError as e:
        raise FileNotFoundError(f"{flag} {path}: cannot read ({e.strerror})") from None


def safe_cut(text: str, end: int | None = None, newline_ok: bool = False) -> int:
    """The largest p in (1, end] with text[p-1] a letter or digit and text[p] a space (a pre-token boundary for
    every tokenizer above); failing that, if newline_ok, with text[p-1] a newline and text[p] a letter or digit
    (a boundary for all but Metaspace, which splits at spaces only); 0 when there is none."""
    last = len(text) - 1 if end is None else min(end, len(text) - 1)
    rules = [lambda prev, char: char == " " and prev.isalnum()]
    if newline_ok:
        rules.append(lambda prev, char: prev == "\n" and char.isalnum())
    for joined in rules:
        for p in range(last, 1, -1):
            if joined(text[p - 1], text[p]):
                return p
    return 0


def _cut_pieces(chunks: Iterable[str], piece_chars: int) -> Iterator[tuple[str, str]]:
    """(lead, piece) pairs: the text in pieces cut at safe points, each with the character before it ('' first)."""
    buffer, lead = "", ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > piece_chars:
            at_limit = len(buffer) >= MAX_PIECE_CHARS
            cut = safe_cut(buffer, piece_chars) or safe_cut(buffer, MAX_PIECE_CHARS, newline_ok=at_limit)
            if cut == 0:
                if not at_limit:
                    break  # read on: a cut point may come with the next chunk
                cut = len(buffer) - 1
            yield lead, buffer[:cut]
            lead, buffer = buffer[cut - 1], buffer[cut:]
    if buffer:
        yield lead, buffer


def _grouped(items: Iterable, size: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's post-processor puts before and after a whole text (a BOS, an EOS), read off by
    encoding a probe with and without them."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError("the tokenizer's post-processor changes the text's own tokens; cannot tokenise in pieces")


def encode_pieces(chunks: Iterable[str], tokenizer, max_tokens: int | None = None, piece_chars: int = PIECE_CHARS,
                  add_special_tokens: bool = True, pieces_per_call: int = 1) -> Iterator[np.ndarray]:
    """Token ids (int64) of the text in `chunks`, piece by piece, equal to tokenizer.encode(text,
    add_special_tokens).ids, stopping after max_tokens tokens. pieces_per_call pieces go to the tokenizer's
    parallel batch encoder at once (more memory, less time)."""
    before, after = special_tokens_around(tokenizer) if add_special_tokens else ([], [])
    left = max_tokens
    lead_tokens = {}  # the character before a piece is its own pre-token, so its tokens are those it has alone

    def limited(ids: list[int]) -> np.ndarray:
        nonlocal left
        ids = np.asarray(ids, dtype=np.int64)
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        return ids

    for group in _grouped(_cut_pieces(chunks, piece_chars), pieces_per_call):
        texts = [piece if not lead else lead + piece for lead, piece in group]
        for (lead, _), encoding in zip(group, tokenizer.encode_batch_fast(texts, add_special_tokens=False)):
            if lead and lead not in lead_tokens:
                lead_tokens[lead] = len(tokenizer.encode_batch_fast([lead], add_special_tokens=False)[0].ids)
            ids = limited((before if not lead else []) + encoding.ids[lead_tokens[lead] if lead else 0:])
            if len(ids):
                yield ids
            if left == 0:
                return
    if after and (ids := limited(after)).size:
        yield ids


def score_pieces(logits_fn, pieces: Iterable[np.ndarray], plan, window: int, vocab_size: int,
                 flag: str = "--text", length: int | None = None) -> tuple[float, int]:
    """Summed NLL and count of tokens[1:] of the concatenated pieces, in non-overlapping windows of `window`
    predictions (each window also holds the token before it), as oryx_core.evaluate.sequence_nll scores them:
    the plan spans the whole text. `length` (the number of predicting tokens) is needed only by a plan that
    needs_length."""
    from .evaluate import log_softmax

    total, count = 0.0, 0
    buffer = np.empty(0, dtype=np.int64)

    def score(chunk: np.ndarray) -> None:
        nonlocal total, count
        inputs, targets = chunk[:-1], chunk[1:]
        modes = plan.resolve_window(count, count + len(inputs), length)  # count: the window's first position
        logp = log_softmax(np.asarray(logits_fn(inputs[None], modes))[0])
        total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)

    for ids in pieces:
        if len(ids) and ids.max() >= vocab_size:
            raise ValueError(f"{flag}: token id {int(ids.max())} exceeds the model's vocab_size {vocab_size}")
        buffer = np.concatenate([buffer, ids])
        while len(buffer) >= window + 1:
            score(buffer[:window + 1])
            buffer = buffer[window:]
    if len(buffer) >= 2:
        score(buffer)
    return total, count


def evaluate_text_file(path, text_path, plan: str = "attention", backend: str = "reference",
                       window: int | None = None, max_tokens: int | None = None) -> dict:
    """`oryx eval --text`: mean NLL and perplexity of a text file's first max_tokens tokens (all without it)."""
    from .evaluate import backend_loader
    from .plan import ModePlan
    from .tokenizer import tokenizer_for
    from .weights import read_config

    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (one prediction needs two tokens), got {max_tokens}")
    if window is not None and window < 1:
        raise ValueError(f"--window must be a positive number of tokens, got {window}")
    plan_obj = ModePlan.parse(plan)
    cfg, _ = read_config(path)
    tokenizer = tokenizer_for(path)
    pieces = encode_pieces(read_text_pieces(Path(text_path)), tokenizer, max_tokens)
    first = next(pieces, None)  # an unreadable or empty text fails before the model is loaded
    length = None
    if plan_obj.needs_length:  # last: counts from the end, so the text is read through once before scoring
        length = sum(len(ids) for ids in encode_pieces(read_text_pieces(Path(text_path)), tokenizer, max_tokens)) - 1
    logits_fn = backend_loader(backend)(path)
    nll, count = score_pieces(logits_fn, _chain(first, pieces), plan_obj, window or cfg.max_context, cfg.vocab_size,
                              length=length)
    if count == 0:
        raise ValueError(f"--text {text_path}: needs at least 2 tokens to score")
    return {"backend": backend, "plan": str(plan_obj), "tokens": count, "nll": nll / count,
            "perplexity": float(np.exp(nll / count))}


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
