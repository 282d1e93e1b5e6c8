"""
Files that must survive a kill: the one way codecgpt writes what a later run reads, and the one reader of a
training log. Standard library only, so that every other file can import it (figures.py and pitch.py need no
torch to write a picture).

- atomic_write: every file written for later (checkpoints, the token cache, the rewritten training log, the
  fitted untrained codec, pictures) goes to a temporary file in the same folder, is flushed to disk and renamed
  over the old one, so a reader sees the old file or the new one, never part of one, even after a kill.
- read_log / append_log / rewrite_log: log.jsonl, one JSON object per evaluation (train.py and train_codec.py
  append them; figures.py draws them; --resume cuts the log back to the checkpoint it continues from).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(f) on a temporary file beside path, flush it to disk, then rename it to path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: two writers never share a file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    """The evaluations in a log.jsonl: every line that is a JSON object with an integer "iter". A line cut short
    by a kill is skipped rather than failing, so that the curves of a broken run can still be drawn."""
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
    """One evaluation, one line."""
    with open(path, "a") as log:
        log.write(json.dumps(entry) + "\n")


def rewrite_log(path: str | Path, upto: int, last: dict) -> None:
    """Make the log end where the checkpoint we resume from ends: drop evaluations logged after it (the run was
    killed between writing the log and the checkpoint) and lines cut short, and put the checkpoint's own back."""
    kept = [entry for entry in read_log(path) if entry["iter"] < upto] if Path(path).exists() else []
    kept.append(last)
    atomic_write(path, lambda f: f.write("".join(json.dumps(entry) + "\n" for entry in kept).encode()))
