"""Crafted bad token shard directories (meta.json and the shard files it names): each is refused by
TokenShards with one FormatError naming the file or field; `oryx data decode` on a subset exits 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from oryx_core.files import FormatError
from oryx_data import TokenShards
from oryx_data.pipeline import FORMAT, FORMAT_VERSION, META_FILE

TRAIN = np.arange(100, dtype="<u2") % 257
VAL = np.arange(20, dtype="<u2")


def write(directory, meta_changes=None, files=None):
    """A valid shard directory (train 100 tokens, val 20, uint16, vocab 300), then meta_changes applied."""
    directory.mkdir(exist_ok=True)
    (directory / "train-00000.bin").write_bytes(TRAIN.tobytes())
    (directory / "val-00000.bin").write_bytes(VAL.tobytes())
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 300, "eot_id": 256,
            "splits": {"train": ["train-00000.bin"], "val": ["val-00000.bin"]}, "tokens": {"train": 100, "val": 20}}
    if meta_changes:
        meta_changes(meta)
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def setter(**changes):
    return lambda meta: meta.update(changes)


def train_files(*names):
    return lambda meta: meta["splits"].__setitem__("train", list(names))


def after(build, then):
    """A directory made by build, then changed on disk by then(directory)."""
    def make(tmp_path):
        d = write(tmp_path / "shards", build)
        then(d, tmp_path)
        return d
    return make


def replace_train(make):
    def then(d, tmp_path):
        (d / "train-00000.bin").unlink()
        make(d / "train-00000.bin", tmp_path)
    return after(None, then)


def meta_bytes(data: bytes):
    return after(None, lambda d, tmp: (d / META_FILE).write_bytes(data))


def outside(d, tmp_path):
    (tmp_path / "elsewhere.bin").write_bytes(TRAIN.tobytes())


CASES = [
    ("shard ../elsewhere.bin", after(train_files("../elsewhere.bin"), outside), "is not a plain file name"),
    ("shard by absolute path", after(None, lambda d, t: write(d, train_files(str(d / "train-00000.bin")))),
     "is not a plain file name"),
    ("shard name a number", lambda t: write(t / "s", train_files(5)), "file names must be strings"),
    ("shard name empty", lambda t: write(t / "s", train_files("")), "is not a plain file name"),
    ("shard list a string", lambda t: write(t / "s", lambda m: m["splits"].__setitem__("train", "train-00000.bin")),
     r"splits\['train'\] must be a list"),
    ("shard a FIFO", replace_train(lambda p, t: os.mkfifo(p)), "a FIFO"),
    ("shard symlinked to /dev/zero", replace_train(lambda p, t: p.symlink_to("/dev/zero")), "resolves outside"),
    ("shard symlinked outside", replace_train(lambda p, t: (outside(None, t), p.symlink_to(t / "elsewhere.bin"))),
     "resolves outside"),
    ("shard a directory", replace_train(lambda p, t: p.mkdir()), "a directory"),
    ("shard missing", replace_train(lambda p, t: None), "missing shard"),
    ("shard of odd length", replace_train(lambda p, t: p.write_bytes(b"\0" * 201)), "not a whole number"),
    ("token count wrong", lambda t: write(t / "s", lambda m: m["tokens"].__setitem__("train", 99)),
     "should hold 99 tokens"),
    ("token count a string", lambda t: write(t / "s", lambda m: m["tokens"].__setitem__("train", "100")),
     r"tokens\['train'\] must be an integer"),
    ("token count negative", lambda t: write(t / "s", lambda m: m["tokens"].__setitem__("train", -1)),
     r"tokens\['train'\] must be an integer"),
    ("vocab_size 2**20 for uint16", lambda t: write(t / "s", setter(vocab_size=2**20)), "vocab_size must be in"),
    ("vocab_size true", lambda t: write(t / "s", setter(vocab_size=True)), "malformed 'vocab_size'"),
    ("vocab_size 3e2", lambda t: write(t / "s", setter(vocab_size=3e2)), "malformed 'vocab_size'"),
    ("eot_id beyond the vocabulary", lambda t: write(t / "s", setter(eot_id=300)), "eot_id 300 is not a token id"),
    ("eot_id negative", lambda t: write(t / "s", setter(eot_id=-1)), "eot_id -1 is not a token id"),
    ("dtype int8", lambda t: write(t / "s", setter(dtype="int8")), "dtype must be one of"),
    ("splits a list", lambda t: write(t / "s", setter(splits=[["train-00000.bin"]])), "malformed 'splits'"),
    ("meta not JSON", meta_bytes(b"{"), "not valid JSON"),
    ("meta 100k deep", meta_bytes(b"[" * 100_000 + b"]" * 100_000), "nested deeper"),
    ("meta a list", meta_bytes(b"[]"), "expected a JSON object"),
    ("meta with a duplicate key", meta_bytes(b'{"format": "oryx-tokens", "format": "x"}'), "duplicate key"),
    ("meta a FIFO", after(None, lambda d, t: ((d / META_FILE).unlink(), os.mkfifo(d / META_FILE))), "a FIFO"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_token_shards_are_refused(tmp_path, make, message):
    directory = make(tmp_path)
    with pytest.raises(FormatError, match=message) as info:
        TokenShards(directory, "train")
    assert "\n" not in str(info.value)


def test_valid_directory_reads_back(tmp_path):
    shards = TokenShards(write(tmp_path / "shards"), "train")
    np.testing.assert_array_equal(shards.window(0, 100), TRAIN.astype(np.int64))
    assert len(TokenShards(tmp_path / "shards", "val")) == 20


def test_decode_cli_refuses_with_one_line(tmp_path):
    """`oryx data decode` on two bad directories (side by side): exit 2, one stderr line, no output file."""
    procs = []
    for name, changes in (("outside", train_files("../elsewhere.bin")), ("vocab", setter(vocab_size=2**20))):
        directory = write(tmp_path / name, changes)
        out = tmp_path / f"{name}.txt"
        procs.append((out, time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "oryx_core", "data", "decode", str(directory), "--split", "train", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for out, start, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert time.monotonic() - start < 60 and not out.exists()
