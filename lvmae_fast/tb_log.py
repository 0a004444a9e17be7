"""TensorBoard scalars beside metrics.jsonl, which holds the same values: a write that fails (disk full,
quota) turns TensorBoard off with one warning naming the folder, instead of a traceback from its writer
thread and a run stopped by an error naming no file."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .atomic import write_reason

log = logging.getLogger(__name__)


class TensorBoardLog:
    def __init__(self, folder, purge_step: int | None = None):
        self.folder, self.writer = Path(folder), None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder), purge_step=purge_step)
        except OSError as err:
            self._off(err)

    def _off(self, err: OSError) -> None:
        log.warning("TensorBoard events are not written to %s from here on (%s); metrics.jsonl holds the same "
                    "values", self.folder, write_reason(err, self.folder))
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
