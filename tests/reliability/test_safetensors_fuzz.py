"""Crafted malformed safetensors files: each is refused with one FormatError naming the file (and the
tensor where there is one), and each one the `safetensors` package also refuses is checked against it,
so that our reader is never looser than the reference implementation."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors import safe_open

from oryx_core.safetensors_io import MAX_HEADER, FormatError, encode, load_file, read_header


def blob(header, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ONE = {"a": f32([0, 8])}
EIGHT = b"\0" * 8

# (id, file bytes, regex our FormatError must match, whether safetensors 0.8 refuses it too)
CASES = [
    ("empty file", b"", "truncated", True),
    ("3 bytes", b"\1\2\3", "truncated", True),
    ("header length beyond the file", struct.pack("<Q", 1000) + b"{}", "claims 1000 bytes", True),
    ("header length over the cap", struct.pack("<Q", MAX_HEADER + 1) + b"{}", "corrupt or truncated", True),
    ("header length 0", struct.pack("<Q", 0), "not valid JSON", True),
    ("header not JSON", blob(None, raw=b"{nope"), "not valid JSON", True),
    ("header not UTF-8", blob(None, raw=b'{"\xff\xfe":1}'), "not UTF-8", True),
    ("header a list", blob([1, 2]), "not an object", True),
    ("header a string", blob("x"), "not an object", True),
    ("header a number", blob(7), "not an object", True),
    ("NUL padding after the JSON", blob(None, EIGHT, raw=json.dumps(ONE).encode() + b"\0\0"), "not valid JSON", True),
    ("entry a list", blob({"a": [0, 8]}), "must be an object", True),
    ("entry a string", blob({"a": "F32"}), "must be an object", True),
    ("entry without dtype", blob({"a": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT), "unknown dtype", True),
    ("entry without shape", blob({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, EIGHT), "shape must be", True),
    ("entry without offsets", blob({"a": {"dtype": "F32", "shape": [2]}}, EIGHT), "data_offsets must be", True),
    ("unknown dtype", blob({"a": f32([0, 8], dtype="F33")}, EIGHT), "unknown dtype 'F33'", True),
    ("dtype a number", blob({"a": f32([0, 8], dtype=4)}, EIGHT), "unknown dtype", True),
    ("dtype lower case", blob({"a": f32([0, 8], dtype="f32")}, EIGHT), "unknown dtype", True),
    ("shape of floats", blob({"a": f32([0, 8], [2.0])}, EIGHT), "shape must be", True),
    ("shape of strings", blob({"a": f32([0, 8], ["2"])}, EIGHT), "shape must be", True),
    ("shape of booleans", blob({"a": f32([0, 8], [True, 2])}, EIGHT), "shape must be", True),
    ("negative dimension", blob({"a": f32([0, 8], [-2])}, EIGHT), "shape must be", True),
    ("dimension 2**64", blob({"a": f32([0, 0], [0, 2**64])}), "shape must be", True),
    ("shape a number", blob({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, EIGHT), "shape must be", True),
    ("shape null", blob({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 8]}}, EIGHT), "shape must be", True),
    ("offsets of floats", blob({"a": f32([0, 8.0])}, EIGHT), "data_offsets must be", True),
    ("offsets 1e3", blob(None, EIGHT, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}'),
     "data_offsets must be", True),
    ("negative offset", blob({"a": f32([-8, 0])}, EIGHT), "data_offsets must be", True),
    ("three offsets", blob({"a": f32([0, 8, 8])}, EIGHT), "data_offsets must be", True),
    ("one offset", blob({"a": f32([8])}, EIGHT), "data_offsets must be", True),
    ("offsets a string", blob({"a": f32("08")}, EIGHT), "data_offsets must be", True),
    ("offset 2**64", blob({"a": f32([0, 2**64])}, EIGHT), "data_offsets must be", True),
    ("end before begin", blob({"a": f32([8, 0], [0])}, EIGHT), "does not match", True),
    ("range smaller than the shape", blob({"a": f32([0, 8], [3])}, EIGHT), "does not match", True),
    ("range larger than the shape", blob({"a": f32([0, 12], [2])}, b"\0" * 12), "does not match", True),
    ("shape product overflowing u64", blob({"a": f32([0, 8], [2**62, 2**62])}, EIGHT), "does not match", True),
    ("overlapping tensors", blob({"a": f32([0, 8]), "b": f32([4, 12])}, b"\0" * 12), "overlaps", True),
    ("two tensors on the same bytes", blob({"a": f32([0, 8]), "b": f32([0, 8])}, EIGHT), "overlaps", True),
    ("gap between tensors", blob({"a": f32([0, 8]), "b": f32([12, 20])}, b"\0" * 20), "gap", True),
    ("first tensor not at 0", blob({"a": f32([4, 12])}, b"\0" * 12), "gap", True),
    ("trailing bytes", blob(ONE, b"\0" * 12), "4 bytes after the last tensor", True),
    ("trailing bytes, no tensors", blob({}, b"\0"), "1 bytes after the last tensor", True),
    ("truncated data", blob(ONE, b"\0" * 5), "truncated", True),
    ("data missing", blob({"a": f32([0, 8]), "b": f32([8, 16])}, EIGHT), "truncated", True),
    ("metadata value a number", blob({**ONE, "__metadata__": {"x": 1}}, EIGHT), "strings to strings", True),
    ("metadata value null", blob({**ONE, "__metadata__": {"x": None}}, EIGHT), "strings to strings", True),
    ("metadata value a list", blob({**ONE, "__metadata__": {"x": ["y"]}}, EIGHT), "strings to strings", True),
    ("metadata a list", blob({**ONE, "__metadata__": [1]}, EIGHT), "strings to strings", True),
    ("metadata a string", blob({**ONE, "__metadata__": "x"}, EIGHT), "strings to strings", True),
    ("NaN in the header", blob(None, EIGHT, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}'),
     "not valid JSON", True),
    ("100k-deep nesting", blob(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested", True),
    # stricter than safetensors 0.8, which keeps the last of two equal keys
    ("duplicate tensor name", blob(None, EIGHT, raw=b'{"a":' + json.dumps(f32([0, 8])).encode() + b',"a":'
                                   + json.dumps(f32([0, 8])).encode() + b"}"), "duplicate key", False),
]


@pytest.mark.parametrize("data, message, reference_refuses", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_safetensors_is_refused(tmp_path, data, message, reference_refuses):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message) as info:
        load_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    if reference_refuses:
        with pytest.raises(Exception):
            with safe_open(str(path), "np") as f:
                for key in f.keys():
                    f.get_tensor(key)


def test_the_tensor_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob({"ok": f32([0, 8]), "layers.3.w": f32([8, 16], ["2"])}, b"\0" * 16))
    with pytest.raises(FormatError, match=r"tensor 'layers.3.w': shape must be"):
        read_header(path)


def test_valid_edge_cases_load_like_safetensors(tmp_path):
    """Empty tensors, zero-size tensors next to others, null metadata and space padding are all valid."""
    path = tmp_path / "ok.safetensors"
    values = np.arange(6, dtype=np.float32)
    header = {"z": f32([0, 0], [0, 5]), "v": f32([0, 24], [2, 3]), "e": f32([24, 24], [0]), "__metadata__": None}
    path.write_bytes(blob(None, values.tobytes(), raw=json.dumps(header).encode() + b"    "))
    tensors, metadata = load_file(path)
    assert metadata == {}
    assert tensors["z"].shape == (0, 5) and tensors["e"].shape == (0,)
    np.testing.assert_array_equal(tensors["v"], values.reshape(2, 3))
    with safe_open(str(path), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("v"), tensors["v"])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(encode({}, {"format": "pt"}))
    assert load_file(empty) == ({}, {"format": "pt"})


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlink-to-dev-zero", "directory", "missing", "dangling-symlink"])
def test_not_a_regular_file_is_refused_without_blocking(tmp_path, no_hang, kind):
    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = type(path)("/dev/zero")
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    message = {"fifo": "a FIFO", "dev-zero": "character device", "symlink-to-dev-zero": "character device",
               "directory": "a directory", "missing": "no such file", "dangling-symlink": "no such file"}[kind]
    with pytest.raises(FormatError, match=message):
        load_file(path)
