"""kill -9 during each kind of save (init, convert, quantize, data build, a training checkpoint) leaves the previous
artifact whole and loadable; the next writer removes what the killed one left beside it."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oryx_core.atomic import PAUSE_ENV, remove_stale_temps
from oryx_core.cli import main
from oryx_core.output import artifact_kind
from oryx_core.weights import load_checkpoint

RUN_MAIN = "import sys; from oryx_core.cli import main; sys.exit(main(sys.argv[1:]))"
NO_SWAP = "import oryx_core.atomic as atomic; atomic._exchange = lambda a, b: False; "  # the two-rename fallback


def digest(root: Path) -> dict:
    """sha256 of every file under root, leaving out hidden entries (a writer's temp directories)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)}


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def kill_during_save(argv, dst_name: str, marker: Path, point: str = "swap", prefix: str = "") -> None:
    """Runs `oryx ARGV` in a subprocess, waits until its save of dst_name reaches `point`, and kill -9s it there."""
    env = {**os.environ, PAUSE_ENV: f"{point}:{dst_name}:{marker}", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-c", prefix + RUN_MAIN, *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"oryx {argv[0]} ended ({proc.returncode}) before its save paused: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"oryx {argv[0]} never reached the save")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "ckpt"
    assert main(["init", str(path), "--preset", "tiny"]) == 0
    return path


def _corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: a few words for the shards. " * 4)
    return corpus


def _shards_load(path: Path) -> None:
    from oryx_data import TokenShards

    assert len(TokenShards(path, "train")) > 0 and artifact_kind(path) == "shards"


WRITERS = {
    "init": (lambda base, root, seed: ["init", root / "out", "--preset", "tiny", "--seed", seed], load_checkpoint),
    "convert": (lambda base, root, seed: ["convert", base, root / "out", "--dtype", ["float32", "bfloat16"][seed % 2]],
                load_checkpoint),
    "quantize": (lambda base, root, seed: ["quantize", base, root / "out", "--bits", [4, 8][seed % 2]], load_checkpoint),
    "data build": (lambda base, root, seed: ["data", "build", "--input", root / "corpus", "--out", root / "out",
                                             "--val-fraction", "0.3", "--seed", seed, "--quiet"], _shards_load),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_kill_at_the_swap_leaves_the_previous_artifact(writer, base, tmp_path):
    if writer == "quantize":
        pytest.importorskip("mlx.core")
    make_argv, load = WRITERS[writer]
    _corpus(tmp_path)
    out = tmp_path / "out"
    assert main([str(a) for a in make_argv(base, tmp_path, 1)]) == 0
    before = digest(out)
    kill_during_save(make_argv(base, tmp_path, 2), "out", tmp_path / "paused")
    assert digest(out) == before, "the previous artifact changed"
    load(out)
    assert leftovers(tmp_path, "out"), "the killed writer's complete temp directory is beside it"
    assert main([str(a) for a in make_argv(base, tmp_path, 2)]) == 0
    assert leftovers(tmp_path, "out") == [] and digest(out) != before
    load(out)


def test_kill_between_the_two_renames_is_undone_by_the_next_writer(base, tmp_path):
    """Where no atomic swap exists, the old version is set aside before the new one moves in; a kill there
    leaves it aside whole, and the next writer of that destination (or remove_stale_temps) puts it back."""
    out = tmp_path / "out"
    assert main(["init", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    before = digest(out)
    kill_during_save(["init", out, "--preset", "tiny", "--seed", "2"], "out", tmp_path / "paused", point="aside",
                     prefix=NO_SWAP)
    assert not out.exists()
    (aside,) = [name for name in leftovers(tmp_path, "out") if ".oryx-old-" in name]
    assert digest(tmp_path / aside) == before
    remove_stale_temps(out, report=lambda message: None)
    assert digest(out) == before and leftovers(tmp_path, "out") == []
    load_checkpoint(out)


def test_kill_during_a_training_checkpoint_keeps_the_last_one(tmp_path):
    pytest.importorskip("torch")
    from oryx_data import build_shards
    from oryx_torch.train import config_from_dict, train

    build_shards([_corpus(tmp_path)], tmp_path / "shards", val_fraction=0.3, seed=0)
    raw = {"model": {"preset": "tiny"}, "data": str(tmp_path / "shards"), "out": str(tmp_path / "run"), "steps": 2,
           "seq_len": 16, "batch_size": 2, "eval_batches": 1, "eval_every": 0, "save_every": 1, "log_every": 1,
           "warmup": 1, "progress": False, "device": "cpu", "compile": False}
    (tmp_path / "train.json").write_text(json.dumps(raw))
    train(config_from_dict(raw), stop_after=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    before = digest(checkpoints)
    kill_during_save(["train", tmp_path / "train.json", "--resume"], "step-00000002", tmp_path / "paused")
    assert digest(checkpoints) == before
    assert json.loads((checkpoints / "latest.json").read_text())["checkpoint"] == "step-00000001"
    load_checkpoint(checkpoints / "step-00000001" / "model")
    assert leftovers(checkpoints, "step-00000002")
    summary = train(config_from_dict(raw), resume=True)  # continues from step 1, as after any interruption
    assert summary["step"] == 2 and leftovers(checkpoints, "step-00000002") == []
    load_checkpoint(checkpoints / "step-00000002" / "model")
