"""`lvmae pretrain`: LV-MAE pretraining on an embedding store, with exact resume.

Run directory (RUN = --out)::

    RUN/config.yaml                  resolved PretrainConfig (what --resume starts from)
    RUN/config.json, model.safetensors   latest model: LVMAE.from_pretrained(RUN)
    RUN/metrics.jsonl                one JSON object per logged step: step, epoch, loss, lr, tokens_per_s,
                                     samples_per_s, time_s (seconds of training, summed over resumed
                                     sessions), grad_norm (before clipping; + val_loss at evaluation steps and the last)
    RUN/val.json                     the last validation loss and its step (written at every evaluation)
    RUN/tb/                          TensorBoard events
    RUN/loss.png                     loss curve, drawn at the end
    RUN/checkpoints/step-XXXXXXXX/   config.json + model.safetensors + train_state.pt (optimizer, progress,
                                     RNG, config, store fingerprint); RUN/checkpoints/latest names the newest
    RUN/checkpoints/rewound/, RUN/metrics.rewound.jsonl, RUN/val.rewound.jsonl   what --resume-from STEP
                                     moved aside (each rewind appends; nothing is overwritten)

A checkpoint directory is built under a temp name and renamed into place, then `latest` is replaced
(temp + rename), then the model files are linked into RUN; a kill at any point leaves the previous
checkpoint intact. Checkpoints are written every ckpt_every steps, at the end, on SIGINT/SIGTERM and on a
non-finite loss or gradient norm. Resume is exact: the sampler is a pure function of (seed, epoch, batch index), the lr
of (epoch, batch index), and model/optimizer/RNG state is restored bit for bit, so an interrupted and
resumed run logs the same losses as an uninterrupted one. metrics.jsonl lines written after the
checkpoint a run resumes from are dropped (they are recomputed). A rewind (--resume-from an earlier
checkpoint, e.g. with a lower lr after a non-finite step) abandons a branch instead: its later
checkpoints and metrics are moved aside, not deleted.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from . import train_config as tc
from .atomic import (WRITE_ERRORS, WriteError, append_whole, atomic_write, atomic_write_text, fsync_dir,
                     remove_stale_temps, write_error)
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_safetensors
from .devices import resolve_device
from .graphs import GraphedTrainStep, fused_step, grad_norm_, nonfinite
from .model import LVMAE, LVMAEConfig
from .sampler import VAL_EPOCH, LongVideoSampler, kept_by_policy, max_crop_segments, split_videos
from .store import Store, WriterLock, scan_nonfinite
from .tb_log import TensorBoardLog

log = logging.getLogger(__name__)
STATE_NAME, LATEST_NAME = "train_state.pt", "latest"
REWOUND_DIR, REWOUND_METRICS, REWOUND_VAL = "rewound", "metrics.rewound.jsonl", "val.rewound.jsonl"
VAL_NAME = "val.json"
# What a run dir holds: --out must be new, empty, or hold only these (dot-files are atomic-write temps;
# val.rewound.json: one rewind's val.json, as runs before 2026-11-27c kept it).
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", REWOUND_METRICS, "checkpoints", "tb", "loss.png",
                         "model.safetensors", "config.json", VAL_NAME, REWOUND_VAL, "val.rewound.json"})
EXIT_NONFINITE, EXIT_SIGNAL = 3, {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---- learning rate ------------------------------------------------------------------------------
def lr_at(epoch_progress: float, base_lr: float, cfg: tc.PretrainConfig) -> float:
    """MAE schedule, per iteration: linear warmup, then half-cycle cosine to min_lr (epoch_progress in epochs)."""
    if epoch_progress < cfg.warmup_epochs:
        return base_lr * epoch_progress / cfg.warmup_epochs
    span = cfg.epochs - cfg.warmup_epochs
    t = (epoch_progress - cfg.warmup_epochs) / span if span > 0 else 0.0
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---- checkpoints --------------------------------------------------------------------------------
def is_complete(ckpt: Path) -> bool:
    """A checkpoint folder holding all its files (a kill while pruning one used to leave some)."""
    return all((ckpt / f).is_file() for f in (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME))


def complete_checkpoints(ckpt_root: Path) -> list[str]:
    """Names of the complete checkpoints (step-N holding all its files) in RUN/checkpoints, oldest first."""
    return sorted(p.name for p in ckpt_root.glob("step-*") if is_complete(p)) if ckpt_root.is_dir() else []


def other_checkpoints(ckpt_root: Path, name: str) -> str:
    """The latest three complete checkpoints other than `name`, for a message naming what to resume ("" if none)."""
    return ", ".join([n for n in complete_checkpoints(ckpt_root) if n != name][-3:])


def checkpoint_by_name(out: Path, name: str) -> Path:
    """RUN/checkpoints/step-N for name 'step-N' or 'N'; ValueError listing the checkpoints otherwise
    (also for a path: a rewind moves checkpoints and rewrites `latest`, which must stay in this run)."""
    root = out / "checkpoints"
    have = complete_checkpoints(root)
    number = re.fullmatch(r"(?:step-)?(\d+)", name)
    if not number:
        raise ValueError(f"--resume-from takes the name of a checkpoint in {root}: step-N or N, got {name!r} "
                         f"(have: {', '.join(have) or 'none'})")
    name = f"step-{int(number.group(1)):08d}"  # 36, step-36 and step-00000036 name one checkpoint
    path = root / name
    if not is_complete(path):
        raise ValueError(f"--resume-from {name}: no such complete checkpoint in {root} (have: {', '.join(have) or 'none'})")
    return path


def later_checkpoints(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.parent.glob("step-*") if p.is_dir() and p.name > ckpt.name)


def needs_rewind(out: Path, ckpt: Path) -> bool:
    """Whether --resume-from `ckpt` has work to do: `latest` names another checkpoint, or later ones are
    still in place (a rewind killed after moving some of them, whose `latest` may name a moved one)."""
    pointer = out / "checkpoints" / LATEST_NAME
    latest = pointer.read_text().strip() if pointer.is_file() else None
    return latest != ckpt.name or bool(later_checkpoints(ckpt))


def rewind_to(out: Path, ckpt: Path) -> None:
    """Make `ckpt` the latest: later checkpoints move to checkpoints/rewound/ and later metrics records
    to metrics.rewound.jsonl, a later val.json to val.rewound.jsonl (kept, not deleted: that branch of the
    run is abandoned, not recomputed)."""
    root = ckpt.parent
    later = later_checkpoints(ckpt)
    if later:
        (root / REWOUND_DIR).mkdir(exist_ok=True)
    for p in later:
        target = root / REWOUND_DIR / p.name
        if target.exists():  # rewound past this step before: keep both
            target = target.with_name(f"{p.name}.{int(time.time())}")
        os.replace(p, target)
    step = int(ckpt.name.split("-")[1])
    truncate_metrics(out / "metrics.jsonl", step, keep_dropped=out / REWOUND_METRICS)
    drop_later_val(out, step, keep_dropped=out / REWOUND_VAL)
    atomic_write_text(root / LATEST_NAME, ckpt.name)
    link_model_files(out, ckpt)
    log.info("rewound %s to %s (%d later checkpoints moved to %s/)", out, ckpt.name, len(later), root / REWOUND_DIR)


def check_run_dir(out: Path, store_path: Path, resume: bool) -> None:
    """--out must be a new or empty directory, or (with --resume) one that holds only a run's files:
    a model folder or any other data there would be overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the run")
    if out == store_path or store_path in out.parents:
        raise ValueError(f"--out {out} is inside the store {store_path}; keep runs outside the store")
    if not out.is_dir():
        return
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    foreign = sorted(set(entries) - RUN_ENTRIES)
    if foreign:
        raise ValueError(f"--out {out} holds files that are not a run's ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}); choose a new or empty directory")
    if {"model.safetensors", "config.json"} & set(entries) and "checkpoints" not in entries:
        # A run links its model files from a checkpoint: these belong to a model folder.
        raise ValueError(f"--out {out} holds a model (model.safetensors / config.json) but no run "
                         "(no checkpoints/); choose a new or empty directory")
    if entries and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / LATEST_NAME
    if not pointer.is_file():
        # A kill between a first checkpoint's rename and its `latest` leaves a complete step-N and no pointer.
        done = complete_checkpoints(out / "checkpoints")
        return out / "checkpoints" / done[-1] if done else None
    name = pointer.read_text().strip()
    path = out / "checkpoints" / name
    if name and is_complete(path):
        return path
    if name and (out / "checkpoints" / REWOUND_DIR / name).exists():  # moved aside by a rewind killed midway
        raise ValueError(f"{pointer} names {name}, which a rewind killed midway moved to {REWOUND_DIR}/: "
                         f"run the same --resume-from again to finish it")
    missing = [f for f in (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME) if not (path / f).is_file()] if name else []
    what = ("is empty" if not name else f"names {name}, which is missing" if not path.is_dir()
            else f"names {name}, which lacks {', '.join(missing)}")
    others = other_checkpoints(out / "checkpoints", name)
    raise ValueError(f"{pointer} {what}; " + (f"resume a complete one with --resume-from ({others})"
                                              if others else "no complete checkpoint to resume from"))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    random.setstate(state["python"])


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)  # no second copy of the weights where the filesystem allows
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        # rename(2) does nothing when both names are links to one file (dst already is src's link): the
        # temp name would stay behind.
        tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a copy cut short by a full disk
        raise


def link_model_files(out: Path, ckpt: Path) -> None:
    """RUN/model.safetensors + RUN/config.json: the checkpoint's, so LVMAE.from_pretrained(RUN) loads it."""
    for f in (WEIGHTS_NAME, CONFIG_NAME):  # config last, as save_pretrained does
        _link_or_copy(ckpt / f, out / f)


def save_checkpoint(out: Path, model: LVMAE, optimizer, progress: dict, cfg: tc.PretrainConfig,
                    store_fingerprint: str, prune: bool = True) -> Path:
    """Write RUN/checkpoints/step-N, point `latest` at it, link its model files into RUN, and (prune)
    keep only the newest keep_checkpoints."""
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['step']:08d}"
    final, pointer = ckpt_root / name, ckpt_root / LATEST_NAME
    if final.exists() and pointer.is_file() and pointer.read_text().strip() == name:
        # Already the latest; a kill between the pointer and the links may have left RUN's model older, and
        # one after them the pruning undone (a resume with nothing left to do ends here: the last chance).
        link_model_files(out, final)
        _remove_stale_temps(ckpt_root)
        if prune:
            _prune(ckpt_root, name, cfg.keep_checkpoints)
        return final
    tmp = ckpt_root / f".{name}.tmp"
    _remove_stale_temps(ckpt_root)
    try:
        model.save_pretrained(tmp)
        state = {"progress": dict(progress), "optimizer": portable_optimizer_state(optimizer), "rng": _rng_state(),
                 "config": cfg.to_dict(), "model_config": model.config.to_dict(), "store_fingerprint": store_fingerprint,
                 "file_sha256": model_file_digests(tmp)}
        # Fsynced like the weights: `latest` (itself fsynced) must never name a state still in the page cache,
        # after pruning has removed the checkpoints before it.
        atomic_write(tmp / STATE_NAME, lambda path: torch.save(state, path))
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of this step from a killed run
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException as err:
        # A full disk (ENOSPC; torch.save's zip writer reports it as RuntimeError "unexpected pos") must not
        # leave a multi-GB half-written checkpoint behind; `latest` and earlier checkpoints are untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WRITE_ERRORS):
            raise write_error(f"could not write checkpoint {name} to {ckpt_root}", err, ckpt_root,
                              f" ({_intact(ckpt_root, name)})") from err
        raise
    try:
        atomic_write_text(pointer, name)
    except OSError as err:
        raise write_error(f"wrote checkpoint {final} but could not update {pointer}", err, ckpt_root,
                          f" (it still names the previous checkpoint; {_intact(ckpt_root, name)})") from err
    try:
        link_model_files(out, final)
    except OSError as err:
        raise write_error(f"wrote checkpoint {final} but could not link its model files into {out}", err, out,
                          " (the checkpoint is complete: --resume relinks them)") from err
    if prune:
        _prune(ckpt_root, name, cfg.keep_checkpoints)
    return final


def _remove_stale_temps(ckpt_root: Path) -> None:
    """What killed runs left under temp names (one writer per run dir, RunDirLock): half-written or
    half-pruned checkpoints (.step-N.tmp folders) and a `latest` cut mid-write (.latest.*.tmp)."""
    for stale in ckpt_root.glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _prune(ckpt_root: Path, name: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints (and `name`, the one just written)."""
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        if old.name != name:
            # Out of sight first: a kill midway through deleting leaves a temp name the next save clears
            # (_remove_stale_temps), not a step-N missing some of its files.
            doomed = ckpt_root / f".{old.name}.tmp"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _intact(ckpt_root: Path, name: str) -> str:
    """Which checkpoints a failed save left to resume from, for its error message."""
    done = [n for n in complete_checkpoints(ckpt_root) if n != name]
    return f"earlier checkpoints are intact: {', '.join(done[-3:])}" if done else "no earlier checkpoint"


def portable_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with plain-float learning rates and capturable off, whatever the running
    optimizer uses (whole-step CUDA graphs make both device-side): a checkpoint resumes with or
    without graphs, on any device."""
    state = optimizer.state_dict()
    state["param_groups"] = [{**g, "lr": float(g["lr"]), "capturable": False} for g in state["param_groups"]]
    return state


def model_file_digests(folder: Path) -> dict[str, str]:
    """sha256 of the checkpoint's weights and model config, kept in its train_state.pt (whose zip CRCs are
    checked): safetensors has no checksum, and a flipped bit in the weights resumed silently."""
    return {name: sha256_of(folder / name) for name in (WEIGHTS_NAME, CONFIG_NAME)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_train_state(ckpt: Path) -> dict:
    """The checkpoint's train_state.pt, after checking it and the model files it vouches for."""
    try:
        # torch.load does not check the zip's CRCs: flipped bits (disk, copy) would resume silently.
        with zipfile.ZipFile(ckpt / STATE_NAME) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"damaged data (CRC mismatch in {bad})")
        state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's messages (cut zip, empty file) run over many lines
        raise damaged_checkpoint(ckpt, STATE_NAME, err) from None
    saved = state.get("file_sha256") if isinstance(state, dict) else None
    for name, digest in (saved or {}).items():  # checkpoints from before 2026-11-28 have none
        try:
            found = sha256_of(ckpt / name)
        except OSError as err:
            raise damaged_checkpoint(ckpt, name, err) from None
        if found != digest:
            raise damaged_checkpoint(ckpt, name, ValueError("damaged data (its sha256 differs from the one saved "
                                                            "with the checkpoint)"))
    return state


def damaged_checkpoint(ckpt: Path, name: str, err: BaseException) -> ValueError:
    """One line for a checkpoint file that cannot be read or does not fit: which, why, and what else
    there is to resume from."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    others = other_checkpoints(ckpt.parent, ckpt.name)
    return ValueError(f"checkpoint {ckpt} cannot be resumed: {name}: {first}. "
                      + (f"Resume an earlier one with --resume-from ({others})" if others
                         else "No other checkpoint to resume from"))


# ---- metrics ------------------------------------------------------------------------------------
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


class HostScalars:
    """Device scalars on their way to the host: the copy is queued now (into pinned memory, behind an
    event), so reading them later waits only for the work queued before it. (A plain .item() would
    wait for everything queued on the stream since, e.g. the next step's forward/backward.)"""

    def __init__(self, *scalars: torch.Tensor):
        stacked = torch.stack([s.detach().float().reshape(()) for s in scalars])
        self.event = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


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


# ---- signals ------------------------------------------------------------------------------------
class StopFlag:
    """First SIGINT/SIGTERM asks for a checkpoint and a clean exit; a second one interrupts at once."""

    def __init__(self):
        self.signum = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after the current step", signal.Signals(signum).name)

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# ---- the run ------------------------------------------------------------------------------------
def build_model_config(cfg: tc.PretrainConfig, in_dim: int) -> LVMAEConfig:
    allowed = {f.name for f in fields(LVMAEConfig)} - {"in_dim"}
    unknown = sorted(set(cfg.model) - allowed)
    if unknown:
        raise ValueError(f"model: unknown keys {unknown} (allowed: {sorted(allowed)})")
    return LVMAEConfig.from_preset(cfg.preset, in_dim=in_dim, **cfg.model)


def training_videos(store: Store, cfg: tc.PretrainConfig) -> list[str]:
    """Store ids minus videos with NaN/Inf rows (bad_videos=skip); bad_videos=error refuses to train."""
    bad = scan_nonfinite(store)
    if not bad:
        return list(store.video_ids)
    names = ", ".join(sorted(bad)[:20]) + (" ..." if len(bad) > 20 else "")
    if cfg.bad_videos == "error":
        raise ValueError(f"{len(bad)} videos in {store.path} hold NaN/Inf rows ({names}); see `lvmae store verify`, "
                         f"or pass --set bad_videos=skip to train without them")
    log.warning("skipping %d videos with NaN/Inf rows: %s", len(bad), names)
    return [v for v in store.video_ids if v not in bad]


def check_something_to_mask(store: Store, train_ids: list[str], cfg: tc.PretrainConfig, mask_ratio: float) -> None:
    """short_video_policy=keep leaves 1-segment videos as 1-token crops: keep = max(1, ...) = 1, nothing
    is masked, so they add no loss. Refuse a run made only of them; warn about some."""
    if cfg.short_video_policy != "keep" or mask_ratio <= 0:
        return
    single = sum(store.num_segments(v) == 1 for v in train_ids)
    if single and single == len(train_ids):
        raise ValueError(f"all {single} training videos have 1 segment: with short_video_policy=keep nothing is "
                         "masked and the loss is 0 at every step; use short_video_policy=repeat")
    if single:
        log.warning("%d of %d training videos have 1 segment: with short_video_policy=keep they add no loss",
                    single, len(train_ids))


def check_crop_durations(store: Store, cfg: tc.PretrainConfig) -> None:
    """A crop spans floor(duration / segment seconds) segments; when no drawn duration reaches 2 of the
    store's segments every crop is 1 segment, keep = max(1, ...) leaves it whole and the loss is 0.
    short_video_policy=repeat does tile crops of videos under 5 segments (x3, x8), which would give masked
    tokens, but they are copies of the one visible segment (and longer videos still mask nothing):
    nothing to learn either, so such durations are refused under every policy."""
    seconds = store.segment_seconds
    if max_crop_segments(cfg.duration_min, cfg.duration_max, seconds) >= 2:
        return
    raise ValueError(
        f"duration_min={cfg.duration_min:g} s / duration_max={cfg.duration_max:g} s: crops last at least duration_min "
        f"and less than duration_max seconds, which with this store's {seconds:g}-second segments ({store.path}) is "
        f"never 2 segments, so every crop is 1 segment and nothing is masked (the loss would be 0; "
        f"short_video_policy=repeat would only tile videos under 5 segments into copies of one segment). "
        f"Raise duration_max above {2 * seconds:g} s (2 segments; the {cfg.preset} preset's is "
        f"{tc.PRESETS[cfg.preset]['duration_max']:g} s)")


def check_model_backends(model_cfg: LVMAEConfig, device: torch.device, dtype: torch.dtype) -> None:
    """model.attn_impl / model.kernels that cannot run on this device, dtype and install (flash without
    flash-attn, torch_varlen or triton on the CPU...) are refused before RUN is written: the first
    forward would raise them after config.yaml, and the rerun would then be refused as an existing run."""
    from . import kernels
    from .attention import resolve_impl

    try:
        for head_dim in model_cfg.head_dims:   # encoder's, decoder's
            resolve_impl(model_cfg.attn_impl, device, dtype, head_dim)
        kernels.use_triton(model_cfg.kernels, torch.empty(0, device=device))
    except RuntimeError as err:
        raise ValueError(f"model config on {device} ({str(dtype).replace('torch.', '')}): {err}") from None


def evaluate(model, sampler: LongVideoSampler, device, autocast, num_workers: int) -> float | None:
    """Mean masked loss over the held-out videos (fixed crops and masks), weighted by masked tokens."""
    model.eval()
    total, weight = 0.0, 0
    with torch.no_grad():
        for batch in sampler.loader(VAL_EPOCH, num_workers=num_workers):
            with autocast():
                loss = model(batch.to(device))
            n = int(batch.masked[: batch.num_tokens].sum())  # real masked rows (padding excluded)
            total, weight = total + float(loss) * n, weight + n
    model.train()
    return total / weight if weight else None  # nothing masked: no loss was measured


RUN_BUSY = ("run {path} is in use by another `lvmae pretrain` ({holder}); one run per run dir at a time: wait "
            "for it to finish, or choose another --out")


class RunDirLock:
    """One `lvmae pretrain` per run dir: store.WriterLock's flock on RUN/.lock. Two runs in one dir deleted
    each other's half-written checkpoints and interleaved their metrics. Taken before an existing run's
    checkpoints are read, or right after a new run dir is made (nothing else is written to RUN before)."""

    def __init__(self):
        self._lock: WriterLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def take(self, out: Path) -> None:
        self._lock = WriterLock(out, busy=RUN_BUSY)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# Model settings that only pick an implementation of the same math (as compile, cuda_graphs and device do
# for the run): a run started on flash/torch_varlen must resume on a machine without them.
BACKEND_MODEL_KEYS = ("attn_impl", "kernels")


def check_model_config_resumes(out, saved: dict, now: dict) -> None:
    """Refuse a resume whose model differs from the checkpoint's, naming the keys; backends may change."""
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in BACKEND_MODEL_KEYS)
    if changed:
        raise ValueError(f"cannot resume {out}: the model differs from the checkpoint's: " + ", ".join(
            f"model.{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}" for k in changed))
    backends = [k for k in BACKEND_MODEL_KEYS if saved.get(k) != now.get(k)]
    if backends:
        log.info("resuming with changed backends: %s", ", ".join(f"model.{k}={now.get(k)}" for k in backends))


def pretrain(cfg: tc.PretrainConfig, resume: bool = False, resume_from: str | None = None) -> int:
    """Train per cfg; returns an exit code (0 done, 3 non-finite loss, 130/143 interrupted).
    resume_from: a checkpoint of the run ('step-N' or N) to continue from instead of the latest (a
    rewind, e.g. past a non-finite step with a lower lr); implies resume."""
    lock = RunDirLock()
    try:
        return _pretrain(cfg, resume, resume_from, lock)
    finally:
        lock.release()


def _pretrain(cfg: tc.PretrainConfig, resume: bool, resume_from: str | None, lock: RunDirLock) -> int:
    if not cfg.store or not cfg.out:
        raise ValueError("pretrain needs --store STORE and --out RUN")
    resume = resume or resume_from is not None
    # Absolute paths in the run's config.yaml: --resume may be run from another working directory.
    cfg = dataclasses.replace(cfg, store=os.path.realpath(cfg.store), out=os.path.realpath(cfg.out))
    out = Path(cfg.out)
    check_run_dir(out, Path(cfg.store), resume)
    if out.is_dir():
        lock.take(out)
    store = Store(cfg.store)
    if len(store) == 0:
        raise ValueError(f"store {cfg.store} holds no videos")
    check_crop_durations(store, cfg)  # needs the store's segment length

    # Everything that can refuse the run is checked before anything is written to RUN.
    if resume_from is not None:  # not latest_checkpoint(): a killed rewind may have moved what it names
        ckpt = checkpoint_by_name(out, str(resume_from))
        rewind = needs_rewind(out, ckpt)
    else:
        ckpt, rewind = (latest_checkpoint(out) if out.exists() else None), False
    state = None
    if resume and ckpt is not None:
        state = load_train_state(ckpt)
        conflicts = tc.resume_conflicts(state["config"], cfg)
        if conflicts:
            raise ValueError(f"cannot resume {out}: its checkpoint was trained with another config: " + "; ".join(conflicts))
        if state["store_fingerprint"] not in (store.fingerprint, store.layout_fingerprint):
            raise ValueError(f"cannot resume {out}: store {cfg.store} is not the store it was trained on "
                             f"(index fingerprint differs)")
        changed = [k for k in tc.RESUME_MUTABLE if k not in ("store", "out") and state["config"].get(k) != getattr(cfg, k)]
        if changed:
            log.info("resuming with changed settings: %s", ", ".join(sorted(changed)))
    model_cfg = build_model_config(cfg, store.dim)
    if state is not None:
        check_model_config_resumes(out, state["model_config"], model_cfg.to_dict())
    device = resolve_device(cfg.device)
    use_graphs, use_whole_step = cfg.graphs_for(device.type)
    if device.type == "cuda" and "auto" in (cfg.cuda_graphs, cfg.cuda_graphs_optimizer):
        log.info("cuda_graphs=%s, cuda_graphs_optimizer=%s (auto on %s, %d videos per batch%s)",
                 use_graphs, use_whole_step, device.type, cfg.batch_videos,
                 ", max_tokens set" if cfg.max_tokens else "")
    scfg = cfg.sampler_config(model_cfg, pad_to_buckets=use_graphs)
    train_ids, val_ids = split_videos(training_videos(store, cfg), cfg.val_videos, cfg.seed)
    check_something_to_mask(store, train_ids, cfg, model_cfg.mask_ratio)
    sampler = LongVideoSampler(store, train_ids, scfg)
    val_lengths = np.array([store.num_segments(v) for v in val_ids])
    held_out = len(val_ids)  # neither trained nor, where short_video_policy leaves them out, validated on
    if val_ids and not (kept_by_policy(val_lengths, cfg.short_video_policy, model_cfg.mask_ratio)
                        & ((val_lengths >= 2) | (cfg.short_video_policy == "repeat"))).any():
        # drop: the sampler would drop every one of them and refuse to start; keep: their 1-token crops mask
        # nothing, and a loss of 0 would be reported. Train without validation instead.
        why = {"keep": "keeps 1-segment videos whole (nothing to mask), and all of them have 1 segment",
               "drop": "leaves out 1-segment videos, and all of them have 1 segment"}.get(
            cfg.short_video_policy, f"leaves out videos of n segments with n x (1 - mask_ratio) < 1 (mask_ratio "
                                    f"{model_cfg.mask_ratio:g}), and all of them are")
        log.warning("validation off: none of the %d held-out videos can be validated: short_video_policy=%s %s",
                    len(val_ids), cfg.short_video_policy, why)
        val_ids = []
    val_sampler = LongVideoSampler(store, val_ids, scfg) if val_ids else None
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    check_model_backends(model_cfg, device, torch.bfloat16 if use_bf16 else torch.float32)

    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    model = LVMAE(model_cfg)
    if state is not None:
        try:
            model.load_state_dict(read_safetensors(ckpt / WEIGHTS_NAME))
        except Exception as err:  # noqa: BLE001 - a cut or damaged file (safetensors' own error types)
            raise damaged_checkpoint(ckpt, WEIGHTS_NAME, err) from None
    model.to(device).train()
    effective_batch = sampler.mean_videos_per_batch()
    base_lr = cfg.lr or cfg.blr * effective_batch / 256
    if cfg.min_lr > base_lr:  # the half-cycle "decay" would climb from the peak to min_lr
        raise ValueError(f"min_lr={cfg.min_lr:g} exceeds the peak learning rate {base_lr:g} ("
                         + ("lr" if cfg.lr else f"blr x {effective_batch:g} videos per batch / 256")
                         + "): the schedule decays from the peak to min_lr; lower min_lr")
    # Fused on every device: its found_inf input lets a non-finite step be skipped without a host sync.
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=base_lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    progress = {"step": 0, "epoch": 0, "batch": 0}
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:  # parameter groups of another shape: saved by an older lvmae_fast
            raise damaged_checkpoint(ckpt, f"{STATE_NAME} (optimizer state)", ValueError(
                f"{err}: it was saved with other AdamW parameter groups (before 2026-11-27 the cls/mask tokens "
                "had no weight decay; now they decay, as in the reference)")) from None
        _set_rng_state(state["rng"])
        progress = dict(state["progress"])
    if cfg.compile:
        model.compile_blocks()  # per-block, in place: state-dict names and checkpoints are unchanged
    graphed_step = None
    overlapped = cfg.overlap_update and use_graphs and use_whole_step  # it overlaps the whole-step graphs' update
    if cfg.overlap_update and not overlapped:
        log.warning("overlap_update: off on %s, where whole-step graphs are off (it overlaps their update)", device)
    if use_graphs:
        if device.type != "cuda":
            log.warning("cuda_graphs: %s has no CUDA graphs; running the same shape-bucketed step eagerly", device)
        graphed_step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16 if use_bf16 else None,
                                        capture=device.type == "cuda",
                                        optimizer=optimizer if use_whole_step else None,
                                        grad_clip=cfg.grad_clip, overlap_update=overlapped)
    whole_step = graphed_step is not None and graphed_step.optimizer is not None

    out.mkdir(parents=True, exist_ok=True)
    if not lock.held:  # a new run dir: another run may have made it since the check above
        lock.take(out)
        check_run_dir(out, Path(cfg.store), resume)
        if latest_checkpoint(out) is not None:   # (with --resume an empty dir passes: not one a run has used)
            raise ValueError(f"{out} was started by another run meanwhile; pass --resume to continue it")
    remove_stale_temps(out, RUN_ENTRIES)  # a killed run's half-written config.yaml, loss.png, ... (lock held)
    if rewind:
        rewind_to(out, ckpt)
    atomic_write_text(out / "config.yaml", tc.dump_yaml(cfg))
    metrics_path = out / "metrics.jsonl"
    if resume:  # drop records logged after the checkpoint (all of them when there is none yet)
        truncate_metrics(metrics_path, progress["step"])
        drop_later_val(out, progress["step"])
    tb = TensorBoardLog(out / "tb", purge_step=progress["step"] + 1 if resume else None) if cfg.tensorboard else None

    full = sum(sampler.num_batches(e) for e in range(cfg.epochs))  # where the lr schedule ends
    total_steps = min(full, cfg.max_steps) if cfg.max_steps else full
    if progress["step"] >= total_steps:
        hint = (f"raise --max-steps (up to {full}, where its {cfg.epochs}-epoch schedule ends) to train further"
                if progress["step"] < full else
                f"its {cfg.epochs}-epoch lr schedule is complete (the epoch count is fixed for a run)")
        print(f"lvmae pretrain: nothing to do: {out} is already at step {progress['step']} of {total_steps}; {hint}",
              file=sys.stderr)
    left_out = len(train_ids) - len(sampler.video_ids)  # by short_video_policy
    validated = len(val_sampler.video_ids) if val_sampler is not None else 0
    log.info("pretraining %s (%.2fM params, in_dim %d) on %d videos (%d held out%s%s) from %s; %d steps, lr %.3g, "
             "device %s%s", cfg.preset, model.num_params() / 1e6, store.dim, len(sampler.video_ids), held_out,
             f", {validated} of them validated" if validated != held_out else "",
             f", {left_out} too short for short_video_policy={cfg.short_video_policy}" if left_out else "",
             store.path, total_steps, base_lr, device, f", resuming at step {progress['step']}" if state is not None else "")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    pin = device.type == "cuda"

    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal (CI logs, `2>log`); the log lines say the same.
    bar = tqdm(total=total_steps, initial=progress["step"], unit="step", dynamic_ncols=True,
               disable=None if cfg.progress else True, file=sys.stderr)
    stop, exit_code = StopFlag(), 0
    earlier = read_metrics(metrics_path) if resume else []
    meter = Throughput(earlier[-1].get("time_s", 0.0) if earlier else 0.0)

    def checkpoint():
        return save_checkpoint(out, model, optimizer, progress, cfg, store.fingerprint)

    # The host never waits for the step it just queued: step k's loss is read back while step k+1's
    # forward/backward runs, and before step k+1's optimizer update is queued. A non-finite step is
    # caught without a sync too: its optimizer update is skipped on the device (fused AdamW's found_inf,
    # the GradScaler mechanism), so when the host sees it the parameters are still those before it.
    # With whole-step graphs the update of step k+1 is queued with its forward/backward, so a pending
    # step k is settled first whenever its bookkeeping reads the model (checkpoint, evaluation, the
    # last step); a non-finite step k is covered by the graphs' sticky skip (graphs.py).
    pending: dict | None = None

    def eval_due(step: int) -> bool:
        # The last step is always evaluated, in its own metrics record (and val.json), not only after the loop.
        return val_sampler is not None and (step == total_steps or cfg.eval_every > 0 and step % cfg.eval_every == 0)

    def reads_model(step: int) -> bool:
        return step % cfg.ckpt_every == 0 or step == total_steps or eval_due(step)

    def rewind_advice(earlier: list[str]) -> str:
        """How to recover from a non-finite step: the command resuming the latest of `earlier` with a
        lower lr, and the checkpoints to choose from."""
        lr_flag = "--lr" if cfg.lr else "--blr"
        lr_now = cfg.lr or cfg.blr
        clip = "--grad-clip 1.0 --set overlap_update=false" if overlapped else "--grad-clip 1.0"
        return (f"Rewind to an earlier checkpoint with a lower lr: `lvmae pretrain --out {out} --resume-from "
                f"{earlier[-1] if earlier else 'step-N'} {lr_flag} {lr_now / 10:.3g}` (now {lr_flag} {lr_now:.3g}; "
                f"add {clip} to bound later steps). Checkpoints before it: "
                f"{', '.join(earlier) or 'none (lower the lr and start again with another --out)'}. "
                f"Check the data with `lvmae store verify {cfg.store}`.")

    def settle(metrics) -> bool:
        """Read back the pending step, count it, log / evaluate / checkpoint when due. False (after
        saving the state before it, which overlap_update may not have kept) when its loss or gradient
        norm was non-finite."""
        nonlocal pending, exit_code
        done, pending = pending, None
        loss_value, grad_norm = done["scalars"].values()
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            # The skipped update left the parameters as they were before this step. Earlier checkpoints
            # are kept (no pruning): this state fails again, so recovery starts from one of them.
            what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})"
            where = f"non-finite {what} at step {progress['step'] + 1} (epoch {done['epoch']}, batch {done['batch']})"
            if overlapped and float(graphed_step.partial_update):  # a host read: on this error path only
                # overlap_update applied the update chunks queued before the non-finite gradient (graphs.py):
                # these weights are no step's state, so none is saved.
                msg = (f"{where} with overlap_update: the update chunks queued before the non-finite gradient were "
                       f"applied, so the weights are neither those before this step nor after it; nothing was saved. "
                       + rewind_advice(complete_checkpoints(out / "checkpoints")))
            else:
                try:
                    path = save_checkpoint(out, model, optimizer, progress, cfg, store.fingerprint, prune=False)
                except WriteError as err:
                    raise err.within(f"non-finite {what} at step {progress['step'] + 1}") from err
                earlier = [n for n in complete_checkpoints(path.parent) if n < path.name]
                msg = (f"{where}. Saved the state before this step to {path}; resuming from it runs the same step on "
                       f"the same weights and fails again, whatever the lr. " + rewind_advice(earlier))
            print(f"lvmae pretrain: error: {msg}", file=sys.stderr)  # once (a log.error too printed it twice)
            exit_code = EXIT_NONFINITE
            return False
        progress.update(step=progress["step"] + 1, epoch=done["epoch"], batch=done["batch"] + 1)
        step = progress["step"]
        meter.add(done["tokens"], done["videos"])
        bar.update(1)
        val_loss = None
        if eval_due(step):
            val_loss = evaluate(model, val_sampler, device, autocast, cfg.num_workers)
            write_val(out, step, val_loss)
        if step % cfg.log_every == 0 or val_loss is not None or step == total_steps:
            record = {"step": step, "epoch": done["epoch"], "loss": loss_value, "lr": done["lr"],
                      **meter.rates(done["finished_at"])}
            record["grad_norm"] = grad_norm
            if val_loss is not None:
                record["val_loss"] = val_loss
            log_metrics(record, metrics, tb)
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % cfg.ckpt_every == 0:
            checkpoint()
        return True

    with stop.installed(), open(metrics_path, "ab", buffering=0) as metrics:
        # One loader for the whole run (workers live across epochs; see sampler.EpochStream).
        stream = sampler.stream(progress["epoch"], progress["batch"], cfg.epochs, num_workers=cfg.num_workers,
                                pin_memory=pin, prefetch_factor=cfg.prefetch_factor)
        items = iter(stream)
        while stop.signum is None and progress["step"] + (pending is not None) < total_steps:
            try:
                epoch, i, batch = next(items)
            except StopIteration:
                break
            except RuntimeError:
                if stop.signum is not None:  # a terminal's Ctrl-C also reached the loader's workers
                    break
                raise
            lr = lr_at(epoch + i / sampler.num_batches(epoch), base_lr, cfg)
            if whole_step:  # forward, backward and update: one graph replay on CUDA
                if pending is not None and reads_model(progress["step"] + 1) and not settle(metrics):
                    break
                graphed_step.set_lr(lr)
                loss = graphed_step(batch)
                scalars = HostScalars(loss, graphed_step.grad_norm)
                if pending is not None and not settle(metrics):
                    break
            else:
                if graphed_step is not None:  # forward + backward (one graph replay on CUDA)
                    loss = graphed_step(batch)
                else:
                    batch = batch.to(device, non_blocking=pin)
                    with autocast():
                        loss = model(batch)
                    loss.backward()
                if pending is not None and not settle(metrics):
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss.detach()
                grad_norm = grad_norm_(list(model.parameters()), cfg.grad_clip)
                scalars = HostScalars(loss, grad_norm)  # queued before the update: no wait on it later
                fused_step(optimizer, nonfinite(loss, grad_norm))
                optimizer.zero_grad(set_to_none=True)
            # On the CPU the step is done once queued (its end is timed here); on CUDA it is done when
            # settle has read its scalars back (timed then).
            finished_at = time.perf_counter() if device.type != "cuda" else None
            pending = {"scalars": scalars, "lr": lr, "epoch": epoch, "batch": i, "finished_at": finished_at,
                       "tokens": batch.num_tokens, "videos": batch.num_videos}
        del items, stream
        if exit_code == 0 and pending is not None:
            settle(metrics)
    bar.close()

    # Still under the handlers: a signal during the final checkpoint, evaluation or plot is noted
    # (a second one interrupts at once) instead of killing the process mid-write.
    with stop.installed():
        signalled = stop.signum is not None
        if exit_code == 0:
            try:
                path = checkpoint()
            except WriteError as err:
                if signalled:
                    raise err.within(f"interrupted by {signal.Signals(stop.signum).name} at step {progress['step']}") from err
                raise
            if signalled:
                exit_code = EXIT_SIGNAL[stop.signum]
                print(f"interrupted at step {progress['step']}; checkpoint {path}; continue with --resume",
                      file=sys.stderr)
            elif val_sampler is not None and not eval_due(progress["step"]):  # else just evaluated
                val_loss = evaluate(model, val_sampler, device, autocast, cfg.num_workers)
                if val_loss is not None:
                    log.info("final val loss %.5g", val_loss)
                    if tb is not None:
                        tb.add_scalar("val/loss", val_loss, progress["step"])
                write_val(out, progress["step"], val_loss)
        if tb is not None:
            tb.close()
        plot = plot_loss(out)
        if not signalled and stop.signum is not None and exit_code == 0:
            exit_code = EXIT_SIGNAL[stop.signum]  # arrived after the last step: everything is saved
    print(f"run dir: {out}\n  metrics: {metrics_path}\n  loss curve: {plot}\n"
          f"  model (LVMAE.from_pretrained): {out}\n  checkpoint: {latest_checkpoint(out)}")
    return exit_code


# ---- CLI ----------------------------------------------------------------------------------------
# Explicit flags: (flag, config key, type, help). Anything else goes through --set key=value.
FLAGS = [
    ("--preset", "preset", str, "model + recipe preset; the defaults of every other option"),
    ("--store", "store", str, "embedding store to train on (lvmae store import / lvmae extract)"),
    ("--out", "out", str, "run directory (config.yaml, metrics.jsonl, TensorBoard, loss.png, checkpoints)"),
    ("--epochs", "epochs", int, "epochs over the training videos"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps in total, counted from the run's start "
                                      "(0 = run all epochs)"),
    ("--seed", "seed", int, "seed for init, crops, masks and batch order"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--batch-videos", "batch_videos", int, "videos per batch"),
    ("--max-tokens", "max_tokens", int, "token budget per packed batch instead of a fixed video count (0 = off)"),
    ("--num-workers", "num_workers", int, "DataLoader workers building packed batches"),
    ("--blr", "blr", float, "base lr; lr = blr * effective batch / 256"),
    ("--lr", "lr", float, "absolute lr (overrides --blr when > 0)"),
    ("--grad-clip", "grad_clip", float, "max gradient norm (0 = off)"),
    ("--precision", "precision", str, "auto: bf16 autocast on CUDA, fp32 on CPU"),
    ("--bad-videos", "bad_videos", str, "videos with NaN/Inf rows: error (refuse to train) or skip them"),
    ("--val-videos", "val_videos", int, "held-out videos for a fixed-crop, fixed-mask validation loss"),
    ("--ckpt-every", "ckpt_every", int, "optimizer steps between checkpoints"),
]


# Flags whose config key takes one of a fixed set of values (a config file is checked by PretrainConfig).
FLAG_CHOICES = {"preset": tuple(tc.PRESETS), "precision": tc.PRECISIONS, "bad_videos": tc.BAD_VIDEOS}


def _flag_default(key: str) -> str:
    """How --help states a flag's default: every unset option comes from the preset (tiny unless
    --preset or a config file names another), so the default preset's value is the one shown."""
    if key == "preset":
        return f"default: {tc.DEFAULT_PRESET}"
    if key in ("store", "out"):
        return "no default"
    defaults = {f.name: f.default for f in fields(tc.PretrainConfig)}
    return f"default from the preset; {tc.DEFAULT_PRESET}: {tc.PRESETS[tc.DEFAULT_PRESET].get(key, defaults[key])}"


def config_from_args(args) -> tc.PretrainConfig:
    layers = []
    for path in args.config or []:  # stacked in order, as --set: a later file overrides an earlier one's keys
        layers.append((path, tc.load_yaml(path)))
    layers.append(("--set", tc.parse_set(args.set)))
    flags = {key: getattr(args, key) for _, key, _, _ in FLAGS if getattr(args, key) is not None}
    if args.compile:
        flags["compile"] = True
    if args.cuda_graphs is not None:
        flags["cuda_graphs"] = args.cuda_graphs
    if args.cuda_graphs_optimizer is not None:
        flags["cuda_graphs_optimizer"] = args.cuda_graphs_optimizer
    if args.overlap_update:
        flags["overlap_update"] = True
    if args.no_progress:
        flags["progress"] = False
    layers.append(("flags", flags))
    if args.resume or args.resume_from:
        # The run's config.yaml goes under every other layer; the run dir may come from any of them (--out,
        # --set out=RUN, a --config file's out:), and `~` in it is the home directory.
        out = next((str(values["out"]) for _, values in reversed(layers) if values.get("out")), "")
        saved = Path(tc.expand_home(out)) / "config.yaml" if out else None
        if saved is not None and saved.is_file():
            layers.insert(0, (str(saved), tc.load_yaml(saved)))
    return tc.resolve(layers)


def _run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:  # a starting point for --config files
        print(tc.dump_yaml(cfg), end="")
        return 0
    return pretrain(cfg, resume=args.resume, resume_from=args.resume_from)


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain LV-MAE on an embedding store",
                       description="Pretrain LV-MAE. Config precedence: preset < --config < --set < flags "
                                   "(with --resume: preset < the run's config.yaml < --config < --set < flags). "
                                   "Every option left unset takes its value from the preset: "
                                   f"{tc.DEFAULT_PRESET}, unless --preset (or a config file) names another of "
                                   f"{', '.join(tc.PRESETS)}. The defaults shown below are the {tc.DEFAULT_PRESET} "
                                   "preset's; `--preset NAME --print-config` prints every value of a preset. "
                                   "Run dir: config.yaml, metrics.jsonl, tb/, loss.png, val.json (with validation videos), model files, "
                                   "checkpoints/.")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file of config keys, or a preset name (write one to edit with "
                        "--preset paper --print-config > my.yaml); repeatable: later files override earlier ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); model.KEY sets a model config field")
    for flag, key, kind, help_text in FLAGS:
        p.add_argument(flag, dest=key, type=kind, default=None, choices=FLAG_CHOICES.get(key),
                       help=f"{help_text} (config key {key}; {_flag_default(key)})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (with CUDA graphs on, the compiled blocks run inside them)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="pad batches to a few shapes and replay forward+backward as CUDA graphs (config key "
                        "cuda_graphs; default auto: on CUDA for batches of <= 64 videos, without "
                        "--max-tokens; --no-cuda-graphs turns it off)")
    p.add_argument("--cuda-graphs-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with CUDA graphs: capture the optimizer update too, one replay per step (config key "
                        "cuda_graphs_optimizer; default auto: whenever graphs are on on CUDA)")
    p.add_argument("--overlap-update", action="store_true",
                   help="with whole-step graphs: run the AdamW update chunk by chunk on a second stream during "
                        "backward (config key overlap_update; no --grad-clip; 2.4%% faster at batch 16 on an H200, opt-in)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (none either when stderr is not a terminal: logs get plain lines)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (starts fresh if it has none)")
    p.add_argument("--resume-from", metavar="STEP",
                   help="continue the run in --out from an earlier checkpoint (step-N or N), e.g. past a non-finite "
                        "step with a lower --lr; later checkpoints, metrics and validation move aside "
                        "(checkpoints/rewound/, metrics.rewound.jsonl, val.rewound.jsonl)")
    p.set_defaults(func=_run)
