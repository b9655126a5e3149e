"""No writer destroys data: every destination that is, contains or lies inside a source, or that holds something
other than an artifact of the kind written, is refused with one line and exit status 2, and every file in the
workspace is byte-identical afterwards; an artifact of the same kind is replaced whole; --force replaces anything
but a source; what a killed writer left beside the destination is cleaned up or reported."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oryx_core.atomic import atomic_directory, remove_stale_temps
from oryx_core.output import OutputError, artifact_kind, check_output, replacing_allowed

from cli_runs import run

REFUSAL_SECONDS = 10  # in-process; a refusal comes before any model is loaded


def tree_digest(root: Path) -> dict:
    """Every entry under root (hidden ones too): file bytes' sha256, symlink targets, directories."""
    state = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_refused(root: Path, argv: list[str], words: str) -> None:
    before = tree_digest(root)
    start = time.monotonic()
    code, err = run(argv)
    assert time.monotonic() - start < REFUSAL_SECONDS
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, (words, err)
    assert tree_digest(root) == before, f"{argv} changed the workspace"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A project: a checkpoint in models/, user files beside it, a corpus, token shards, a torch container."""
    root = tmp_path_factory.mktemp("project")
    (root / "models").mkdir()
    assert run(["init", str(root / "models" / "ckpt"), "--preset", "tiny"])[0] == 0
    (root / "models" / "notes.md").write_text("the user's notes\n")
    (root / "corpus").mkdir()
    for i in range(8):
        (root / "corpus" / f"doc{i}.txt").write_text(f"Document {i} has a few words in it. " * 5)
    assert run(["data", "build", "--input", str(root / "corpus"), "--out", str(root / "shards"),
                "--val-fraction", "0.3", "--quiet"])[0] == 0
    (root / "project").mkdir()
    (root / "project" / "main.py").write_text("print('hello')\n")
    (root / "file.txt").write_text("a file the user keeps\n")
    (root / "empty").mkdir()
    os.symlink(root / "models" / "ckpt", root / "link-to-ckpt")
    os.symlink(root / "models" / "ckpt" / "tokenizer.json", root / "link-to-tokenizer")
    os.symlink(root / "models", root / "link-to-models")
    os.symlink(root / "corpus", root / "link-to-corpus")
    os.symlink(root / "nowhere", root / "broken-link")
    (root / "train.json").write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(root / "shards"),
                                                 "out": str(root / "run"), "steps": 1, "device": "cpu"}))
    return root


def writer_cases(root: Path):
    """(argv, words in the refusal): each writer against each kind of destination it must refuse."""
    ckpt, models, corpus, shards = root / "models" / "ckpt", root / "models", root / "corpus", root / "shards"
    foreign = {"a project directory": (root / "project", "not an Oryx artifact"),
               "a file": (root / "file.txt", "is a file"),
               "a broken symlink": (root / "broken-link", "broken symlink")}
    cases = []

    def dir_writer(name, make_argv, source, source_parent, link_to_source, other_kind):
        for what, (dst, words) in foreign.items():
            cases.append((f"{name} onto {what}", make_argv(dst), words))
        cases.append((f"{name} onto its source", make_argv(source), "is the"))
        cases.append((f"{name} onto the source's parent", make_argv(source_parent), "contains the"))
        cases.append((f"{name} inside its source", make_argv(source / "out"), "lies inside the"))
        cases.append((f"{name} onto a symlink to its source", make_argv(link_to_source), "is the"))
        cases.append((f"{name} onto {other_kind[0]}", make_argv(other_kind[1]), "pass --force"))
        cases.append((f"{name} onto a path under a file", make_argv(root / "file.txt" / "out"), "is not a directory"))

    dir_writer("init", lambda d: ["init", str(d), "--preset", "tiny", "--tokenizer", str(ckpt / "tokenizer.json")],
               ckpt / "tokenizer.json", ckpt, root / "link-to-tokenizer", ("token shards", shards))
    cases = [c for c in cases if c[0] != "init inside its source"]  # the --tokenizer source is a file
    dir_writer("convert", lambda d: ["convert", str(ckpt), str(d)], ckpt, models, root / "link-to-ckpt",
               ("token shards", shards))
    dir_writer("convert --to torch-state-dict", lambda d: ["convert", str(ckpt), str(d), "--to", "torch-state-dict"],
               ckpt, models, root / "link-to-ckpt", ("an Oryx checkpoint", root / "models" / "ckpt-copy"))
    dir_writer("data build", lambda d: ["data", "build", "--input", str(corpus), "--out", str(d), "--quiet"], corpus,
               root, root / "link-to-corpus", ("an Oryx checkpoint", root / "models" / "ckpt-copy"))
    # file writers: a directory is never a destination, nor a file inside what they read
    cases.append(("data decode onto its shard directory", ["data", "decode", str(shards), "--out", str(shards)], "is the"))
    cases.append(("data decode onto the shards' meta.json",
                  ["data", "decode", str(shards), "--out", str(shards / "meta.json")], "lies inside"))
    cases.append(("data decode onto a user's file", ["data", "decode", str(shards), "--out", str(root / "file.txt")],
                  "pass --force"))
    cases.append(("data decode onto a path under a file",
                  ["data", "decode", str(shards), "--out", str(root / "file.txt" / "x.txt")], "is not a directory"))
    cases.append(("data decode onto a directory", ["data", "decode", str(shards), "--out", str(root / "project")],
                  "is a directory"))
    cases.append(("train-tokenizer onto an input", ["data", "train-tokenizer", "--input", str(corpus), "--out",
                                                    str(corpus / "doc0.txt")], "lies inside"))
    cases.append(("train-tokenizer onto a user's file", ["data", "train-tokenizer", "--input", str(corpus), "--out",
                                                         str(root / "file.txt")], "pass --force"))
    return cases


def _ids(cases):
    return [c[0] for c in cases]


CASE_NAMES = _ids(writer_cases(Path("/")))


@pytest.fixture(scope="module")
def checkpoint_copy(workspace):
    """A second checkpoint: a destination of the checkpoint kind that --to torch must not replace silently."""
    assert run(["init", str(workspace / "models" / "ckpt-copy"), "--preset", "tiny", "--seed", "1"])[0] == 0
    return workspace / "models" / "ckpt-copy"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_writer_refuses_and_changes_nothing(workspace, checkpoint_copy, name):
    argv, words = {c[0]: c[1:] for c in writer_cases(workspace)}[name]
    assert_refused(workspace, argv, words)


def test_the_issues_examples_in_subprocesses(workspace, checkpoint_copy):
    """The reported ways to lose data, as a user runs them: each ends with exit 2 and one line, nothing changed."""
    ckpt = workspace / "models" / "ckpt"
    examples = [["init", str(workspace / "project"), "--preset", "tiny"],
                ["convert", str(ckpt), str(workspace / "models")],
                ["data", "build", "--input", str(workspace / "corpus"), "--out", str(workspace / "corpus")]]
    try:
        import mlx.core  # noqa: F401
        examples.append(["quantize", str(ckpt), str(ckpt)])  # export-mlx-lm's twin runs in-process below
    except ImportError:
        pass
    before = tree_digest(workspace)
    for argv in examples:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "oryx_core", *argv], capture_output=True, text=True, timeout=60)
        assert time.monotonic() - start < 30
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (argv, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert tree_digest(workspace) == before


@pytest.mark.parametrize("command", ["quantize", "export-mlx-lm"])
def test_mlx_writers_refuse_their_source_and_foreign_destinations(workspace, checkpoint_copy, command):
    pytest.importorskip("mlx.core")
    ckpt = workspace / "models" / "ckpt"
    refusals = [(ckpt, "is the"), (workspace / "models", "contains the"), (ckpt / "q", "lies inside the"),
                (workspace / "link-to-ckpt", "is the"), (workspace / "project", "not an Oryx artifact"),
                (workspace / "file.txt", "is a file"), (workspace / "shards", "pass --force")]
    for dst, words in refusals:
        assert_refused(workspace, [command, str(ckpt), str(dst)], words)


def test_train_refuses_an_out_that_is_its_data_or_a_foreign_directory(workspace):
    pytest.importorskip("torch")
    config = workspace / "train.json"
    for out, words in ((workspace / "shards", "is the data"), (workspace / "shards" / "run", "lies inside the data"),
                       (workspace, "contains the data"), (workspace / "project", "not an Oryx artifact"),
                       (workspace / "file.txt", "is a file")):
        assert_refused(workspace, ["train", str(config), "--set", f"out={out}"], words)


def test_same_kind_is_replaced_whole_and_force_replaces_foreign(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run(["init", str(ckpt), "--preset", "tiny", "--seed", "1"])[0] == 0
    first = tree_digest(ckpt)
    assert run(["init", str(ckpt), "--preset", "tiny", "--seed", "2"])[0] == 0
    assert tree_digest(ckpt) != first and artifact_kind(ckpt) == "checkpoint"
    (tmp_path / "empty").mkdir()
    assert run(["init", str(tmp_path / "empty"), "--preset", "tiny"])[0] == 0  # an empty directory holds nothing
    (tmp_path / "file.txt").write_text("x")
    assert run(["init", str(tmp_path / "file.txt"), "--preset", "tiny", "--force"])[0] == 0
    assert artifact_kind(tmp_path / "file.txt") == "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "file.txt"], "nothing hidden beside"
    # --force never overrides a source
    code, err = run(["convert", str(ckpt), str(tmp_path), "--force"])
    assert code == 2 and "contains the SRC" in err


def test_library_writers_refuse_foreign_destinations_unless_allowed(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match="project: exists and is a directory that is not an Oryx artifact"):
        atomic_directory(project, lambda tmp: (tmp / "x").write_text("1"))
    assert (project / "keep.txt").read_text() == "keep"
    with replacing_allowed(project):
        atomic_directory(project, lambda tmp: (tmp / "x").write_text("1"))
    assert sorted(p.name for p in project.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    with pytest.raises(OutputError, match="lies inside the SRC"):
        check_output(tmp_path / "a" / "b", "checkpoint", [("SRC", tmp_path / "a")])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_writers_are_removed_restored_or_reported(tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert run(["init", str(dst), "--preset", "tiny"])[0] == 0
    dead = _dead_pid()
    (tmp_path / f".ckpt.oryx-tmp-{dead}-x1y2").mkdir()  # a killed writer's half-written temp directory
    (tmp_path / f".ckpt.oryx-tmp-{dead}-x1y2" / "model-00001-of-00001.safetensors").write_bytes(b"half")
    (tmp_path / f".ckpt.oryx-tmp-{os.getpid()}-live").mkdir()  # a running writer's: left alone
    (tmp_path / ".ckpt.old-12345").mkdir()  # an older Oryx's name: reported, not deleted
    code, err = run(["init", str(dst), "--preset", "tiny", "--seed", "3"])
    assert code == 0 and ".ckpt.old-12345" in err and "left over" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old-12345", f".ckpt.oryx-tmp-{os.getpid()}-live", "ckpt"]
    # a kill between the two renames of a replacement (where no atomic swap exists): the old one is put back
    os.rename(dst, tmp_path / f".ckpt.oryx-old-{dead}")
    restored = remove_stale_temps(dst, report=lambda message: None)
    assert restored == [tmp_path / f".ckpt.oryx-old-{dead}"] and artifact_kind(dst) == "checkpoint"


def test_train_tokenizer_replaces_its_own_output(tmp_path):
    """A tokenizer.json larger than a marker file (GPT-2's is 1.5 MB) is still recognised as one."""
    gpt2 = Path(__file__).resolve().parents[2] / "oryx_data" / "gpt2-tokenizer.json"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some words and more words for a tokenizer " * 20)
    out = tmp_path / "tokenizer.json"
    out.write_bytes(gpt2.read_bytes())
    assert artifact_kind(out) == "tokenizer"
    assert run(["data", "train-tokenizer", "--input", str(tmp_path / "corpus"), "--out", str(out),
                "--vocab-size", "300", "--quiet"])[0] == 0
    assert out.stat().st_size < gpt2.stat().st_size


def test_a_second_name_of_the_source_is_the_source(tmp_path):
    """A name resolve() keeps apart from the source's but the file system does not: here a hard link (a
    case-insensitive file system or a bind mount gives one directory two names the same way)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("words " * 20)
    os.link(corpus / "a.txt", tmp_path / "same-a.txt")
    with pytest.raises(OutputError, match="is the --input"):
        check_output(tmp_path / "same-a.txt", "tokenizer", [("--input", corpus / "a.txt")], flag="--out")
