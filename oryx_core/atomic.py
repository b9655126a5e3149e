"""Atomic file system helpers: a file or directory appears whole under its name, or not at all.

Standard library only, so that scripts run by a bare python3 (scripts/corpus) can use them too."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .output import guard_replacement


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes a file through a temp file in the same directory and a rename, with the permissions a
    plain open() would give it (mkstemp's are private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# A temp or set-aside name carries the writer's pid, so that a later writer can tell an abandoned one (its process
# is gone) from one a running writer still owns, and remove only the abandoned ones.
TEMP_TAG, OLD_TAG = "oryx-tmp", "oryx-old"
_OURS = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TEMP_TAG}|{OLD_TAG})-(?P<pid>\d+)(-.*)?$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(old-\d+|[A-Za-z0-9_]{8}\.tmp)$")  # names older Oryx versions used
# "POINT:NAME:MARKER_FILE": a save of a destination named NAME (or any, for "*") stops at POINT ("swap": the new
# tree is complete and flushed; "aside": the old one is set aside) so that tests can kill -9 it there
PAUSE_ENV = "ORYX_PAUSE_AT"


def temp_prefix(dst: Path) -> str:
    return f".{dst.name}.{TEMP_TAG}-{os.getpid()}-"


def _old_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{OLD_TAG}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    """Deletes a file, a symlink (not its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flushes every file and directory under root to disk, so a rename never publishes unwritten data."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(directory))


def _say(message: str) -> None:
    print(f"oryx: note: {message}", file=sys.stderr)


def remove_stale_temps(dst: str | Path, report=_say) -> list[Path]:
    """Cleans up after writers of dst that were killed: removes their temp files and directories, puts a
    set-aside old version back where dst is missing (a kill between the two renames of a replacement) and
    removes it where dst is present; reports leftovers of older Oryx versions instead of deleting them.
    Leftovers of writers still running are left alone. Returns what it removed or restored."""
    dst = Path(dst)
    parent = dst.parent
    if not parent.is_dir():
        return []
    handled = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        ours = _OURS.match(entry.name)
        if ours and ours["name"] == dst.name and not _process_alive(int(ours["pid"])):
            if ours["tag"] == OLD_TAG and not os.path.lexists(dst):
                os.replace(entry, dst)
                report(f"restored {dst} from {entry.name}, which an interrupted replacement had set aside")
            else:
                _remove(entry)
            handled.append(entry)
        elif not ours:
            legacy = _LEGACY.match(entry.name)
            if legacy and legacy["name"] == dst.name:
                report(f"{entry} looks left over from an interrupted save of {dst}; remove it if you do not need it")
    return handled


def _pause_for_tests(point: str, dst: Path) -> None:
    """When ORYX_PAUSE_AT names this point and destination, writes its marker file and waits (up to a minute)."""
    spec = os.environ.get(PAUSE_ENV, "").split(":", 2)
    if len(spec) != 3 or spec[0] != point or spec[1] not in ("*", dst.name):
        return
    Path(spec[2]).write_text(str(os.getpid()))
    time.sleep(60)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the names a and b (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system cannot, so that the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_directory(dst: str | Path, fill, report=_say) -> Path:
    """Calls fill(tmp_dir) on a fresh directory beside dst, flushes it to disk and moves it to dst.

    dst, if it exists (a directory or a file), is replaced only at the end and all at once: by an atomic swap
    where the system has one, else by setting it aside, renaming the new one in, and putting it back if that
    fails. A kill -9 at any moment leaves dst whole (old or new); what the killed writer left beside it is
    removed by the next writer of dst (remove_stale_temps)."""
    dst = Path(dst)
    guard_replacement(dst)  # an existing dst that is not an Oryx artifact needs --force (replacing_allowed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst, report)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=temp_prefix(dst)))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary directory
        fill(tmp)
        _fsync_tree(tmp)
        _pause_for_tests("swap", dst)
        if not os.path.lexists(dst):
            os.replace(tmp, dst)
        elif _exchange(tmp, dst):
            _fsync_directory(dst.parent)
            _remove(tmp)  # now the old version
        else:
            old = _old_name(dst)
            os.replace(dst, old)
            _pause_for_tests("aside", dst)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            _fsync_directory(dst.parent)
            _remove(old)
        _fsync_directory(dst.parent)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
