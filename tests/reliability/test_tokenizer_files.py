"""Crafted bad tokenizer.json files: each is refused by load_tokenizer with one ValueError naming the file
(a FIFO or device without blocking, an oversized file before it is read); `oryx init --tokenizer` on a
subset exits 2 with one line and writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from oryx_core.tokenizer import byte_level_tokenizer, load_tokenizer

VALID = json.loads(byte_level_tokenizer().to_str())


def with_model(**changes):
    return json.dumps({**VALID, "model": {**VALID["model"], **changes}}).encode()


CASES = [
    ("not JSON", b"{", "not a valid tokenizer.json"),
    ("empty file", b"", "not a valid tokenizer.json"),
    ("not UTF-8", b'{"\xff": 1}', "not a valid tokenizer.json"),
    ("100k deep", b'{"model":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a valid tokenizer.json"),
    ("a list", b"[]", "not a valid tokenizer.json"),
    ("an empty object", b"{}", "not a valid tokenizer.json"),
    ("unknown model type", with_model(type="Nope"), "not a valid tokenizer.json"),
    ("vocab a list", with_model(vocab=["a"]), "not a valid tokenizer.json"),
    ("vocab id a string", with_model(vocab={"a": "0"}), "not a valid tokenizer.json"),
    ("merge of unknown tokens", with_model(merges=["zz qq"]), "not a valid tokenizer.json"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_tokenizer_file_is_refused(tmp_path, no_hang, data, message):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "oversized", "directory without one"])
def test_tokenizer_path_that_is_not_a_small_regular_file(tmp_path, no_hang, kind):
    path = tmp_path / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.truncate((512 << 20) + 1)
    else:
        path = tmp_path
    message = {"fifo": "a FIFO", "symlink to /dev/zero": "character device", "oversized": "more than the",
               "directory without one": "no tokenizer.json"}[kind]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_tokenizer(path)


def test_valid_tokenizer_loads(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(byte_level_tokenizer().to_str())
    assert load_tokenizer(path).encode("hi").ids == [104, 105]


def test_init_cli_refuses_a_bad_tokenizer_with_one_line(tmp_path):
    """`oryx init OUT --tokenizer BAD` (a FIFO, a deep file; side by side): exit 2, one line, OUT not created."""
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "deep.json").write_bytes(CASES[3][1])
    procs = []
    for name in ("fifo", "deep"):
        out = tmp_path / f"out-{name}"
        procs.append((out, time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "oryx_core", "init", str(out), "--preset", "tiny", "--tokenizer",
             str(tmp_path / f"{name}.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for out, start, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert time.monotonic() - start < 60 and not out.exists()
