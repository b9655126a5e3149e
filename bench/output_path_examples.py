"""Runs the reliability issue's data-loss and flag examples, each as an `oryx` subprocess in a project made with
`oryx init base --preset tiny`, and prints a Markdown table: exit status, stderr lines, traceback or not, wall
time, the child's peak resident memory, and whether every file of the project is byte-identical afterwards.

    python bench/output_path_examples.py            # the project is made in a temp directory
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPORT_PEAK = ("import resource, sys\nfrom oryx_core.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)")


def tree(root: Path) -> dict:
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            state[str(path.relative_to(root))] = ("dir" if path.is_dir() and not path.is_symlink()
                                                  else hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def oryx(root: Path, *argv: str) -> tuple[int, str, float, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK, *argv], cwd=root, capture_output=True, text=True)
    seconds = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if not line.startswith("peak_kib")]
    peak = next((int(line.split()[1]) / 1024 for line in done.stderr.splitlines() if line.startswith("peak_kib")), 0.0)
    return done.returncode, "\n".join(lines), seconds, peak


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="oryx-output-examples-"))
    assert oryx(root, "init", "base", "--preset", "tiny")[0] == 0
    (root / "project").mkdir()
    (root / "project" / "main.py").write_text("print('the user project')\n")
    (root / "models").mkdir()
    assert oryx(root, "init", "models/ckpt", "--preset", "tiny")[0] == 0
    (root / "models" / "notes.md").write_text("the user's notes\n")
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"doc{i}.txt").write_text(f"Document {i} of the corpus. " * 8)
    (root / "notes.txt").write_text("a file the user keeps\n")
    (root / "small.txt").write_text("a short text to score, with a few words in it " * 4)
    examples = [
        ("oryx init DIR onto a project directory", ["init", "project", "--preset", "tiny"]),
        ("oryx convert models/ckpt models", ["convert", "models/ckpt", "models"]),
        ("oryx data build --input corpus --out corpus", ["data", "build", "--input", "corpus", "--out", "corpus"]),
        ("oryx quantize a a", ["quantize", "base", "base"]),
        ("oryx export-mlx-lm a a", ["export-mlx-lm", "base", "base"]),
        ("a file as destination (init)", ["init", "notes.txt", "--preset", "tiny"]),
        ("a file as destination (convert)", ["convert", "base", "notes.txt"]),
        ("eval --max-tokens -5", ["eval", "base", "--text", "small.txt", "--max-tokens", "-5"]),
        ("eval --max-tokens 1e12", ["eval", "base", "--text", "small.txt", "--max-tokens", "1e12"]),
        ("eval --window -1", ["eval", "base", "--text", "small.txt", "--window", "-1"]),
        ("init --seed -1", ["init", "new", "--preset", "tiny", "--seed", "-1"]),
        ("quantize --group-size 0", ["quantize", "base", "q", "--group-size", "0"]),
        ("data build --val-fraction nan", ["data", "build", "--input", "corpus", "--out", "shards", "--val-fraction", "nan"]),
    ]
    print("| example | exit | stderr lines | traceback | seconds | peak RSS MiB | files unchanged |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, argv in examples:
        before = tree(root)
        code, err, seconds, peak = oryx(root, *argv)
        unchanged = tree(root) == before
        print(f"| {label} | {code} | {len(err.strip().splitlines())} | {'yes' if 'Traceback' in err else 'no'} | "
              f"{seconds:.1f} | {peak:.0f} | {'yes' if unchanged else 'NO'} |")
        print(f"  {err.strip()}", file=sys.stderr)


if __name__ == "__main__":
    main()
