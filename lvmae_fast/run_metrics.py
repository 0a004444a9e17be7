"""A run's metrics: RUN/metrics.jsonl (one JSON object per logged step), RUN/val.json (the last
validation loss), their cuts on resume and rewind, throughput meters and the loss plot."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import append_whole, atomic_write, atomic_write_text, write_error

VAL_NAME = "val.json"


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: it and anything after is not trusted
    return records


def write_val(out: Path, step: int, val_loss: float | None) -> None:
    """RUN/val.json: the last validation loss and its step, written at every evaluation (a run stopped
    early keeps its last one)."""
    if val_loss is not None:
        atomic_write_text(out / VAL_NAME, json.dumps({"step": step, "val_loss": val_loss}) + "\n")


def drop_later_val(out: Path, step: int, keep_dropped: Path | None = None) -> None:
    """When val.json is of a step after `step` (the checkpoint resumed; metrics.jsonl already cut there):
    that evaluation is redone (resume) or abandoned (rewind: appended to keep_dropped, a JSON line per
    rewind, first), and val.json goes back to the last evaluation metrics.jsonl keeps (none: removed), as
    a run that stopped at `step` had it."""
    path = out / VAL_NAME
    try:
        text = path.read_text()
        later = json.loads(text)["step"] > step
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not later:
        return
    if keep_dropped is not None:
        append_atomically(keep_dropped, text.strip() + "\n")
    kept = [r for r in read_metrics(out / "metrics.jsonl") if r.get("val_loss") is not None and r.get("step", 0) <= step]
    if kept:
        write_val(out, kept[-1]["step"], kept[-1]["val_loss"])
    else:
        path.unlink()


def truncate_metrics(path: Path, step: int, keep_dropped: Path | None = None) -> None:
    """Keep only records up to `step` (the checkpoint we resume from); later ones will be recomputed.
    keep_dropped: append the dropped records there first (a rewind abandons them; they are not redone)."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = [r for r in records if r.get("step", 0) > step]
    if keep_dropped is not None and dropped:
        append_atomically(keep_dropped, "".join(json.dumps(r) + "\n" for r in dropped))
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_atomically(path: Path, text: str) -> None:
    """path's text + `text`, rewritten whole (temp + rename): a kill leaves the old file or the new one.
    Not again when the file already ends with `text`: a rewind killed after this append, then run again,
    appended its abandoned records twice (a later rewind's records differ, in time_s at least)."""
    old = path.read_text() if path.exists() else ""
    if text and old.endswith(text):
        return
    atomic_write_text(path, old + text)


def plot_loss(run: Path) -> Path | None:
    records = read_metrics(run / "metrics.jsonl")
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (fixed crops/masks)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked reconstruction loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run / "loss.png"
    try:  # atomically: a full disk leaves the previous plot, not a cut-off file
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


class Throughput:
    """Tokens/s and samples/s since the last report. Steps are counted when their loss has been read
    back, i.e. once the device has finished them, so no extra synchronisation is needed."""

    def __init__(self, time_before: float = 0.0):
        """time_before: seconds of training before this process (a resumed run's last record): time_s
        counts on from there instead of starting again at 0."""
        self.start = time.perf_counter() - time_before
        self.t, self.tokens, self.samples = time.perf_counter(), 0, 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def rates(self, now: float | None = None) -> dict:
        """Rates over the steps added since the last call; `now`: when the last of them finished (default:
        this call). On the CPU a step has finished when it is queued, and is settled only after the next
        step's forward/backward has run: timed at settle, each record would measure the next step's compute
        (and the last record almost none: a made-up rate)."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t, 1e-9)
        rates = {"tokens_per_s": round(self.tokens / elapsed, 1), "samples_per_s": round(self.samples / elapsed, 2),
                 "time_s": round(now - self.start, 3)}
        self.t, self.tokens, self.samples = now, 0, 0
        return rates


def log_metrics(record: dict, metrics_file, tb) -> None:
    """One line of metrics.jsonl (unbuffered: a killed run keeps what it logged) and the TensorBoard scalars.
    metrics_file: opened "ab" with buffering=0. A failed write (disk full) is cut back off, so the file
    never ends in a torn line, and reported as one line naming the file."""
    try:
        append_whole(metrics_file, (json.dumps(record) + "\n").encode())
    except OSError as err:
        raise write_error(f"could not write step {record['step']} to {metrics_file.name}", err,
                          then=" (the run stops here; --resume continues from the latest checkpoint)") from err
    if tb is not None:
        for key, value in record.items():
            if key not in ("step", "epoch", "time_s"):
                tb.add_scalar("val/loss" if key == "val_loss" else f"train/{key}", value, record["step"])
