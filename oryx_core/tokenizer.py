"""Tokenizers: a byte-level default built with the `tokenizers` library, and loading tokenizer.json."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .files import FormatError, check_regular

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # a checkpoint directory's tokenizer
MAX_TOKENIZER_BYTES = 512 * 1024 * 1024  # the largest published tokenizer.json files are tens of MiB


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte that byte-level BPE uses (GPT-2's table), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer() -> Tokenizer:
    """Token i < 256 is byte i; token 256 is <|endoftext|>. No merges: any text round-trips."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_OF_TEXT])
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json file or a checkpoint directory holding one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    size = check_regular(file)  # a FIFO or device would block the reader forever
    if size > MAX_TOKENIZER_BYTES:
        raise FormatError(f"{file}: {size} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer.json may have")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None


def tokenizer_for(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory: its tokenizer.json, else the byte-level default."""
    path = Path(path)
    return load_tokenizer(path) if (path / TOKENIZER_FILE).exists() else byte_level_tokenizer()


def end_of_text_id(tok: Tokenizer) -> int | None:
    return tok.token_to_id(END_OF_TEXT)
