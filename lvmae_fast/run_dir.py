"""The run directory of `lvmae pretrain` (RUN = --out): its checkpoints, rewinds and lock.

Layout::

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

import hashlib
import logging
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import train_config as tc
from .atomic import WRITE_ERRORS, atomic_write, atomic_write_text, fsync_dir, write_error
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .model import LVMAE
from .run_metrics import VAL_NAME, drop_later_val, truncate_metrics
from .store import WriterLock

log = logging.getLogger(__name__)
STATE_NAME, LATEST_NAME = "train_state.pt", "latest"
REWOUND_DIR, REWOUND_METRICS, REWOUND_VAL = "rewound", "metrics.rewound.jsonl", "val.rewound.jsonl"
# What a run dir holds: --out must be new, empty, or hold only these (dot-files are atomic-write temps;
# val.rewound.json: one rewind's val.json, as runs before 2026-11-27c kept it).
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", REWOUND_METRICS, "checkpoints", "tb", "loss.png",
                         "model.safetensors", "config.json", VAL_NAME, REWOUND_VAL, "val.rewound.json"})


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


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}


def set_rng_state(state: dict) -> None:
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
        state = {"progress": dict(progress), "optimizer": portable_optimizer_state(optimizer), "rng": rng_state(),
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
