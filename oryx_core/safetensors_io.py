"""Reading and writing single safetensors files with NumPy, bfloat16 included, validating everything.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor to
its dtype, shape and byte range, then the raw bytes. We read and write it here (rather
than through `safetensors.numpy`) because NumPy has no bfloat16 there and because every
defect of a file must become one clear error naming the file and the tensor. Files written
here load with the `safetensors` library (tested).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """A checkpoint file or directory that is not a valid Oryx checkpoint."""


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_NAMES:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.tobytes()
        header[name] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the spec aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file, validated against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", {}) or {}
    data_start, data_size = 8 + n, size - 8 - n
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if end > data_size:
            raise FormatError(f"{path}: truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise FormatError(f"{path}: tensor {name!r}: byte range {begin}-{end} does not match {entry['dtype']}{list(shape)}")
    return header, metadata, data_start


def load_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    header, metadata, data_start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(raw[data_start + begin:data_start + end].tobytes(), dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, metadata
