"""Atomic file writes: a destination is always either the old complete file or the new one.

A write goes to a temp file ``.<name>.<random>.tmp`` in the destination's folder, is fsynced, then
renamed over the destination. A process killed mid-write leaves at most such a temp file: it is
never read as a model (its name differs), and a later save to the same destination removes those
older than :data:`STALE_TEMP_SECONDS` (younger ones may belong to a concurrent writer).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .errors import MLPersonalError

#: Temp files of an interrupted write older than this are removed by the next save.
STALE_TEMP_SECONDS = 3600


class ModelWriteError(MLPersonalError, OSError):
    """A model file could not be written (folder missing or read-only, disk full, ...)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ModelWriteError(
            f"cannot write {path}: {e.strerror or e}; check that {folder} is a writable folder"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise ModelWriteError(
                f"writing {path} failed ({e.strerror or e}); the previous file, if any, is unchanged"
            ) from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    remove_stale_temps(path)
    return path


def remove_stale_temps(path: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temp files of interrupted writes to ``path`` older than ``older_than`` seconds."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    now = time.time()
    removed = 0
    for p in folder.glob(f".{_glob_escape(path.name)}.*.tmp"):
        try:
            if now - p.lstat().st_mtime > older_than and p.is_file():
                p.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
