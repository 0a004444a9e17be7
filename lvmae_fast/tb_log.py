"""TensorBoard scalars beside metrics.jsonl, which holds the same values: a write that fails (disk full,
quota) turns TensorBoard off with one warning naming the folder, instead of a traceback from its writer
thread and a run stopped by an error naming no file."""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from .atomic import write_reason

log = logging.getLogger(__name__)


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a failed write, which threading prints as a traceback; the
    same error reaches the next add_scalar or close, where TensorBoardLog turns TensorBoard off with one
    warning. Installed over whatever hook is current (once); other threads' errors go to that hook."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard_writer", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)
    hook.quiets_tensorboard_writer = True
    threading.excepthook = hook


class TensorBoardLog:
    def __init__(self, folder, purge_step: int | None = None):
        self.folder, self.writer = Path(folder), None
        _quiet_writer_thread_errors()  # first: the writer's thread writes the file's first event at once
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder), purge_step=purge_step)
        except (OSError, UnicodeError) as err:  # UnicodeError: a folder name that is not UTF-8
            self._off(err)

    def _off(self, err: Exception) -> None:
        reason = write_reason(err, self.folder if isinstance(err, OSError) else None)
        log.warning("TensorBoard events are not written to %s from here on (%s); metrics.jsonl holds the same "
                    "values", self.folder, reason)
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):   # its thread holds the same error
                writer.close()

    def add_scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            try:
                self.writer.add_scalar(tag, value, step)
            except OSError as err:
                self._off(err)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as err:
                self._off(err)
