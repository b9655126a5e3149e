"""Crafted GGUF headers: every count, length, dimension and offset that does not fit the file is refused
with one FormatError before the `gguf` reader runs; valid files pass unchanged (checked against the reader)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from oryx_convert.gguf import read_gguf  # noqa: E402
from oryx_convert.gguf_header import check_gguf_header  # noqa: E402
from oryx_core.files import FormatError  # noqa: E402

F32, F16, Q8_0 = 0, 1, 8
T_UINT32, T_STRING, T_ARRAY = 4, 8, 9


def s(text, order="<") -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def kv(key, kind: int, payload: bytes, order="<") -> bytes:
    return s(key, order) + struct.pack(order + "I", kind) + payload


def array(element: int, count: int, payload: bytes, order="<") -> bytes:
    return struct.pack(order + "IQ", element, count) + payload


def tensor(name, dims, ggml_type: int, offset: int, order="<") -> bytes:
    return (s(name, order) + struct.pack(order + "I", len(dims)) + b"".join(struct.pack(order + "Q", d) for d in dims)
            + struct.pack(order + "IQ", ggml_type, offset))


A_VALUES = np.arange(4, dtype=np.float32)
Q8_BLOCK = struct.pack("<e", 0.5) + bytes(range(32))  # scale 0.5, q = 0..31


def build(kvs=None, tensors=None, data=None, version=3, n_tensors=None, n_kv=None, alignment=32, order="<",
          magic=b"GGUF", cut=0) -> bytes:
    """A GGUF file: by default two tensors ("a" F32[4] at 0, "b" Q8_0[32] at 32) and two metadata entries."""
    if kvs is None:
        kvs = [kv("general.architecture", T_STRING, s("llama", order), order),
               kv("tokenizer.ggml.tokens", T_ARRAY, array(T_STRING, 2, s("x", order) + s("y", order), order), order)]
    if tensors is None:
        tensors = [tensor("a", [4], F32, 0, order), tensor("b", [32], Q8_0, 32, order)]
    if data is None:
        a = A_VALUES.astype(order + "f4").tobytes()
        block = struct.pack(order + "e", 0.5) + bytes(range(32))
        data = a + b"\0" * (32 - len(a)) + block
    head = (magic + struct.pack(order + "I", version)
            + struct.pack(order + "QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors))
    head += b"\0" * (-len(head) % alignment)
    out = head + data
    return out[:len(out) - cut] if cut else out


def with_kv(entry: bytes) -> bytes:
    return build(kvs=[kv("general.architecture", T_STRING, s("llama")), entry])


def with_tensor(entry: bytes, data_len: int = 66) -> bytes:
    return build(tensors=[tensor("a", [4], F32, 0), entry], data=b"\0" * data_len)


CASES = [
    ("empty file", b"", "not a readable GGUF file \\(truncated"),
    ("fixed header cut", b"GGUF" + b"\3\0\0\0" + b"\0" * 10, "not a readable GGUF file \\(truncated"),
    ("wrong magic", build(magic=b"GGUG"), "no GGUF magic"),
    ("version 1", build(version=1), "version 1 is not supported"),
    ("version 4", build(version=4), "version 4 is not supported"),
    ("tensor count 2**63", build(n_tensors=2**63), "claims 9223372036854775808 tensors"),
    ("tensor count one too many", build(n_tensors=3), "corrupt header: tensor '' has 0 dimensions"),
    ("metadata count 2**40", build(n_kv=2**40), "claims 1099511627776 metadata entries"),
    ("metadata count one too many", build(n_kv=3, tensors=[], data=b"", alignment=1), "metadata key 2 length needs 8"),
    ("key length 2**62", with_kv(struct.pack("<Q", 2**62) + b"k"), "metadata key 1 needs 4611686018427387904 bytes"),
    ("key not UTF-8", with_kv(kv(b"\xff\xfe", T_UINT32, b"\0" * 4)), "not UTF-8"),
    ("duplicate key", with_kv(kv("general.architecture", T_STRING, s("llama"))), "appears twice"),
    ("unknown value type 13", with_kv(kv("x", 13, b"\0" * 8)), "unknown value type 13"),
    ("string value longer than the file", with_kv(kv("x", T_STRING, struct.pack("<Q", 10**12))), "needs 1000000000000 bytes"),
    ("u32 array of 2**60", with_kv(kv("x", T_ARRAY, array(T_UINT32, 2**60, b""))), "1152921504606846976 elements"),
    ("string array of 2**40", with_kv(kv("x", T_ARRAY, array(T_STRING, 2**40, b""))), "claims 1099511627776 elements"),
    ("array of unknown element type", with_kv(kv("x", T_ARRAY, array(99, 1, b"\0" * 8))), "unknown element type 99"),
    ("arrays nested 3 deep", with_kv(kv("x", T_ARRAY, array(T_ARRAY, 1, array(T_ARRAY, 1, array(T_UINT32, 0, b""))))),
     "nested more than 2 deep"),
    ("alignment 0", with_kv(kv("general.alignment", T_UINT32, struct.pack("<I", 0))), "power of two"),
    ("alignment 48", with_kv(kv("general.alignment", T_UINT32, struct.pack("<I", 48))), "power of two"),
    ("alignment a string", with_kv(kv("general.alignment", T_STRING, s("32"))), "power of two"),
    ("tensor name length 2**50", with_tensor(struct.pack("<Q", 2**50)), "tensor name 1 needs"),
    ("tensor name not UTF-8", with_tensor(tensor(b"\xc3(", [32], Q8_0, 32)), "not UTF-8"),
    ("tensor with 0 dimensions", with_tensor(tensor("b", [], Q8_0, 32)), "has 0 dimensions"),
    ("tensor with 5 dimensions", with_tensor(tensor("b", [32, 1, 1, 1, 1], Q8_0, 32)), "has 5 dimensions"),
    ("dimensions of 2**40", with_tensor(tensor("b", [2**40, 2**40], F32, 32)), "needs bytes 32-"),
    ("unknown GGML type 99", with_tensor(tensor("b", [32], 99, 32)), "unknown GGML type 99"),
    ("Q8_0 row of 33", with_tensor(tensor("b", [33], Q8_0, 32)), "not whole blocks of 32"),
    ("offset beyond the file", with_tensor(tensor("b", [32], Q8_0, 2**40)), "needs bytes 1099511627776-"),
    ("offset not aligned", with_tensor(tensor("b", [32], Q8_0, 17)), "not a multiple of the alignment 32"),
    ("data cut by one byte", build(cut=1), "tensor 'b' needs bytes 32-66 of the data section, the file has 65"),
    ("duplicate tensor name", with_tensor(tensor("a", [32], Q8_0, 32)), "tensor 'a' appears twice"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_gguf_header_is_refused(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(FormatError, match=message) as info:
        read_gguf(path)
    assert time.monotonic() - start < 30  # a walk over a forged count would take hours, not seconds
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("order", ["<", ">"])
def test_valid_file_passes_and_agrees_with_the_reader(tmp_path, order):
    path = tmp_path / "ok.gguf"
    path.write_bytes(build(order=order))
    header = check_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert (header.tensor_count, header.kv_count) == (2, 2)
    assert header.data_offset == reader.data_offset
    assert header.byte_order == order
    if order == ">":  # block-quantised tensors are not read from big-endian files
        with pytest.raises(FormatError, match=r"big-endian GGUF file with Q8_0 tensors \('b'\)") as info:
            read_gguf(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        return
    g = read_gguf(path)
    np.testing.assert_array_equal(g.tensor("a"), A_VALUES)
    np.testing.assert_allclose(g.tensor("b"), 0.5 * np.arange(32, dtype=np.float32))


F16_VALUES = np.linspace(-3, 3, 32).astype(np.float16)


def float_tensors_file(order: str) -> bytes:
    """"a" F32[4] at 0 and "h" F16[32] at 32, in the given byte order."""
    a = A_VALUES.astype(order + "f4").tobytes()
    return build(tensors=[tensor("a", [4], F32, 0, order), tensor("h", [32], F16, 32, order)],
                 kvs=[kv("general.architecture", T_STRING, s("llama", order), order)], order=order,
                 data=a + b"\0" * (32 - len(a)) + F16_VALUES.astype(order + "f2").tobytes())


@pytest.mark.parametrize("order", ["<", ">"])
def test_float_tensors_decode_in_either_byte_order(tmp_path, order):
    path = tmp_path / "floats.gguf"
    path.write_bytes(float_tensors_file(order))
    g = read_gguf(path)
    assert g.get("general.architecture") == "llama"
    np.testing.assert_array_equal(g.tensor("a"), A_VALUES)
    np.testing.assert_array_equal(g.tensor("h"), F16_VALUES.astype(np.float32))


def test_big_endian_file_from_the_gguf_writer_decodes(tmp_path):
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5)
    writer.add_tensor("v", F16_VALUES)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    g = read_gguf(path)
    np.testing.assert_array_equal(g.tensor("w"), np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5)
    np.testing.assert_array_equal(g.tensor("v"), F16_VALUES.astype(np.float32))


def test_convert_refuses_a_quantised_big_endian_file_in_one_line(tmp_path):
    src = tmp_path / "be.gguf"
    src.write_bytes(build(order=">"))
    done = subprocess.run([sys.executable, "-m", "oryx_core", "convert", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "big-endian" in lines[0] and "Q8_0" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_file_written_by_the_gguf_package_passes(tmp_path):
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "d"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("v", np.ones(100, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = check_gguf_header(path)
    assert header.tensor_count == 2 and header.data_offset == gguf.GGUFReader(str(path)).data_offset


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="not a regular file|a FIFO|character device"):
        read_gguf(path)


def test_convert_cli_refuses_with_one_line(tmp_path):
    """`oryx convert` on two corrupt headers (side by side): exit 2, one stderr line, seconds, nothing written."""
    procs = []
    for name, data in (("count", build(n_tensors=2**63)), ("array", with_kv(kv("x", T_ARRAY, array(T_STRING, 2**40, b""))))):
        src = tmp_path / f"{name}.gguf"
        src.write_bytes(data)
        procs.append((tmp_path / f"{name}-out", time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "oryx_core", "convert", str(src), str(tmp_path / f"{name}-out")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for out, start, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "not a readable GGUF file (corrupt header" in lines[0], stderr
        assert time.monotonic() - start < 60 and not out.exists()


def llama_metadata(**values) -> bytes:
    """A header-valid GGUF whose Llama metadata holds `values` (key -> (GGUF value type, payload bytes))."""
    entries = [kv("general.architecture", T_STRING, s("llama"))]
    entries += [kv(key, kind, payload) for key, (kind, payload) in values.items()]
    return build(kvs=entries)


U32 = lambda v: (T_UINT32, struct.pack("<I", v))  # noqa: E731
METADATA_CASES = [
    ("head_count a string", llama_metadata(**{"llama.attention.head_count": (T_STRING, s("4"))}),
     "'llama.attention.head_count' must be a positive int"),
    ("head_count 0", llama_metadata(**{"llama.attention.head_count": U32(0)}), "'llama.attention.head_count' must be a positive int"),
    ("block_count an array", llama_metadata(**{"llama.block_count": (T_ARRAY, array(T_UINT32, 1, struct.pack("<I", 2)))}),
     "'llama.block_count' must be a positive int"),
    ("architecture a number", build(kvs=[kv("general.architecture", T_UINT32, struct.pack("<I", 1))]),
     "'general.architecture' must be a str"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_mistyped_llama_metadata_is_refused(tmp_path, data, message):
    from oryx_convert.api import convert

    src = tmp_path / "bad.gguf"
    src.write_bytes(data)
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "dst", from_kind="gguf")
    assert not (tmp_path / "dst").exists()
