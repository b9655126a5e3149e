"""Which destinations a command may write: the rules every Oryx writer follows before it replaces anything.

- A destination that exists is replaced only when it is an artifact of the kind being written (recognised by
  its marker file: an Oryx config.json's "format", a shard directory's meta.json, ...), an empty directory,
  or when the user passed --force (`replacing_allowed`).
- A destination never equals, contains or lies inside one of the command's sources (paths resolved, symlinks
  followed), --force or not: replacing it would delete what is being read.
- A directory is written by oryx_core.atomic.atomic_directory (temp directory beside it, flushed, swapped in
  at once), which asks `guard_replacement` before it starts, so library calls get the same refusal.

Standard library only, like oryx_core.atomic.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

KINDS = {
    "checkpoint": "an Oryx checkpoint",
    "adapter": "an Oryx recurrent adapter",
    "torch": "an Oryx torch-state-dict directory",
    "mlx": "an Oryx MLX directory",
    "mlx-lm": "an Oryx mlx-lm export",
    "adapter": "an Oryx recurrent adapter",
    "shards": "an Oryx token shard directory",
    "training-checkpoint": "an Oryx training checkpoint",
    "run": "an Oryx training run directory",
    "tokenizer": "a tokenizer.json",
    "text": "a text file",
}
CONFIG_FORMATS = {"oryx": "checkpoint", "torch-state-dict": "torch", "mlx": "mlx"}
MARKER_BYTES = 1 << 20  # marker files are small; a larger one is not ours
TOKENIZER_BYTES = 64 << 20  # a tokenizer.json of a 150k vocabulary is about 10 MB


class OutputError(ValueError):
    """A destination the command refuses to write; the message is one line naming the flag and path."""


_forced: contextvars.ContextVar[frozenset] = contextvars.ContextVar("oryx_forced_outputs", default=frozenset())


@contextlib.contextmanager
def replacing_allowed(*paths):
    """Within this block, writers may replace these destinations whatever they hold (the --force flag)."""
    token = _forced.set(_forced.get() | {_resolved(p) for p in paths if p is not None})
    try:
        yield
    finally:
        _forced.reset(token)


def _resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file or directory (a case-insensitive file system, a hard link, a
    bind mount: spellings that resolve() leaves different)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _small_json(path: Path, limit: int = MARKER_BYTES):
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def artifact_kind(path) -> str | None:
    """The kind of Oryx artifact at path (a key of KINDS), or None when it is not recognisably one."""
    path = Path(path)
    if path.is_file():
        raw = _small_json(path, TOKENIZER_BYTES) if path.suffix == ".json" else None
        if isinstance(raw, dict) and "model" in raw and "added_tokens" in raw:
            return "tokenizer"
        return None
    if not path.is_dir():
        return None
    config = _small_json(path / "config.json")
    if isinstance(config, dict):
        if config.get("format") in CONFIG_FORMATS:
            return CONFIG_FORMATS[config["format"]]
        if config.get("model_type") == "oryx" and "model_file" in config:
            return "mlx-lm"
    adapter = _small_json(path / "adapter.json")
    if isinstance(adapter, dict) and adapter.get("format") == "oryx-adapter":
        return "adapter"
    adapter = _small_json(path / "adapter.json")
    if isinstance(adapter, dict) and adapter.get("format") == "oryx-adapter":
        return "adapter"
    meta = _small_json(path / "meta.json")
    if isinstance(meta, dict) and meta.get("format") == "oryx-tokens":
        return "shards"
    if (path / "state.json").is_file() and (path / "model").is_dir():
        return "training-checkpoint"
    if (path / "log.jsonl").is_file() or (path / "checkpoints" / "latest.json").is_file():
        return "run"
    return None


def _describe(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symlink"
    if path.is_dir():
        kind = artifact_kind(path)
        return KINDS[kind] if kind else "a directory that is not an Oryx artifact"
    if path.is_file():
        return "a file"
    return "not a regular file or directory"


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def guard_replacement(dst, kind: str | None = None, force: bool = False, flag: str = "") -> None:
    """Raises OutputError when dst exists and may not be replaced by an artifact of `kind` (None: by any Oryx
    artifact): it holds something else, and neither force nor replacing_allowed permits it."""
    dst = Path(dst)
    if not os.path.lexists(dst) or force or _resolved(dst) in _forced.get() or _is_empty_dir(dst):
        return
    found = artifact_kind(dst) if dst.is_dir() else None
    if found is not None and (found == kind or (kind is None and found != "tokenizer")):
        return
    wanted = KINDS[kind] if kind else "an Oryx artifact"
    remedy = ("pass --force to write the run into it anyway" if kind == "run"
              else "pass --force to replace it (everything in it is deleted)")
    raise OutputError(f"{flag + ' ' if flag else ''}{dst}: exists and is {_describe(dst)}, not {wanted}; {remedy}")


def check_output(dst, kind: str, sources=(), force: bool = False, flag: str = "OUT") -> Path:
    """Checks a command's destination before any work: raises one-line OutputError when dst equals, contains or
    lies inside a source (`sources`: (label, path) pairs; None paths skipped), or exists and is not replaceable
    (guard_replacement). Returns dst."""
    dst = Path(dst)
    real = _resolved(dst)
    ancestor = real.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {dst}: {ancestor} is not a directory, so nothing can be written under it")
    for label, source in sources:
        if source is None:
            continue
        src = _resolved(source)
        if real == src or _same_file(real, src):
            raise OutputError(f"{flag} {dst}: is the {label} {source}; write the output elsewhere")
        if src in real.parents or any(_same_file(parent, src) for parent in real.parents):
            raise OutputError(f"{flag} {dst}: lies inside the {label} {source}; write the output elsewhere")
        if real in src.parents or any(_same_file(parent, real) for parent in src.parents):
            why = "keep a run apart from what it reads" if kind == "run" else "replacing it would delete that"
            raise OutputError(f"{flag} {dst}: contains the {label} {source}; {why}, so write the output elsewhere")
    if kind in ("tokenizer", "text"):
        if dst.is_dir():
            raise OutputError(f"{flag} {dst}: is a directory; give a file name")
        if os.path.lexists(dst) and not force and artifact_kind(dst) != kind:
            raise OutputError(f"{flag} {dst}: exists and is not {KINDS[kind]} this command wrote; "
                              "pass --force to replace it")
        return dst
    guard_replacement(dst, kind, force, flag)
    return dst
