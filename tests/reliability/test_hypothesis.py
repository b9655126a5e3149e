"""Property-based fuzzing (hypothesis) of the safetensors header reader and the mode-plan parser.

Safetensors: random valid files round-trip bit for bit (and agree with the safetensors package); random
mutations of a valid file, at the byte level and at the level of header fields, are either accepted
with every tensor's bytes consistent with its header (and then the safetensors package accepts the file
too) or refused with FormatError, never another exception.

Plans: any string either parses to a plan or raises PlanError; a parsed plan prints to text that parses
back to the same plan; resolving it at any length gives a boolean array of that length (or PlanError),
equal over any window to resolve_window, and the drop policies never free what a later token needs."""
from __future__ import annotations

import json
import struct
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from oryx_core.plan import ModePlan, PlanError
from oryx_core.safetensors_io import DTYPES, FormatError, encode, load_file

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NUMPY_DTYPES = [d for d in DTYPES.values() if d != np.dtype(ml_dtypes.bfloat16)]

# ----- safetensors -----
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12).filter(lambda n: n != "__metadata__")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def tensor_dicts(draw, dtypes=tuple(DTYPES.values())):
    out = {}
    for name in draw(st.lists(names, min_size=0, max_size=5, unique=True)):
        dtype = draw(st.sampled_from(dtypes))
        shape = tuple(draw(shapes)) or (1,)  # encode stores a 0-d array as [1]
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
        out[name] = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape) if raw else np.zeros(shape, dtype)
    return out


metadata = st.one_of(st.none(), st.dictionaries(names, st.text(max_size=10), max_size=3))


@settings(SETTINGS, max_examples=60)
@given(tensors=tensor_dicts(), meta=metadata)
def test_valid_files_round_trip(tmp_path, tensors, meta):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(encode(tensors, meta))
    loaded, loaded_meta = load_file(path)
    assert loaded_meta == (meta or {})
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert loaded[name].tobytes() == value.tobytes()


@SETTINGS
@given(tensors=tensor_dicts(tuple(NUMPY_DTYPES)))
def test_valid_files_agree_with_safetensors(tmp_path, tensors):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(encode(tensors))
    loaded, _ = load_file(path)
    with safe_open(str(path), "np") as f:
        assert sorted(f.keys()) == sorted(loaded)
        for name in f.keys():
            assert f.get_tensor(name).tobytes() == loaded[name].tobytes()


def check_accepted_or_refused(path):
    """load_file either refuses with FormatError, or returns tensors consistent with the header; then the
    safetensors package must accept the header too (we are never looser than it)."""
    try:
        tensors, meta = load_file(path)
    except FormatError as e:
        assert "\n" not in str(e)
        return False
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    assert sorted(tensors) == sorted(header)
    assert sum(t.nbytes for t in tensors.values()) == len(data) - 8 - n
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        assert list(tensors[name].shape) == entry["shape"] and tensors[name].tobytes() == data[8 + n + begin:8 + n + end]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    with safe_open(str(path), "np") as f:
        assert sorted(f.keys()) == sorted(tensors)
    return True


BASE = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int16), "c": np.zeros(0, np.uint8)}


@SETTINGS
@given(edits=st.lists(st.tuples(st.one_of(st.integers(-36, -1), st.integers(0, 10_000)), st.integers(0, 255)),
                    min_size=1, max_size=6),
       cut=st.one_of(st.just(0), st.integers(1, 20)), extra=st.one_of(st.just(b""), st.binary(min_size=1, max_size=8)))
def test_byte_mutations_are_accepted_consistently_or_refused(tmp_path, edits, cut, extra):
    data = bytearray(encode(BASE, {"k": "v"}))
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[:len(data) - cut]) + extra
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    check_accepted_or_refused(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats(allow_nan=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
fields = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@SETTINGS
@given(tensor=st.sampled_from(["a", "b", "c", "__metadata__"]), field=fields, value=json_values,
       offsets=st.one_of(st.none(), st.tuples(st.integers(-4, 40), st.integers(-4, 40))))
def test_field_mutations_are_accepted_consistently_or_refused(tmp_path, tensor, field, value, offsets):
    raw = encode(BASE, {"k": "v"})
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if tensor == "__metadata__":
        header["__metadata__"] = {"k": value}
    elif offsets is not None:
        header[tensor]["data_offsets"] = list(offsets)
    else:
        header[tensor][field] = value
    text = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    check_accepted_or_refused(path)


# ----- mode plans -----
number = st.one_of(st.integers(0, 600).map(str), st.integers(0, 2**70).map(str), st.sampled_from(["", "-1", "1.5", "1e3", "0x10", "nan", " 7"]))
plan_texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["attention", "A", "recurrent", "r", "prefill-attention", "all-attention"]),
    st.builds(lambda n, pct: f"last:{n}{'%' if pct else ''}", number, st.booleans()),
    st.builds(lambda k, c: f"every:{k}:{c}", number, number),
    st.lists(st.builds(lambda m, a, b: f"{m}:{a}-{b}", st.sampled_from("ARar"), number, number), min_size=1, max_size=4)
    .map(",".join),
)


@settings(max_examples=400, deadline=None)
@given(text=plan_texts, length=st.integers(0, 300), prompt=st.one_of(st.none(), st.integers(0, 300)),
       window=st.tuples(st.integers(0, 300), st.integers(0, 300)))
def test_plan_parser(text, length, prompt, window):
    start = time.monotonic()
    try:
        plan = ModePlan.parse(text)
    except PlanError as e:
        assert "\n" not in str(e)
        return
    assert ModePlan.parse(str(plan)) == plan
    try:
        modes = plan.resolve(length, prompt)
    except PlanError:
        return
    assert modes.dtype == bool and modes.shape == (length,)
    np.testing.assert_array_equal(ModePlan.parse(str(plan)).resolve(length, prompt), modes)
    lo, hi = sorted(window)
    lo, hi = min(lo, length), min(hi, length)
    part = plan.resolve_window(lo, hi, length, prompt)
    np.testing.assert_array_equal(part, modes[lo:hi])
    for position in range(0, length, 7):
        try:
            if modes[position:].any():
                assert plan.attention_after(position, prompt)
            if not modes[position:].all():
                assert plan.recurrent_after(position, prompt)
        except PlanError:
            assume(prompt is None)
    assert time.monotonic() - start < 10  # microseconds in practice; the bound catches a runaway loop


@pytest.mark.parametrize("text", ["every:1:" + "9" * 30, "last:" + "9" * 400, "A:0-" + "9" * 40 + ",R:" + "9" * 40 + "-",
                                  "last:1e999%", "every:" + "1" * 5000 + ":1", "A:0-1," * 2000 + "R:1-"])
def test_huge_plan_numbers_are_refused_or_bounded(text):
    start = time.monotonic()
    try:
        ModePlan.parse(text).resolve(100)
    except PlanError:
        pass
    assert time.monotonic() - start < 10  # microseconds in practice; the bound catches a runaway loop
