"""Telling a Ctrl-C apart when a library has turned it into something else.

numpy's ndarray.tofile/fromfile check `isinstance(file, os.PathLike)` and read an error from that check
(a KeyboardInterrupt raised in its Python code) as "not a path": the interrupt comes back as a
TypeError, with the KeyboardInterrupt as its context. torch's C start-up imports numpy and clears an
error raised there, so a Ctrl-C while torch loads is lost altogether (the command ran on)."""
from __future__ import annotations

import contextlib
import signal
import threading


def caused_by_interrupt(err: BaseException) -> bool:
    """`err` is, or was raised while handling, a KeyboardInterrupt."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def interrupts_noted():
    """Within: a Ctrl-C (SIGINT) is noted, not raised, so code that would swallow it cannot; yields a list
    that holds True once one came. Only in the main thread and where Ctrl-C would interrupt (not where
    SIGINT is ignored, e.g. a background job)."""
    noted: list[bool] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda *_: noted.append(True))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)
