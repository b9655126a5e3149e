"""GGUF files: parsing and dequantisation (through the `gguf` package), RoPE row order, tokenizers.

The `gguf` package parses the container and decodes every tensor type it has a dequantiser
for (floats, Q4/Q5/Q8, the K-quants, the IQ and ternary types); a tensor is decoded only when
asked for, so a conversion holds one source tensor in float32 at a time.

llama.cpp stores attention Q and K rows interleaved for its RoPE kernel (the two halves of
each head's rotary pairs side by side); `unpermute_rope_rows` restores the rotate-half order.

Two vocabulary kinds are rebuilt as `tokenizers` tokenizers: byte-level BPE
(`tokenizer.ggml.model == "gpt2"`, merges stored in the file) and SentencePiece
(`"llama"`: pieces, scores and token types; a BPE with byte fallback whose merges are
recovered from the scores, since a SentencePiece BPE merges the pair whose result scores best).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oryx_core.safetensors_io import FormatError

from .gguf_header import check_gguf_header


# Tensor types the reader hands over as NumPy arrays of the file's byte order; the others come as raw block
# bytes, whose fields (fp16 scales, packed integers) in a big-endian file are swapped by some writers (llama.cpp's
# gguf_convert_endian.py) and left as they were by others (the gguf package's writer), so they cannot be decoded.
BYTE_ORDERED_TYPES = ("F32", "F16")


def supported_types() -> list[str]:
    """Names of the GGUF tensor types the installed `gguf` package dequantises."""
    import gguf

    return sorted({"F32", "F16"} | {t.name for t in gguf.quants._type_traits})


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...], name: str = "tensor") -> np.ndarray:
    """float32 array of `shape` (NumPy order) from a GGUF tensor's stored array (as the gguf reader gives it)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, type_name, None)
    if qtype is None or type_name not in supported_types():
        raise FormatError(f"GGUF tensor {name!r} has type {type_name}, unsupported; "
                          f"supported types: {', '.join(supported_types())}")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.asarray(data)
    n = int(np.prod(shape))
    if n % block_elems or raw.nbytes != n // block_elems * block_bytes:
        raise FormatError(f"GGUF tensor {name!r}: {raw.nbytes} bytes do not hold {type_name}{list(shape)}")
    if type_name in BYTE_ORDERED_TYPES:  # the reader's dtype carries the file's byte order, which a view would drop
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    raw = raw.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict  # key -> Python value (strings, numbers, lists)
    tensor_types: dict[str, str]
    _entries: dict  # name -> the gguf package's ReaderTensor

    def tensor(self, name: str) -> np.ndarray:
        """float32 tensor in NumPy order (GGUF lists dimensions innermost first)."""
        if name not in self._entries:
            raise FormatError(f"{self.path}: missing tensor {name!r}")
        t = self._entries[name]
        shape = tuple(int(s) for s in reversed(t.shape))
        return dequantize(t.data, t.tensor_type.name, shape, name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in NumPy order, without reading its data."""
        if name not in self._entries:
            raise FormatError(f"{self.path}: missing tensor {name!r}")
        return tuple(int(s) for s in reversed(self._entries[name].shape))

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise FormatError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.metadata[key]


def read_gguf(path: str | Path) -> GGUFFile:
    import gguf

    path = Path(path)
    if path.is_dir():
        raise FormatError(f"{path}: a directory; a GGUF model is one .gguf file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    header = check_gguf_header(path)  # a regular file whose counts and lengths fit it, before the reader trusts them
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
        raise FormatError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    entries = {t.name: t for t in reader.tensors}
    if header.byte_order == ">":
        blocks = [(n, t.tensor_type.name) for n, t in entries.items() if t.tensor_type.name not in BYTE_ORDERED_TYPES]
        if blocks:
            raise FormatError(f"{path}: a big-endian GGUF file with {blocks[0][1]} tensors ({blocks[0][0]!r}"
                              f"{f' and {len(blocks) - 1} more' if len(blocks) > 1 else ''}): only "
                              f"{' and '.join(BYTE_ORDERED_TYPES)} tensors are read from big-endian files; "
                              f"convert it to little-endian first (llama.cpp's gguf_convert_endian.py)")
    return GGUFFile(path, metadata, {n: t.tensor_type.name for n, t in entries.items()}, entries)


# ----- tokenizer -----
# llama.cpp's pre-tokenizer names -> the `tokenizers` pre-tokenizer doing the same split.
GPT2_STYLE = ("gpt2", "gpt-2", "default", "mpt", "olmo", "jais")
DIGIT_SPLIT_STYLE = ("smollm", "starcoder", "refact", "codeshell", "command-r")
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4
SENTENCEPIECE_SPACE = "\u2581"


def _pre_tokenizer(pre: str, where: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_STYLE:
        return byte_level
    if pre in DIGIT_SPLIT_STYLE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise FormatError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                      f"{', '.join(GPT2_STYLE + DIGIT_SPLIT_STYLE)}")


def tokenizer_json_from_gguf(g: GGUFFile) -> str:
    """A `tokenizers` tokenizer (as JSON) from the GGUF's vocabulary, merges or scores, token types and BOS rule."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = g.require("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(g).to_str()
    if kind != "gpt2":
        raise FormatError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported "
                          "(byte-level BPE 'gpt2' and SentencePiece 'llama' are)")
    tokens = g.require("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
    types = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(g.get("tokenizer.ggml.pre", "default"), str(g.path))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED])
    _add_bos_eos(tok, g, tokens, add_bos=bool(g.get("tokenizer.ggml.add_bos_token", False)))
    return tok.to_str()


def merges_from_scores(tokens: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """BPE merges that reproduce a SentencePiece BPE: every split of a mergeable token into two
    vocabulary pieces is a merge, ranked by the token's score (higher first), ties by the pieces' ids."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score, ok in zip(tokens, scores, mergeable):
        if not ok:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-float(score), ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(g: GGUFFile):
    """A Llama-style SentencePiece vocabulary as a `tokenizers` BPE with byte fallback and a "\u2581" space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in g.require("tokenizer.ggml.tokens")]
    scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = g.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    if not len(scores) == len(types) == len(tokens):
        raise FormatError(f"{g.path}: tokenizer.ggml.tokens, scores and token_type differ in length "
                          f"({len(tokens)}, {len(scores)}, {len(types)})")
    unk_id = g.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    merges = merges_from_scores(tokens, scores, [k == TOKEN_TYPE_NORMAL for k in types])
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix_space = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE, split=False,
                                                 prepend_scheme="first" if prefix_space else "never")
    steps = [decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED])
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    _add_bos_eos(tok, g, tokens, add_bos=bool(g.get("tokenizer.ggml.add_bos_token", True)))
    return tok


def _add_bos_eos(tok, g: GGUFFile, tokens: list[str], add_bos: bool) -> None:
    from tokenizers import processors

    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False))
    single, pair, special = "$A", "$A $B", []
    if add_bos:
        bos_id = int(g.require("tokenizer.ggml.bos_token_id"))
        single, pair = f"{tokens[bos_id]} {single}", f"{tokens[bos_id]} $A {tokens[bos_id]} $B"
        special.append((tokens[bos_id], bos_id))
    if add_eos:
        eos_id = int(g.require("tokenizer.ggml.eos_token_id"))
        single, pair = f"{single} {tokens[eos_id]}", f"{pair} {tokens[eos_id]}"
        special.append((tokens[eos_id], eos_id))
    if special:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict(special).items()))
