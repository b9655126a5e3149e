"""Training data: `oryx data build` turns text into memory-mapped token shards; `TokenShards` reads them.

Inputs are UTF-8 text files, directories (every non-hidden file below them, in sorted
order), `.xz` files (one compressed text) and `.tar.xz`/`.txz` archives (every regular
member is a file), all read as streams.

Documents. The marker `<|endoftext|>` ends a document wherever it appears; with
`blank_lines=N` (> 0) a run of N or more blank lines also ends one. A file (or archive
member) without either is a single document, so a directory of files is a corpus of
documents. Each document is stripped of leading and trailing whitespace; empty ones are
dropped. A document that is not valid UTF-8 is skipped with a warning (a file without
separators is one document, so a non-UTF-8 file is skipped whole), or is an error with
`strict_utf8`.

Splits. A document goes to `val` when a keyed hash of its text (key = the seed) falls below
`val_fraction`, else to `train`: whole documents, the same assignment for the same seed
whatever the input order, and identical documents always land in the same split.

Layout of the output directory (written to a temp directory and renamed into place):

    meta.json        {"format": "oryx-tokens", "version": 1, "dtype": "uint16"|"uint32",
                      "vocab_size": V, "eot_id": id, "splits": {"train": [...], "val": [...]},
                      "tokens": {"train": N, "val": M}, "documents": {...}, ...}
    tokenizer.json   the tokenizer that made the ids
    train-00000.bin  flat little-endian token ids; each document is followed by eot_id
    val-00000.bin

A split's token stream is its shards concatenated in order; shards are cut every
`shard_tokens` tokens, so a document may continue into the next shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from oryx_core.atomic import atomic_directory
from oryx_core.files import check_file_name, member as directory_member, read_json_object
from oryx_core.safetensors_io import FormatError
from oryx_core.output import check_output
from oryx_core.text_tokens import encode_pieces
from oryx_core.tokenizer import END_OF_TEXT, byte_level_tokenizer, end_of_text_id, load_tokenizer

FORMAT = "oryx-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
DEFAULT_VOCAB_SIZE = 8192
ENCODE_BATCH_CHARS = 4 << 20  # text handed to the tokenizer's parallel batch encoder at once
# A longer document is tokenised in pieces (oryx_core.text_tokens, same tokens): whole, the tokenizer's
# encoding of it needs about 140 bytes per character.
LONG_DOCUMENT_CHARS = 1 << 20
MARKER = END_OF_TEXT.encode()
TAR_SUFFIXES = (".tar.xz", ".txz")
# The GPT-2 tokenizer, built by scripts/corpus/fetch_gpt2_tokenizer.sh; package data, so it ships in the wheel.
GPT2_TOKENIZER_PATH = Path(__file__).resolve().parent / "gpt2-tokenizer.json"

Warn = Callable[[str], None]


def _warn_stderr(message: str) -> None:
    from tqdm import tqdm  # tqdm.write keeps a running progress bar intact

    tqdm.write(f"oryx data: warning: {message}", file=sys.stderr)


# ----- reading documents -----
@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file (or archive:member) and the document's number inside it


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The files named by `inputs`: files as given, directories expanded to their non-hidden files."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise ValueError(f"--input {item}: not a regular file or directory")
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory")
    if not files:
        raise ValueError(f"--input {' '.join(map(str, inputs)) or '(none)'}: no files to read")
    return files


def _streams(path: Path, raw: BinaryIO) -> Iterator[tuple[str, BinaryIO]]:
    """(name, binary stream) of each text inside one input file."""
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        with tarfile.open(fileobj=raw, mode="r|xz") as archive:
            for member in archive:
                if member.isfile():
                    yield f"{path}:{member.name}", archive.extractfile(member)
    elif name.endswith(".xz"):
        with lzma.open(raw) as stream:
            yield str(path), io.BufferedReader(stream, 1 << 20)  # LZMAFile.readline alone is slow Python
    else:
        yield str(path), raw


def _split_bytes(stream: BinaryIO, blank_lines: int) -> Iterator[bytes]:
    """The raw bytes of each document in a stream (see the module docstring for the rule)."""
    current, blank_run = [], 0
    for line in stream:
        if MARKER in line:
            first, *middle, last = line.split(MARKER)
            yield b"".join(current + [first])
            yield from middle
            current, blank_run = [last], 0
            continue
        if blank_lines and not line.strip():
            blank_run += 1
            if blank_run == blank_lines:
                yield b"".join(current)
                current = []
        else:
            blank_run = 0
        current.append(line)
    yield b"".join(current)


def iter_documents(inputs: Iterable[str | Path], blank_lines: int = 0, strict_utf8: bool = False,
                   warn: Warn = _warn_stderr, progress=None) -> Iterator[Document]:
    """Every non-empty document of the inputs, in order. `progress.update(n)` gets the on-disk bytes read."""
    if blank_lines < 0:
        raise ValueError(f"--blank-lines must be >= 0, got {blank_lines}")
    for path in expand_inputs(inputs):
        with open(path, "rb") as raw:
            consumed = 0
            try:
                for source, stream in _streams(path, raw):
                    for number, chunk in enumerate(_split_bytes(stream, blank_lines)):
                        text = _decode(chunk, f"{source}#{number}", strict_utf8, warn)
                        if progress is not None:
                            progress.update(raw.tell() - consumed)
                            consumed = raw.tell()
                        if text:
                            yield Document(text, f"{source}#{number}")
            except (lzma.LZMAError, tarfile.TarError, EOFError) as e:
                raise ValueError(f"--input {path}: corrupt or truncated archive ({e})") from None


def _decode(chunk: bytes, where: str, strict_utf8: bool, warn: Warn) -> str:
    try:
        return chunk.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as e:
        message = f"{where}: not UTF-8 text (byte {e.start} of the document: {chunk[e.start:e.start + 4]!r})"
        if strict_utf8:
            raise ValueError(f"{message}; drop --strict-utf8 to skip such documents") from None
        warn(f"{message}; skipped")
        return ""


def assign_split(text: str, val_fraction: float, seed: int) -> str:
    """'val' or 'train' for a document, from a hash of its text keyed by the seed."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return "val" if int.from_bytes(digest, "little") / 2.0**64 < val_fraction else "train"


# ----- tokenizers -----
def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenisation) trained on `texts`; id 0 is <|endoftext|>.

    Any text round-trips: every byte has a token, so nothing maps to an unknown token.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"--vocab-size must be at least {len(alphabet) + 1} (256 bytes + <|endoftext|>), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=alphabet, show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    return tok


def gpt2_tokenizer_from_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
    """GPT-2's tokenizer from its two published files: encoder.json (token -> id) and vocab.bpe (the merges)."""
    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise FormatError(f"{vocab_bpe}: a merge line must hold two symbols, got {' '.join(bad[0])!r}")
    if END_OF_TEXT not in vocab:
        raise FormatError(f"{encoder_json}: no {END_OF_TEXT} entry; not GPT-2's encoder.json")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer shipped with this package (oryx_data/gpt2-tokenizer.json; no network needed)."""
    if not GPT2_TOKENIZER_PATH.exists():
        raise FileNotFoundError(f"--gpt2: {GPT2_TOKENIZER_PATH} is missing; build it with "
                                "scripts/corpus/fetch_gpt2_tokenizer.sh")
    return load_tokenizer(GPT2_TOKENIZER_PATH)


# ----- writing shards -----
class _ShardWriter:
    """Appends token ids to NAME-00000.bin, NAME-00001.bin, ..., starting a new file every shard_tokens tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            room = self.shard_tokens - self.tokens % self.shard_tokens
            if self.tokens % self.shard_tokens == 0:
                self._open_next()
            self._file.write(ids[:room].tobytes())
            self.tokens += min(room, len(ids))
            ids = ids[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.files.append(name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The id dtype for a vocabulary: uint16 when every id fits, else uint32 (or the one requested, checked)."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in TOKEN_DTYPES:
        raise ValueError(f"--dtype must be auto, uint16 or uint32, got {requested!r}")
    if vocab_size > 1 << (8 * TOKEN_DTYPES[requested].itemsize):
        raise ValueError(f"--dtype {requested} holds ids below {1 << (8 * TOKEN_DTYPES[requested].itemsize)}, "
                         f"but the tokenizer has {vocab_size} tokens; use uint32")
    return requested


def _batches(documents: Iterable[Document], max_chars: int) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def build_shards(inputs: Iterable[str | Path], out: str | Path, tokenizer: Tokenizer | None = None,
                 train_vocab_size: int | None = None, val_fraction: float = 0.01, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 seed: int = 0, blank_lines: int = 0, strict_utf8: bool = False, dtype: str = "auto",
                 warn: Warn = _warn_stderr, show_progress: bool = False) -> dict:
    """Tokenises the inputs into a shard directory at `out` (see the module docstring); returns its meta.

    The tokenizer is `tokenizer`, or one trained on the train split with `train_vocab_size`
    tokens (an extra pass over the inputs), or the byte-level default.
    """
    inputs = [str(i) for i in inputs]
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    if tokenizer is not None and train_vocab_size is not None:
        raise ValueError("pass a tokenizer or a vocabulary size to train one, not both")
    files = expand_inputs(inputs)  # missing inputs fail here, before any work
    check_output(out, None, [("--input", i) for i in inputs], force=True, flag="--out")  # never over what it reads

    def documents(desc: str) -> Iterator[Document]:
        from tqdm import tqdm

        with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=desc,
                  disable=None if show_progress else True, file=sys.stderr) as bar:  # None: only on a terminal
            yield from iter_documents(inputs, blank_lines, strict_utf8, warn, progress=bar)

    if train_vocab_size is not None:
        train_texts = (d.text for d in documents("reading for the tokenizer")
                       if assign_split(d.text, val_fraction, seed) == "train")
        tokenizer = train_tokenizer(train_texts, train_vocab_size, show_progress=show_progress)
        warn = _quiet  # the same documents are read again below; their warnings were given once
    tokenizer = tokenizer or byte_level_tokenizer()
    eot_id = end_of_text_id(tokenizer)
    if eot_id is None:
        raise ValueError(f"--tokenizer: has no {END_OF_TEXT} token to separate documents")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    stored = token_dtype(vocab_size, dtype)

    def fill(tmp: Path) -> dict:
        writers = {s: _ShardWriter(tmp, s, TOKEN_DTYPES[stored], shard_tokens) for s in SPLITS}
        counts = {s: 0 for s in SPLITS}
        try:
            for batch in _batches(documents("tokenising"), ENCODE_BATCH_CHARS):
                short = [d.text for d in batch if len(d.text) <= LONG_DOCUMENT_CHARS]
                encodings = iter(tokenizer.encode_batch_fast(short, add_special_tokens=False))
                pieces = {s: [] for s in SPLITS}
                for doc in batch:
                    split = assign_split(doc.text, val_fraction, seed)
                    counts[split] += 1
                    if len(doc.text) <= LONG_DOCUMENT_CHARS:
                        pieces[split] += [next(encodings).ids, [eot_id]]
                        continue
                    if pieces[split]:  # what came before it, in order
                        writers[split].write(np.concatenate(pieces[split]))
                        pieces[split] = []
                    for ids in encode_pieces([doc.text], tokenizer, add_special_tokens=False, pieces_per_call=4):
                        writers[split].write(ids)
                    writers[split].write(np.array([eot_id]))
                for split, ids in pieces.items():
                    if ids:
                        writers[split].write(np.concatenate(ids))
        finally:
            for w in writers.values():
                w.close()
        if counts["train"] == 0:
            raise ValueError(f"--input {' '.join(inputs)}: no non-empty UTF-8 documents for the train split")
        if val_fraction > 0 and counts["val"] == 0:
            raise ValueError(f"--val-fraction {val_fraction} put none of the {counts['train']} documents in val; "
                             "raise it, split files into more documents (--blank-lines), or pass --val-fraction 0")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": stored, "vocab_size": vocab_size,
                "eot_id": eot_id, "splits": {s: writers[s].files for s in SPLITS},
                "tokens": {s: writers[s].tokens for s in SPLITS}, "documents": counts,
                "val_fraction": val_fraction, "seed": seed, "blank_lines": blank_lines, "shard_tokens": shard_tokens}
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return meta

    written = {}
    atomic_directory(out, lambda tmp: written.update(fill(tmp)))
    return written


def _quiet(message: str) -> None:
    """Drops a warning already given."""


# ----- reading shards -----
def read_meta(path: str | Path) -> dict:
    """The validated meta.json of a token shard directory."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: no {META_FILE}; not a token shard directory (make one with `oryx data build`)")
    meta = read_json_object(meta_path)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{meta_path}: not a token shard directory (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{meta_path}: unknown version {meta.get('version')!r} (this Oryx reads {FORMAT_VERSION})")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise FormatError(f"{meta_path}: dtype must be one of {list(TOKEN_DTYPES)}, got {meta.get('dtype')!r}")
    for key, kind in (("vocab_size", int), ("eot_id", int), ("splits", dict), ("tokens", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise FormatError(f"{meta_path}: missing or malformed {key!r}")
    id_limit = np.iinfo(TOKEN_DTYPES[meta["dtype"]]).max + 1
    if not 1 <= meta["vocab_size"] <= id_limit:
        raise FormatError(f"{meta_path}: vocab_size must be in [1, {id_limit}] for {meta['dtype']} tokens, "
                          f"got {meta['vocab_size']}")
    if not 0 <= meta["eot_id"] < meta["vocab_size"]:
        raise FormatError(f"{meta_path}: eot_id {meta['eot_id']} is not a token id below vocab_size {meta['vocab_size']}")
    for split, files in meta["splits"].items():
        if not isinstance(files, list):
            raise FormatError(f"{meta_path}: splits[{split!r}] must be a list of shard file names")
        for name in files:
            check_file_name(name, f"{meta_path}: splits[{split!r}]")
        count = meta["tokens"].get(split)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise FormatError(f"{meta_path}: tokens[{split!r}] must be an integer >= 0, got {count!r:.40}")
    return meta


class ConcatenatedTokens:
    """One split's token stream over its memory-mapped shards, without copying them.

    Supports len(), integer indexing and step-1 slices (which return a NumPy array in the stored dtype).
    """

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype):
        self.shards, self.dtype = shards, dtype
        self.offsets = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError(f"token slices must have step 1, got {step}")
            return self._range(start, max(stop, start))
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token index {key} out of range for {len(self)} tokens")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard][index - self.offsets[shard]]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        for shard in range(max(first, 0), len(self.shards)):
            lo, hi = self.offsets[shard], self.offsets[shard + 1]
            if lo >= stop:
                break
            pieces.append(np.asarray(self.shards[shard][max(start, lo) - lo:min(stop, hi) - lo]))
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def __array__(self, dtype=None, copy=None):
        whole = self._range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)


class TokenShards:
    """One split of a token shard directory, memory-mapped: `tokens`, `len()`, `window()`, `sample_windows()`."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: no split {split!r} (it has {', '.join(self.meta['splits'])})")
        self.split = split
        self.dtype = TOKEN_DTYPES[self.meta["dtype"]]
        self.vocab_size, self.eot_id = self.meta["vocab_size"], self.meta["eot_id"]
        self.tokens = ConcatenatedTokens([self._map(name) for name in self.meta["splits"][split]], self.dtype)
        expected = self.meta["tokens"].get(split)
        if len(self.tokens) != expected:
            raise FormatError(f"{self.path / META_FILE}: split {split!r} should hold {expected} tokens, "
                              f"its shards hold {len(self.tokens)}")

    def _map(self, name: str) -> np.ndarray:
        file = self.path / name
        if not file.exists() and not file.is_symlink():
            raise FormatError(f"{self.path}: missing shard {name} named in {META_FILE}")
        directory_member(self.path, name, str(self.path / META_FILE))
        size = file.stat().st_size
        if size == 0 or size % self.dtype.itemsize:
            raise FormatError(f"{file}: {size} bytes is not a whole number of {self.meta['dtype']} tokens")
        return np.memmap(file, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / TOKENIZER_FILE)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1 as int64 (a copy)."""
        if length < 0 or start < 0 or start + length > len(self):
            raise ValueError(f"window start={start} length={length} lies outside the {len(self)} "
                             f"{self.split} tokens of {self.path}")
        return self.tokens[start:start + length].astype(np.int64)

    def sample_windows(self, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
        """int64 [batch, seq_len]: windows at starts drawn uniformly by `rng` (for training, seq_len = context + 1)."""
        if seq_len > len(self):
            raise ValueError(f"seq_len {seq_len} exceeds the {len(self)} {self.split} tokens of {self.path}")
        starts = rng.integers(0, len(self) - seq_len + 1, size=batch)
        return np.stack([self.window(int(s), seq_len) for s in starts]) if batch else np.empty((0, seq_len), np.int64)


def split_text(path: str | Path, split: str, separators: bool = True) -> str:
    """The documents of one split as text: separated by an `<|endoftext|>` line (what `oryx data build`
    reads back), or run together (separators=False: the token stream decoded whole, as the held-out
    texts of docs/results.md were made)."""
    shards = TokenShards(path, split)
    tokens = np.asarray(shards.tokens)
    ends = np.flatnonzero(tokens == shards.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    tokenizer = shards.tokenizer()
    documents = tokenizer.decode_batch([tokens[a:b].tolist() for a, b in zip(starts, ends)])
    return (f"\n{END_OF_TEXT}\n" if separators else "").join(documents)
