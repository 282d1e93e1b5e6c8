"""
Files that must survive a kill, and the errors the programs print as one line. Standard library only, so that every
other file can import it.

- atomic_write: every file written for later goes to a temporary file beside it, is flushed to disk and renamed over
  the old one, so that a reader sees the old file or the new one, never part of one.
- read_log / append_log / rewrite_log: log.jsonl, one JSON object per evaluation (--resume cuts it back to the
  checkpoint it continues from).
- WriteError: a write that failed (a full disk...), after putting things back: the file keeps its previous version.
- DataError: a problem with the user's files or settings, naming the file or flag.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Callable


class DataError(Exception):
    """A problem with the user's data or settings, reported as one line naming the file or flag."""


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota, a read-only folder), as one line."""


def write_error(path: Path, e: OSError) -> WriteError:
    """The WriteError for path: what the system said, and the space left on its disk (the usual cause)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    error = WriteError(f"cannot write {path}: {e.strerror or e} ({free}); any previous version of it is unchanged")
    error.errno = e.errno
    return error


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError that e is, or that it was raised while handling (torch.save reports a full disk as a RuntimeError
    of its zip writer, raised after the OSError: docs/troubleshooting.md)."""
    seen = set()
    while isinstance(e, Exception) and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(f) on a temporary file beside path, flush it to disk, then rename it to path. If anything fails
    the temporary file is removed, so path is as it was; an OSError (ENOSPC...) becomes a WriteError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: two writers never share a file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here, when the data really has to go to it
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error_behind(e)
        if cause is not None and not isinstance(e, WriteError):
            raise write_error(path, cause) from None
        raise
    try:  # make the rename itself durable (a crash right after it could otherwise undo it)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # some file systems cannot fsync a folder; the rename has happened either way
        pass


# ----------------------------------------------------------------------------------------------------
# log.jsonl

def read_log(path: str | Path) -> list[dict]:
    """The evaluations in a log.jsonl: every line that is a JSON object with an integer "iter" (not one cut short
    by a kill)."""
    entries = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("iter"), int):
            entries.append(entry)
    return entries


def append_log(path: str | Path, entry: dict) -> None:
    """One evaluation, one line; a line that cannot be written whole (a full disk) is cut off again."""
    path, line = Path(path), (json.dumps(entry) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            rest = memoryview(line)
            while rest:  # os.write may write part of it, then fail on the rest
                rest = rest[os.write(fd, rest):]
        except OSError as e:
            os.ftruncate(fd, size)
            raise write_error(path, e) from None
    finally:
        os.close(fd)


def rewrite_log(path: str | Path, last: dict) -> None:
    """Make the log end with `last`, the evaluation the checkpoint we resume from holds: lines after it (logged
    before a kill, with no checkpoint) and lines cut short are dropped."""
    kept = [entry for entry in read_log(path) if entry["iter"] < last["iter"]] if Path(path).exists() else []
    kept.append(last)
    atomic_write(path, lambda f: f.write("".join(json.dumps(entry) + "\n" for entry in kept).encode()))
