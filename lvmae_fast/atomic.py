"""Atomic, durable file replacement: nothing written is ever seen half-done or lost to a crash."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path) -> None:
    """A rename is durable only once its directory is: after a power cut the directory entry could
    otherwise still name the old file (or nothing) while data that refers to the new one survived."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# Read once at import: os.umask is process-wide, so reading it per write would race with other threads.
_FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path, write) -> None:
    """write(tmp_path) fills a temp file in the same directory; it is fsynced, renamed over `path`, and
    the directory is fsynced. Readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; a store or checkpoint is read by other users and jobs too.
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
