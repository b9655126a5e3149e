"""Reading and writing single safetensors files with NumPy, bfloat16 included, validating everything.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor to
its dtype, shape and byte range, then the raw bytes. We read and write it here (rather
than through `safetensors.numpy`) because NumPy has no bfloat16 there and because every
defect of a file must become one clear error naming the file and the tensor. Files written
here load with the `safetensors` library (tested).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .files import FormatError, open_regular, parse_json

# safetensors dtype -> NumPy's name for it (bfloat16 is ml_dtypes', which NumPy reports by that name)
NUMPY_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U32": "uint32", "U16": "uint16", "U8": "uint8",
               "BOOL": "bool"}
DTYPE_NAMES = {v: k for k, v in NUMPY_NAMES.items()}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype NumPy calls `name` (float32, bfloat16, ...). ml_dtypes, whose import costs seconds of
    command start-up, is imported only for bfloat16."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _SafetensorsDtypes(Mapping):
    """safetensors dtype name -> NumPy dtype, each made when first asked for (see numpy_dtype)."""

    def __getitem__(self, key: str) -> np.dtype:
        return numpy_dtype(NUMPY_NAMES[key])

    def __iter__(self):
        return iter(NUMPY_NAMES)

    def __len__(self) -> int:
        return len(NUMPY_NAMES)


DTYPES = _SafetensorsDtypes()
MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own cap
MAX_INDEX = 2**64  # header integers are u64 in the format


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    # the name alone would also match a byte-swapped dtype, which is not the one stored (little-endian)
    if dtype.name not in DTYPE_NAMES or DTYPES[DTYPE_NAMES[dtype.name]] != dtype:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype.name]


def _header(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed JSON header of `arrays` (in name order), padded to 8 bytes."""
    header, offset = {}, 0
    for name, arr in arrays.items():
        header[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the spec aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    return _header(arrays, metadata) + b"".join(arr.tobytes() for arr in arrays.values())


def write_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
    """Writes the bytes `encode` would give straight to `path`, one tensor at a time (no copy of the
    whole file in memory, so GB-sized shards cost no more than their largest tensor); returns their sha256."""
    import hashlib

    digest = hashlib.sha256()
    arrays = {name: tensors[name] for name in sorted(tensors)}
    with open(path, "wb") as f:
        head = _header(arrays, metadata)  # (nbytes, shape and dtype do not depend on the memory layout)
        f.write(head)
        digest.update(head)
        for arr in arrays.values():
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file, validated as the safetensors package does:
    integers are non-negative u64, the dtype is known, each byte range holds exactly its shape, and the
    ranges tile the data section from its first byte to its last, without gaps, overlaps or trailing bytes."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        text = f.read(n)
    if len(text) < n:
        raise FormatError(f"{path}: truncated safetensors header")
    header = parse_json(text, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry)
    ranges = sorted((tuple(e["data_offsets"]), name) for name, e in header.items())
    end_so_far = 0
    for (begin, end), name in ranges:
        if begin != end_so_far:
            what = "overlaps the tensor before it" if begin < end_so_far else "leaves a gap after the tensor before it"
            raise FormatError(f"{path}: tensor {name!r}: byte range {begin}-{end} {what} (which ends at {end_so_far})")
        end_so_far = end
    if end_so_far > data_size:
        raise FormatError(f"{path}: truncated: the tensors need {end_so_far} bytes of data, the file has {data_size}")
    if end_so_far < data_size:
        raise FormatError(f"{path}: {data_size - end_so_far} bytes after the last tensor (the tensors cover "
                          f"{end_so_far} of {data_size})")
    return header, metadata, data_start


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INDEX


def _check_entry(path: Path, name: str, entry) -> None:
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: tensor {name!r}: header entry must be an object, got {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{path}: tensor {name!r}: unknown dtype {dtype!r:.40} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
        raise FormatError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise FormatError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] non-negative integers, "
                          f"got {offsets!r:.80}")
    begin, end = offsets
    if end < begin or math.prod(shape) * DTYPES[dtype].itemsize != end - begin:
        raise FormatError(f"{path}: tensor {name!r}: byte range {begin}-{end} does not match {dtype}{shape}")


def read_tensors(path: Path, header: dict, data_start: int, names=None) -> dict[str, np.ndarray]:
    """The tensors of a validated header (all, or those in names), each read into its own array."""
    tensors = {}
    with open_regular(path) as f:
        for name, entry in header.items():
            if names is not None and name not in names:
                continue
            begin, end = entry["data_offsets"]
            arr = np.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
            f.seek(data_start + begin)
            if f.readinto(arr.reshape(-1).view(np.uint8)) != end - begin:
                raise FormatError(f"{path}: truncated while reading tensor {name!r} (the file changed?)")
            tensors[name] = arr
    return tensors


def load_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    header, metadata, data_start = read_header(path)
    return read_tensors(path, header, data_start), metadata
