"""`lvmae demo`: the whole pipeline on CPU in about 20 seconds.

Default (`--source videos`): write minute-long synthetic H.264 videos with scene changes (PyAV) ->
`lvmae extract` with the `tiny` encoder (random weights, meaningless but deterministic) -> embedding
store -> tiny LV-MAE pretraining. `--source embeddings` skips the video stage and pretrains on a larger
synthetic corpus of embedding sequences with long-range structure.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from . import train_config as tc
from .atomic import is_temp_file_name
from .run_metrics import read_metrics
from .store import WriterLock
from .store_cli import import_embeddings
from .synthetic import synthetic_corpus, write_corpus
from .train import EXIT_SIGNAL, pretrain


def make_videos(out: Path, num_videos: int, duration: float, seed: int) -> Path:
    """Minute-long 64x48 H.264 videos; scenes of 5-20 s at random times, so windows have structure."""
    import numpy as np

    from .synth import write_video

    rng = np.random.default_rng(seed)
    folder = out / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_videos):
        starts = [0.0]
        while (start := round(starts[-1] + float(rng.uniform(5, 20)), 2)) < duration:
            starts.append(start)
        write_video(folder / f"video{i:03d}.mp4", duration=duration, fps=5.0, size=(64, 48), codec="h264",
                    scene_starts=starts, seed=seed + i)
    return folder


def extract_store(videos: Path, out: Path, progress: bool) -> tuple[Path, dict]:
    from .extract import extract_videos

    summary = extract_videos(videos, out / "store", encoder="tiny", device="cpu", progress=progress)
    if summary["done"] == 0:
        raise ValueError(f"demo extraction produced no videos: {summary}")
    return out / "store", summary


def make_embeddings(out: Path, num_videos: int, dim: int, seed: int) -> Path:
    corpus = synthetic_corpus(num_videos, dim, seed=seed)
    return write_corpus(corpus, out / "embeddings")


def build_store(embeddings_dir: Path, out: Path) -> Path:
    added, skipped, failures = import_embeddings(embeddings_dir, out / "store", encoder="synthetic")
    if failures:
        raise ValueError(f"demo import failed for {len(failures)} videos: {failures[:3]}")
    return out / "store"


def demo_val_videos(num_videos: int) -> int:
    """Held-out videos: a sixth (at least 1, at most 32), always leaving one to train on."""
    return min(32, max(1, num_videos // 6), num_videos - 1)


def run_pretraining(store: Path, out: Path, epochs: int, seed: int, progress: bool, val_videos: int = 32,
                    batch_videos: int = 16) -> tuple[int, Path]:
    # The preset's warm-up is shortened to fit a short run (`--epochs 1`), not refused after the data is written.
    warmup = min(float(tc.PRESETS["tiny"]["warmup_epochs"]), epochs)
    cfg = tc.resolve([("demo", {"preset": "tiny", "store": str(store), "out": str(out / "run"), "epochs": epochs,
                                "warmup_epochs": warmup, "seed": seed, "val_videos": val_videos, "eval_every": 100,
                                "ckpt_every": 200, "batch_videos": batch_videos, "progress": progress})])
    return pretrain(cfg), out / "run"


MIN_DURATION = 7.5  # seconds per demo video
DEFAULT_DURATION = 60.0
DEFAULT_DIM = 64  # of --source embeddings


def check_args(args) -> None:
    """Refuse bad numbers before anything is written (0 is not "the default": that is leaving the flag out)."""
    for flag, value, low in (("--videos", args.videos, 1), ("--epochs", args.epochs, 1), ("--dim", args.dim, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    # Each source's own flag: given to the other it was silently ignored (a 128-d request trained on 64-d).
    for flag, value, source, why in (("--dim", args.dim, "embeddings", "the videos' dim is the tiny encoder's"),
                                     ("--duration", args.duration, "videos", "sequences have random lengths")):
        if value is not None and args.source != source:
            raise ValueError(f"{flag} applies to --source {source} only ({why}), got --source {args.source}")
    if args.source == "videos" and args.duration is not None and not (math.isfinite(args.duration)
                                                                      and args.duration >= MIN_DURATION):
        # Two 5-second windows (the last may be half a window): pretraining leaves out 1-window videos
        # (short_video_policy=reference, as the reference's loader).
        raise ValueError(f"--duration must be a number of seconds >= {MIN_DURATION:g} (two 5-second windows per "
                         f"video; the last may be half one), got {args.duration}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the demo")


DEMO_MARKER = ".lvmae-demo"


# What each stage folder of a demo from before the marker holds (the names the demo writes): a project's
# own videos/ or store/ never pass for one (a user's clips, a store folder of unrelated files, a store of
# another encoder).
_LEGACY_FILES = {"videos": re.compile(r"video\d{3,}\.mp4"), "embeddings": re.compile(r"video\d{5,}\.npy")}
_DEMO_ENCODERS = ("tiny", "synthetic")   # the videos demo extracts with `tiny`; the embeddings demo imports
# A store the demo's extraction was killed in before its first commit: no index yet, only a writer's files.
_UNCOMMITTED_STORE = {".lock", "failures.jsonl", "shards", "partial"}


def _names_but_temps(folder: Path) -> set[str]:
    """Entry names, less atomic writes' temp files (`.index.json.x1y2.tmp`): a demo killed mid-write leaves one."""
    return {entry.name for entry in folder.iterdir() if not is_temp_file_name(entry.name)}


def _looks_like_demo_stage(folder: Path) -> bool:
    if folder.name in _LEGACY_FILES:
        names = _LEGACY_FILES[folder.name]
        return all(entry.is_file() and names.fullmatch(entry.name) for entry in folder.iterdir())
    if folder.name == "run":
        return _is_demo_run(folder)
    try:
        return json.loads((folder / "index.json").read_text()).get("encoder") in _DEMO_ENCODERS
    except FileNotFoundError:
        return _names_but_temps(folder) <= _UNCOMMITTED_STORE
    except (OSError, ValueError, AttributeError):   # unreadable, not JSON, not an object: not the demo's
        return False


def _is_demo_run(folder: Path) -> bool:
    """The demo's run: the tiny preset trained on the store beside it (any `lvmae pretrain` run has a
    config.yaml), or one killed before it wrote its config (only its lock)."""
    if _names_but_temps(folder) <= {".lock"}:
        return True
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return (isinstance(cfg, dict) and cfg.get("preset") == "tiny"
            and os.path.realpath(str(cfg.get("store") or "")) == os.path.realpath(folder.parent / "store"))


def is_demo_dir(out: Path, stage_dirs: list[Path]) -> bool:
    """`out`'s stage folders are a demo's: each holds what the demo writes there. The marker says the
    demo wrote into `out`, so other entries beside them are the user's and stay; without it (a demo from
    before the marker) `out` must hold nothing else. The marker alone never makes a folder the demo's: a
    user may have replaced the demo's videos/ with their own."""
    stages_ok = all(d.is_dir() and _looks_like_demo_stage(d) for d in stage_dirs if d.exists())
    if (out / DEMO_MARKER).is_file():
        return stages_ok
    return stages_ok and all(entry in stage_dirs for entry in out.iterdir())


class _DemoLock(WriterLock):
    """One demo per --out at a time: --overwrite deleted a running demo's folders, and the two runs then
    shared run/ (a deleted run/.lock is no lock). Taken before an existing demo is touched, or right
    after a new one's marker is written (a legacy folder must not get a file before it passes as a demo)."""

    NAME = ".lvmae-demo.lock"


DEMO_BUSY = ("{path} holds a demo that is still running ({holder}); wait for it to finish, or give another "
             "--out")


def _run(args) -> int:
    check_args(args)
    out = Path(args.out)
    held = [_DemoLock(out, busy=DEMO_BUSY)] if (out / DEMO_MARKER).is_file() else []
    try:
        return _run_demo(args, out, held)
    finally:
        for lock in held:
            lock.release()


def _run_demo(args, out: Path, held: list) -> int:
    """The demo; `held`: its _DemoLock, taken here after a new demo's marker is written when empty."""
    stage_dirs = [out / "videos", out / "embeddings", out / "store", out / "run"]
    if args.source == "videos":  # before anything is written: a failed start must not block --source embeddings
        from .optional import require
        from .video.decode_pyav import PYAV_MINIMUM, PYAV_MINIMUM_WHY

        # The version extract needs too: an older PyAV wrote every video and then failed at extraction.
        require("av", "video", "the demo's test videos", minimum=PYAV_MINIMUM, why=PYAV_MINIMUM_WHY)
    existing = [d for d in stage_dirs if d.exists()]
    if existing and not is_demo_dir(out, stage_dirs):
        # --overwrite deletes folders: only ever a demo's (a project folder with its own videos/ or store/
        # passed as --out by mistake must keep them).
        raise ValueError(f"{out} holds {', '.join(d.name for d in existing)} but not as `lvmae demo` wrote them "
                         f"(files the demo does not write, or no {DEMO_MARKER} file and other entries beside them): "
                         f"--overwrite deletes only a demo's folders; give another --out")
    if existing and not args.overwrite:
        raise ValueError(f"{out} already holds a demo ({', '.join(d.name for d in existing)}); "
                         f"pass --overwrite or another --out")
    for d in existing:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `lvmae demo`: --overwrite may replace videos/, embeddings/, store/ "
                                   "and run/ here\n")
    if not held:
        held.append(_DemoLock(out, busy=DEMO_BUSY))
    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.source == "videos":
        num_videos = args.videos or 24
        duration = args.duration or DEFAULT_DURATION
        videos = make_videos(out, num_videos, duration, args.seed)
        print(f"[1/3] wrote {num_videos} synthetic {duration:g}-second H.264 videos to {videos}")
        store, ext = extract_store(videos, out, progress)
        print(f"[2/3] extracted {ext['windows']} 5-second windows with the tiny encoder (random weights) into {store} "
              f"({ext['realtime_factor']:.0f}x realtime; done {ext['done']}, skipped {ext['skipped']}, failed {ext['failed']})")
        code, run = run_pretraining(store, out, args.epochs or 300, args.seed, progress,
                                    val_videos=demo_val_videos(num_videos), batch_videos=8)
        from .store import Store
        dim = Store(store).dim
    else:
        num_videos = args.videos or 512
        dim = args.dim or DEFAULT_DIM
        embeddings = make_embeddings(out, num_videos, dim, args.seed)
        print(f"[1/3] wrote {num_videos} synthetic videos ({dim}-d embeddings) to {embeddings}")
        store = build_store(embeddings, out)
        print(f"[2/3] imported them into the embedding store {store}")
        code, run = run_pretraining(store, out, args.epochs or 60, args.seed, progress,
                                    val_videos=demo_val_videos(num_videos))
    if code != 0:  # interrupted (Ctrl-C, SIGTERM) or stopped by a non-finite loss: no "demo done"
        how = (f"its run continues with: lvmae pretrain --out {shlex.quote(str(run))} --resume"
               if code in EXIT_SIGNAL.values() else
               "pretrain's message above says how to rewind its run")  # a non-finite stop fails again on --resume
        print(f"demo stopped in its pretraining (exit {code}); {how}", file=sys.stderr)
        return code
    records = read_metrics(run / "metrics.jsonl")
    if records:
        val = [r["val_loss"] for r in records if "val_loss" in r]
        print(f"[3/3] pretrained the tiny preset for {records[-1]['step']} steps: train loss {records[0]['loss']:.4f} -> "
              f"{records[-1]['loss']:.4f}" + (f", val loss {val[0]:.4f} -> {val[-1]:.4f}" if len(val) > 1 else "")
              # Targets are unit vectors, so always predicting zeros scores exactly 1/dim (the baseline to beat).
              + f" (predicting zeros scores {1 / dim:.4f})")
    summary = {"seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run), "loss_curve": str(run / "loss.png"),
               "metrics": str(run / "metrics.jsonl"), "model": str(run), "store": str(store)}
    print("demo done: " + json.dumps(summary, indent=2))
    print(f"load the model with: LVMAE.from_pretrained({str(run)!r})")
    return code


def register(sub) -> None:
    p = sub.add_parser("demo", help="synthetic videos -> extract -> store -> tiny pretraining on CPU (about 20 s)",
                       description="Synthetic videos -> extract (tiny encoder) -> store -> tiny-preset pretraining, "
                                   "on CPU; needs the 'av' package (lvmae_fast[video]); --source embeddings "
                                   "skips the videos and needs no extra.")
    p.add_argument("--out", default="lvmae_demo", help="output directory (default ./lvmae_demo)")
    p.add_argument("--source", choices=["videos", "embeddings"], default="videos",
                   help="videos: start from synthetic mp4 files (default); embeddings: synthetic embedding sequences")
    p.add_argument("--videos", type=int, default=None, help="number of videos (default 24 videos / 512 sequences)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"--source videos: seconds per synthetic video (default {DEFAULT_DURATION:g})")
    p.add_argument("--dim", type=int, default=None, help=f"--source embeddings: embedding dim (default {DEFAULT_DIM})")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default 300 / 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the pretraining (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
