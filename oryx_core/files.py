"""Opening the files a reader is pointed at, strictly: every defect is one FormatError naming the file.

Readers take file names from files they read (an index's weight_map, a meta.json's shard list,
a training run's latest.json). Such a name must be a plain file name inside the directory that
names it: no separators, no `..`, no absolute path, and no symlink resolving outside. What it
names must be a regular file: a device (`/dev/zero`) or a FIFO would make a read never end, so
files are checked with stat before they are opened and again with fstat on the open descriptor
(opened with O_NONBLOCK, which keeps opening a FIFO from waiting for a writer).

JSON is read with a size cap and a nesting cap (Python's parser recurses once per level), with
duplicate keys refused, and the non-standard NaN/Infinity literals too unless a reader of foreign
files (Hugging Face configs, which Python's json may write with them) admits them.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 256


class FormatError(ValueError):
    """A file or directory that is not what its reader needs (a checkpoint, a shard, an index, a config ...)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "of an unknown file type"


def check_regular(path: str | Path) -> int:
    """The size of path, a regular file (symlinks followed); else FormatError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    return st.st_size


def open_regular(path: str | Path):
    """A binary file object reading path, which must be a regular file (checked before and after opening)."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise FormatError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_file_name(name, where: str) -> str:
    """name if it is a plain file name (no directory part, not . or ..), else FormatError naming `where`."""
    if not isinstance(name, str):
        raise FormatError(f"{where}: file names must be strings, got {type(name).__name__} {name!r:.60}")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or len(name) > 255):
        raise FormatError(f"{where}: {name!r:.80} is not a plain file name inside the directory")
    return name


def member(directory: str | Path, name, where: str, regular: bool = True) -> Path:
    """directory/name for a plain file name whose real path stays inside directory, and (by default) is a
    regular file; `where` names the file the name came from."""
    directory = Path(directory)
    check_file_name(name, where)
    path = directory / name
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise FormatError(f"{where}: {name!r} resolves outside {directory}")
    if regular:
        check_regular(path)
    return path


def _reject_constant(literal: str):
    raise ValueError(f"{literal} is not JSON")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r:.80}")
            seen.add(key)
    return out


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than limit (vectorised, no recursion)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    code = np.frombuffer(_STRING.sub(b"", data), dtype=np.uint8)
    steps = ((code == ord("[")) | (code == ord("{"))).astype(np.int32) - ((code == ord("]")) | (code == ord("}")))
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def parse_json(data: bytes | str, where: str, max_depth: int = MAX_JSON_DEPTH, constants: bool = False):
    """The JSON value of data; FormatError (naming `where`) for anything but strict, shallow JSON
    (`constants` admits the NaN/Infinity literals that Python's json writes)."""
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else data.encode("utf-8", errors="surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: not valid JSON (not UTF-8)") from None
    if json_depth_exceeds(raw, max_depth):
        raise FormatError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=None if constants else _reject_constant)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, a duplicate key, NaN/Infinity
        raise FormatError(f"{where}: not valid JSON ({e})") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              constants: bool = False):
    """The JSON value of a regular file of at most max_bytes; FormatError naming the file otherwise."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FormatError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file here may have")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FormatError(f"{path}: more than the {max_bytes} bytes a JSON file here may have")
    return parse_json(data, str(path), max_depth, constants)


def read_json_object(path: str | Path, max_bytes: int = MAX_JSON_BYTES, constants: bool = False) -> dict:
    value = read_json(path, max_bytes, constants=constants)
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
