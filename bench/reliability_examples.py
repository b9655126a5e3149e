"""Runs `oryx info` on each malformed-checkpoint example of the reliability issue and prints a Markdown table:
exit status, stderr lines, traceback or not, wall time, the child's peak resident memory, and whether every
file of the checkpoint (and the file outside it) is byte-identical afterwards.

    python bench/reliability_examples.py            # a tiny checkpoint made in a temp directory
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.weights import CONFIG_FILE, INDEX_FILE, save_checkpoint


def first_shard(ckpt: Path) -> str:
    return sorted(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values())[0]


def edit_index(ckpt: Path, change) -> None:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["metadata"].pop("shard_sha256", None)
    change(index)
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def redirect(ckpt: Path, target: str) -> None:
    shard = first_shard(ckpt)
    edit_index(ckpt, lambda i: i.__setitem__("weight_map", {k: target if v == shard else v for k, v in i["weight_map"].items()}))


def rewrite_header(ckpt: Path, change) -> None:
    """Rewrites the header of the shard holding the most tensors after change(header, data) edits it."""
    names = list(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values())
    path = ckpt / max(sorted(set(names)), key=names.count)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    data = change(header, data) or data
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    edit_index(ckpt, lambda i: None)


def tensors_of(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap(header, data):
    b = tensors_of(header)[1]
    header[b]["data_offsets"] = [header[b]["data_offsets"][0] - 4, header[b]["data_offsets"][1] - 4]
    return data[:-4]


def set_config(**fields):
    def change(ckpt, tmp):
        config = json.loads((ckpt / CONFIG_FILE).read_text())
        config.update(fields)
        (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    return change


def outside(ckpt, tmp):
    (tmp / "outside").mkdir()
    shutil.copy(ckpt / first_shard(ckpt), tmp / "outside" / "x.safetensors")
    redirect(ckpt, "../outside/x.safetensors")


def special_shard(kind):
    def change(ckpt, tmp):
        shard = ckpt / first_shard(ckpt)
        shard.unlink()
        os.mkfifo(shard) if kind == "fifo" else shard.symlink_to("/dev/zero")
        edit_index(ckpt, lambda i: None)
    return change


def deep_header(ckpt, tmp):
    path = ckpt / first_shard(ckpt)
    text = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    edit_index(ckpt, lambda i: None)


EXAMPLES = [
    ("weight_map entry ../outside/x.safetensors", outside),
    ("weight_map entry an absolute path", lambda c, t: redirect(c, str((c / first_shard(c)).resolve()))),
    ("/dev/zero as a shard", special_shard("zero")),
    ("a FIFO as a shard", special_shard("fifo")),
    ("n_layers: 1e8 in config.json", set_config(n_layers=1e8)),
    ("n_layers: 100000000 in config.json", set_config(n_layers=100_000_000)),
    ("safetensors offsets overlapping", lambda c, t: rewrite_header(c, overlap)),
    ("safetensors trailing bytes", lambda c, t: rewrite_header(c, lambda h, d: d + b"\0" * 8)),
    ("safetensors metadata not a string", lambda c, t: rewrite_header(c, lambda h, d: h.__setitem__("__metadata__", {"format": 1}))),
    ("safetensors shape of floats", lambda c, t: rewrite_header(c, lambda h, d: h[tensors_of(h)[0]].__setitem__(
        "shape", [float(s) for s in h[tensors_of(h)[0]]["shape"]]))),
    ("safetensors offsets of strings", lambda c, t: rewrite_header(c, lambda h, d: h[tensors_of(h)[0]].__setitem__(
        "data_offsets", [str(o) for o in h[tensors_of(h)[0]]["data_offsets"]]))),
    ("safetensors header 100k deep", deep_header),
    ("weight_map a list", lambda c, t: edit_index(c, lambda i: i.__setitem__("weight_map", list(i["weight_map"].items())))),
    ('"rope": "false" in config.json', set_config(rope="false")),
]


def digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = preset("tiny")
        base = save_checkpoint(tmp / "base", cfg, init_params(cfg, 0), shard_bytes=40_000)
        print("| example | exit | stderr lines | traceback | seconds | peak RSS MiB | files unchanged |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n, (name, change) in enumerate(EXAMPLES):
            work = tmp / f"case{n}"
            work.mkdir()
            ckpt = shutil.copytree(base, work / "ckpt", symlinks=True)
            change(ckpt, work)
            before = digest(work)
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-c", "import resource, runpy, sys; sys.argv = ['oryx', 'info', sys.argv[1]];"
                                   "code = 0\ntry:\n    runpy.run_module('oryx_core', run_name='__main__')\n"
                                   "except SystemExit as e:\n    code = e.code\n"
                                   "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stdout); sys.exit(code)",
                                   str(ckpt)], capture_output=True, text=True, timeout=300)
            seconds = time.monotonic() - start
            peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK")), 0) / 1024
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            print(f"| {name} | {proc.returncode} | {len(lines)} | {'yes' if 'Traceback' in proc.stderr else 'no'} | "
                  f"{seconds:.1f} | {peak:.0f} | {'yes' if digest(work) == before else 'NO'} |")
            print(f"<!-- {lines[0] if lines else ''} -->", file=sys.stderr)


if __name__ == "__main__":
    _ = resource  # the child measures itself; imported here for readers of this script
    main()
