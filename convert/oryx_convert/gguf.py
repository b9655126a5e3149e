"""GGUF files: parsing (through the `gguf` package), our own dequantisers, RoPE row order, tokenizer.

The `gguf` package parses the container (metadata and tensor table). Turning a tensor's
bytes into floats is done here, block by block, for the types we support:

    F32, F16, BF16  plain little-endian floats
    Q8_0  blocks of 32: float16 scale d, 32 int8 q          -> d * q
    Q4_0  blocks of 32: float16 d, 16 bytes of nibbles      -> d * (q - 8)
    Q4_1  blocks of 32: float16 d, float16 m, 16 bytes      -> d * q + m
          (byte j holds element j in its low nibble and element j + 16 in its high one)

llama.cpp stores attention Q and K rows interleaved for its RoPE kernel (the two halves of
each head's rotary pairs side by side); `unpermute_rope_rows` restores the rotate-half order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oryx_core.safetensors_io import FormatError

QUANT_BLOCK = 32


def _halves(raw: np.ndarray, start: int) -> np.ndarray:
    return raw[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] values 0..15, low nibbles first."""
    return np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.float32)


def _q8_0(raw):
    return _halves(raw, 0) * raw[:, 2:].copy().view(np.int8).astype(np.float32)


def _q4_0(raw):
    return _halves(raw, 0) * (_nibbles(raw[:, 2:]) - 8.0)


def _q4_1(raw):
    return _halves(raw, 0) * _nibbles(raw[:, 4:]) + _halves(raw, 2)


def _bf16(raw):
    return (raw.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# type name -> (bytes per block, elements per block, decoder of a [blocks, bytes] uint8 array)
DEQUANTIZERS = {
    "F32": (4, 1, lambda raw: raw.copy().view(np.float32)),
    "F16": (2, 1, lambda raw: raw.copy().view(np.float16).astype(np.float32)),
    "BF16": (2, 1, _bf16),
    "Q8_0": (2 + QUANT_BLOCK, QUANT_BLOCK, _q8_0),
    "Q4_0": (2 + QUANT_BLOCK // 2, QUANT_BLOCK, _q4_0),
    "Q4_1": (4 + QUANT_BLOCK // 2, QUANT_BLOCK, _q4_1),
}


def dequantize(raw: bytes | np.ndarray, type_name: str, shape: tuple[int, ...], name: str = "tensor") -> np.ndarray:
    """float32 array of `shape` (NumPy order) from a GGUF tensor's raw bytes."""
    if type_name not in DEQUANTIZERS:
        raise FormatError(f"GGUF tensor {name!r} has type {type_name}, unsupported; "
                          f"supported types: {', '.join(DEQUANTIZERS)}")
    block_bytes, block_elems, decode = DEQUANTIZERS[type_name]
    n = int(np.prod(shape))
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes) else np.asarray(raw).reshape(-1).view(np.uint8)
    if n % block_elems or raw.size != n // block_elems * block_bytes:
        raise FormatError(f"GGUF tensor {name!r}: {raw.size} bytes do not hold {type_name}{list(shape)}")
    return decode(raw.reshape(-1, block_bytes)).reshape(shape)


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
        return dequantize(np.asarray(t.data), t.tensor_type.name, shape, name)

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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
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
    return GGUFFile(path, metadata, {n: t.tensor_type.name for n, t in entries.items()}, entries)


# ----- tokenizer -----
# llama.cpp's pre-tokenizer names -> the `tokenizers` pre-tokenizer doing the same split.
GPT2_STYLE = ("gpt2", "gpt-2", "default", "mpt", "olmo", "jais")
DIGIT_SPLIT_STYLE = ("smollm", "starcoder", "refact", "codeshell", "command-r")
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


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
    """A byte-level BPE `tokenizers` tokenizer (as JSON) from the GGUF's vocab, merges, token types and BOS rule."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = g.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
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
    if g.get("tokenizer.ggml.add_bos_token", False):
        bos_id = int(g.require("tokenizer.ggml.bos_token_id"))
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok.to_str()
