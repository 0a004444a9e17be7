"""Atomic, durable file replacement: nothing written is ever seen half-done or lost to a crash."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class WriteError(OSError):
    """A write that failed (disk full, I/O error, file too large, permission lost mid-run): str() is one
    line naming what could not be written and why, for the CLI's one-line error (an OSError, so it is
    reported like any other path the system refuses)."""

    def __init__(self, message: str, errno_: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.errno = errno_  # set after: str() stays the message, not "[Errno N] ..."
        self.reason = reason or message

    def within(self, context: str) -> "WriteError":
        """The same failure, its message prefixed with what the run was doing ("interrupted by SIGINT ...")."""
        return WriteError(f"{context}; {self}", self.errno, self.reason)


def _write_errors() -> tuple[type, ...]:
    """Exceptions a failed write surfaces as: OSError, and the library errors that wrap one: torch.save's
    RuntimeError ('[enforce fail at inline_container.cc:...] unexpected pos ...') and safetensors'
    SafetensorError ('Error while serializing: I/O error: No space left on device (os error 28)')."""
    errors: tuple[type, ...] = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - a core dependency
        return errors
    return (*errors, SafetensorError)


WRITE_ERRORS = _write_errors()


def write_reason(err: BaseException, where=None) -> str:
    """Why a write failed, in a few words: the OS's reason (e.g. 'No space left on device'), or for a
    library error that wraps one (torch.save's zip writer raises RuntimeError('[enforce fail at
    inline_container.cc:...] unexpected pos ...')) its first line and, when known, the free space left."""
    if isinstance(err, WriteError):
        return err.reason
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    reason = f"{type(err).__name__}: {first}"
    if where is not None:
        try:
            free = shutil.disk_usage(where).free
            reason += f"; {free / 2**20:.1f} MiB free there (is the disk full?)"
        except OSError:
            pass
    return reason


def write_error(what: str, err: BaseException, where=None, then: str = "") -> WriteError:
    """WriteError "WHAT: REASON THEN" for the failed write `err` (REASON: write_reason(err, where))."""
    reason = write_reason(err, where)
    return WriteError(f"{what}: {reason}{then}", getattr(err, "errno", None), reason)


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


class _WriteOnly:
    """A file seen by numpy as a plain writable object: np.save then writes through its write(), which
    raises when the disk is full or the file too large. Given the file itself, numpy writes the data with
    C stdio (ndarray.tofile) and ignores the error of the final flush: a file cut short by up to 4 KiB came
    back from np.save without a word (RLIMIT_FSIZE, numpy 2.4), and a store committed it."""

    def __init__(self, file):
        self.write = file.write


def atomic_save_npy(path, array) -> None:
    """np.save(path, array) (no pickles) as atomic_write does, every write error raised."""
    import numpy as np

    def write(tmp_path):
        with open(tmp_path, "wb") as f:  # a path would get ".npy" appended to the temp name
            np.save(_WriteOnly(f), array, allow_pickle=False)
    atomic_write(path, write)


def atomic_write(path, write) -> None:
    """write(tmp_path) fills a temp file in the same directory; it is fsynced, renamed over `path`, and
    the directory is fsynced. Readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # no inodes left, directory not writable
        raise write_error(f"could not write {path}", err) from err
    os.close(fd)
    try:
        # mkstemp makes the file 0600; a store or checkpoint is read by other users and jobs too.
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # again: a writer that replaces the file (safetensors) leaves its own 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WRITE_ERRORS as err:
        # Disk full, I/O error, file too large, permission lost: one line naming the file (the OS's own
        # message often names only the temp file, or nothing; libraries wrap it, see _write_errors).
        if isinstance(err, WriteError):
            raise
        raise write_error(f"could not write {path}", err, path.parent) from err
    finally:
        try:  # removed on failure (a full disk must not keep a half-written copy); best effort, so the
            os.unlink(tmp)  # write's own error is the one reported
        except OSError:
            pass
    try:
        fsync_dir(path.parent)
    except OSError as err:
        # The new file is in place and every reader sees it: reporting the write as failed would make
        # callers undo what is already visible (a store would delete the shards its new index names).
        # Only its survival across a power cut is in doubt, so say that and go on.
        log.warning("wrote %s, but could not sync its directory (%s): the new file may not survive a "
                    "power cut", path, err.strerror or err)


def is_temp_file_name(name: str) -> bool:
    """Whether `name` is one of atomic_write's temp files (`.NAME.RANDOM.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp") and len(name) > len("..tmp")


def remove_stale_temps(folder, names) -> None:
    """Delete atomic_write's temp files for these file names in `folder`: a writer killed mid-write leaves
    its temp file (the cleanup never runs), as large as what it was writing. Only by the folder's one
    writer (under its lock), before it writes: another writer's live temp file would go too."""
    for name in names:
        for p in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def atomic_write_text(path, text: str) -> None:
    """atomic_write of a text file (config, pointer, JSON results)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def append_whole(file, data: bytes, sync: bool = False) -> None:
    """Append `data` to a binary file opened unbuffered ("ab", buffering=0) in full or not at all: a
    write that fails part way (disk full), or is interrupted, is cut back off, so the file never ends in
    a torn line; the error is re-raised for the caller to name. sync: fsync it too, inside the same
    all-or-nothing (a journal line is committed only once it is durable)."""
    start = file.tell()
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view):]
        if sync:
            os.fsync(file.fileno())
    except BaseException:
        try:
            file.truncate(start)
        except OSError:
            pass
        raise
