"""A bounds-checked walk over a GGUF file's header, run before the `gguf` package reads it.

The `gguf` reader trusts the counts and lengths it finds (tensor count, metadata count, string
lengths, array lengths, dimensions, data offsets): a few corrupted bytes make it loop over billions
of entries or build huge arrays. This walk reads the same layout with every count and length checked
against the bytes left in the file, so any inconsistency is one FormatError naming the file and the
field, and only a header that fits its file reaches the reader.

Layout (versions 2 and 3; either byte order, told apart as the reader does, by the version's low half):
magic "GGUF", version u32, tensor count u64, metadata count u64; each metadata entry is a string key,
a u32 value type and a value; each tensor entry is a string name, u32 dimension count, u64 dimensions,
u32 GGML type and u64 offset; the data section starts at the next multiple of general.alignment
(default 32). A string is a u64 length and that many UTF-8 bytes; an array a u32 element type, a u64
count and the elements.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from oryx_core.files import FormatError, open_regular

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2
DEFAULT_ALIGNMENT = 32
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY, UINT32 = 8, 9, 4
MIN_ENTRY = 8 + 4 + 1  # the smallest metadata entry: empty key, type, one byte
MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # the smallest tensor entry: empty name, one dimension, type, offset


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    kv_count: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    byte_order: str = "<"  # the struct prefix of the file's integers: "<" little-endian, ">" big-endian


class _Walk:
    def __init__(self, path: Path, data, size: int):
        self.path, self.data, self.size, self.pos, self.order = path, data, size, 0, "<"

    def fail(self, message: str):
        raise FormatError(f"{self.path}: not a readable GGUF file (corrupt header: {message})")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.size}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return struct.unpack(self.order + "I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack(self.order + "Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {self.pos - n} is not UTF-8")

    def value(self, kind: int, what: str, nesting: int = 0):
        """Steps over one value; returns it for scalars and strings (the walk only needs general.alignment)."""
        if kind in SCALAR_SIZES:
            raw = self.take(SCALAR_SIZES[kind], what)
            return struct.unpack(self.order + "I", raw)[0] if kind == UINT32 else None
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            self.fail(f"{what} has unknown value type {kind}")
        if nesting >= MAX_ARRAY_NESTING:
            self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        element, count = self.u32(f"{what} element type"), self.u64(f"{what} length")
        if element in SCALAR_SIZES:
            self.take(count * SCALAR_SIZES[element], f"{what} ({count} elements)")
            return None
        least = 8 if element == STRING else 12 if element == ARRAY else 0
        if not least:
            self.fail(f"{what} has unknown element type {element}")
        if count * least > self.size - self.pos:
            self.fail(f"{what} claims {count} elements, more than the {self.size - self.pos} bytes left can hold")
        for _ in range(count):
            self.value(element, what, nesting + 1)
        return None


def check_gguf_header(path: str | Path) -> GGUFHeader:
    """Walks path's GGUF header with every count checked against the file size; FormatError on any defect."""
    import gguf

    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FormatError(f"{path}: not a readable GGUF file (truncated: {size} bytes, the fixed header alone is 24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(_Walk(path, data, size), gguf)


def _walk(w: _Walk, gguf) -> GGUFHeader:
    if w.take(4, "magic") != b"GGUF":
        w.fail("no GGUF magic")
    version = w.u32("version")
    if version & 0xFFFF == 0:  # written in the other byte order
        w.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        w.fail(f"version {version} is not supported (only {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count, kv_count = w.u64("tensor count"), w.u64("metadata count")
    left = w.size - w.pos
    if kv_count * MIN_ENTRY > left:
        w.fail(f"claims {kv_count} metadata entries, more than the file's {left} remaining bytes can hold")
    if tensor_count * MIN_TENSOR > left:
        w.fail(f"claims {tensor_count} tensors, more than the file's {left} remaining bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    keys = set()
    for i in range(kv_count):
        key = w.string(f"metadata key {i}")
        if key in keys:
            w.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        kind = w.u32(f"type of {key!r}")
        value = w.value(kind, f"metadata {key!r}")
        if key == "general.alignment":
            if kind != UINT32 or not value or value & (value - 1):
                w.fail(f"general.alignment must be a u32 power of two, got type {kind} value {value!r}")
            alignment = value
    tensors = {}
    for i in range(tensor_count):
        name = w.string(f"tensor name {i}")
        if name in tensors:
            w.fail(f"tensor {name!r} appears twice")
        n_dims = w.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            w.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [w.u64(f"tensor {name!r} dimension") for _ in range(n_dims)]
        kind, offset = w.u32(f"tensor {name!r} type"), w.u64(f"tensor {name!r} offset")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            w.fail(f"tensor {name!r} has unknown GGML type {kind}")
        if dims[0] % block:
            w.fail(f"tensor {name!r}: rows of {dims[0]} are not whole blocks of {block}")
        elements = 1
        for d in dims:
            elements *= d
        tensors[name] = (offset, elements // block * type_size)
    data_offset = -(-w.pos // alignment) * alignment
    data_size = w.size - data_offset
    for name, (offset, nbytes) in tensors.items():
        if offset % alignment:
            w.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            w.fail(f"tensor {name!r} needs bytes {offset}-{offset + nbytes} of the data section, the file has "
                   f"{max(data_size, 0)} (truncated?)")
    return GGUFHeader(version, tensor_count, kv_count, alignment, data_offset, w.order)
