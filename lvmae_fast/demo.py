"""`lvmae demo`: synthetic long-video embeddings -> embedding store -> tiny LV-MAE pretraining, on CPU.

Stages (each a function, so an ingestion stage that makes real embeddings from videos can replace the
first one): make_embeddings -> build_store -> run_pretraining. Takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import train_config as tc
from .store_cli import import_embeddings
from .synthetic import synthetic_corpus, write_corpus
from .train import pretrain, read_metrics


def make_embeddings(out: Path, num_videos: int, dim: int, seed: int) -> Path:
    corpus = synthetic_corpus(num_videos, dim, seed=seed)
    return write_corpus(corpus, out / "embeddings")


def build_store(embeddings_dir: Path, out: Path) -> Path:
    added, skipped, failures = import_embeddings(embeddings_dir, out / "store", encoder="synthetic")
    if failures:
        raise ValueError(f"demo import failed for {len(failures)} videos: {failures[:3]}")
    return out / "store"


def run_pretraining(store: Path, out: Path, epochs: int, seed: int, progress: bool) -> tuple[int, Path]:
    cfg = tc.resolve([("demo", {"preset": "tiny", "store": str(store), "out": str(out / "run"), "epochs": epochs,
                                "seed": seed, "val_videos": 32, "eval_every": 100, "ckpt_every": 200,
                                "batch_videos": 16, "progress": progress})])
    return pretrain(cfg), out / "run"


def _run(args) -> int:
    out = Path(args.out)
    stage_dirs = [out / "embeddings", out / "store", out / "run"]
    existing = [d for d in stage_dirs if d.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{out} already holds a demo ({', '.join(d.name for d in existing)}); "
                         f"pass --overwrite or another --out")
    for d in existing:
        shutil.rmtree(d)
    t0 = time.perf_counter()
    embeddings = make_embeddings(out, args.videos, args.dim, args.seed)
    print(f"[1/3] wrote {args.videos} synthetic videos ({args.dim}-d embeddings) to {embeddings}")
    store = build_store(embeddings, out)
    print(f"[2/3] imported them into the embedding store {store}")
    code, run = run_pretraining(store, out, args.epochs, args.seed, not args.no_progress)
    records = read_metrics(run / "metrics.jsonl")
    if records:
        val = [r["val_loss"] for r in records if "val_loss" in r]
        print(f"[3/3] pretrained the tiny preset for {records[-1]['step']} steps: train loss {records[0]['loss']:.4f} -> "
              f"{records[-1]['loss']:.4f}" + (f", val loss {val[0]:.4f} -> {val[-1]:.4f}" if len(val) > 1 else "")
              # Targets are unit vectors, so always predicting zeros scores exactly 1/dim (the baseline to beat).
              + f" (predicting zeros scores {1 / args.dim:.4f})")
    summary = {"seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run), "loss_curve": str(run / "loss.png"),
               "metrics": str(run / "metrics.jsonl"), "model": str(run), "store": str(store)}
    print("demo done: " + json.dumps(summary, indent=2))
    print(f"load the model with: LVMAE.from_pretrained({str(run)!r})")
    return code


def register(sub) -> None:
    p = sub.add_parser("demo", help="synthetic corpus -> store -> tiny pretraining on CPU (about a minute)")
    p.add_argument("--out", default="lvmae_demo", help="output directory (default ./lvmae_demo)")
    p.add_argument("--videos", type=int, default=512, help="synthetic videos (default 512)")
    p.add_argument("--dim", type=int, default=64, help="embedding dim (default 64)")
    p.add_argument("--epochs", type=int, default=60, help="pretraining epochs (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
