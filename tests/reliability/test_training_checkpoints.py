"""Crafted training-run directories: latest.json must name a checkpoint directory inside checkpoints/, and
state.json must be typed; each defect is one FormatError (or FileNotFoundError) naming the file."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")

from oryx_core.files import FormatError  # noqa: E402
from oryx_torch.train import latest_checkpoint, read_state  # noqa: E402

STATE = {"step": 10, "skipped_steps": 0, "world_size": 1, "rng": [{}]}


def run_dir(tmp_path, pointer: bytes | None = None, state: dict | None = None):
    out = tmp_path / "run"
    step = out / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps(STATE if state is None else state))
    (out / "checkpoints" / "latest.json").write_bytes(b'{"checkpoint": "step-10", "step": 10}' if pointer is None else pointer)
    return out


def test_valid_pointer(tmp_path):
    out = run_dir(tmp_path)
    assert latest_checkpoint(out) == out / "checkpoints" / "step-10"
    assert read_state(latest_checkpoint(out))["step"] == 10


def test_no_pointer_means_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None


POINTERS = [
    ("parent directory", b'{"checkpoint": ".."}', "is not a plain file name"),
    ("escaping name", b'{"checkpoint": "../../elsewhere"}', "is not a plain file name"),
    ("absolute path", b'{"checkpoint": "/tmp"}', "is not a plain file name"),
    ("a number", b'{"checkpoint": 10}', "corrupt"),
    ("missing key", b'{"step": 10}', "corrupt"),
    ("a list", b'["step-10"]', "expected a JSON object"),
    ("not JSON", b"step-10", "not valid JSON"),
    ("30k deep", b"[" * 30_000 + b"]" * 30_000, "nested deeper"),
    ("larger than 64 KiB", b'{"checkpoint": "step-10", "pad": "' + b"x" * 70_000 + b'"}', "more than the"),
]


@pytest.mark.parametrize("pointer, message", [p[1:] for p in POINTERS], ids=[p[0] for p in POINTERS])
def test_bad_latest_json_is_refused(tmp_path, pointer, message):
    with pytest.raises(FormatError, match=message):
        latest_checkpoint(run_dir(tmp_path, pointer))


def test_symlinked_checkpoint_leaving_the_run_is_refused(tmp_path):
    out = run_dir(tmp_path)
    (tmp_path / "other" / "step-9").mkdir(parents=True)
    (tmp_path / "other" / "step-9" / "state.json").write_text(json.dumps(STATE))
    (out / "checkpoints" / "step-9").symlink_to(tmp_path / "other" / "step-9")
    (out / "checkpoints" / "latest.json").write_text('{"checkpoint": "step-9"}')
    with pytest.raises(FormatError, match="resolves outside"):
        latest_checkpoint(out)


def test_pointer_that_is_a_fifo_is_refused(tmp_path):
    out = run_dir(tmp_path)
    (out / "checkpoints" / "latest.json").unlink()
    os.mkfifo(out / "checkpoints" / "latest.json")
    with pytest.raises(FormatError, match="a FIFO"):
        latest_checkpoint(out)


def test_pointer_to_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        latest_checkpoint(run_dir(tmp_path, b'{"checkpoint": "step-20"}'))


STATES = [
    ("step a string", {**STATE, "step": "10"}, "step must be an integer"),
    ("step negative", {**STATE, "step": -1}, "step must be an integer"),
    ("step a float", {**STATE, "step": 10.0}, "step must be an integer"),
    ("world_size true", {**STATE, "world_size": True}, "world_size must be an integer"),
    ("rng not a list", {**STATE, "rng": {}}, "rng must be a list"),
    ("rng shorter than the world", {**STATE, "world_size": 2}, "rng must be a list of one state per rank"),
]


@pytest.mark.parametrize("state, message", [s[1:] for s in STATES], ids=[s[0] for s in STATES])
def test_bad_state_json_is_refused(tmp_path, state, message):
    out = run_dir(tmp_path, state=state)
    with pytest.raises(FormatError, match=message):
        read_state(latest_checkpoint(out))
