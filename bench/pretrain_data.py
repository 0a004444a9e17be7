"""Data-path benchmark: samples/s of the full loop (store -> sampler workers -> step) vs the model step
alone on the same batches already resident on the device. Target: full loop >= 95% of step-only.

    python bench/pretrain_data.py --preset tiny --device cpu --steps 30      # quick smoke
    python bench/pretrain_data.py --preset paper --device cuda --store STORE  # the real thing

Without --store a synthetic store is built in a temp dir. Prints a markdown table and a JSON line
(also written to --json-out). `main(argv)` returns the result dict.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lvmae_fast.atomic import atomic_write_text
from lvmae_fast.devices import resolve_device
from lvmae_fast.model import LVMAE, LVMAEConfig
from lvmae_fast.sampler import LongVideoSampler, SamplerConfig
from lvmae_fast.store import Store
from lvmae_fast.store_cli import import_embeddings
from lvmae_fast.synthetic import synthetic_corpus, write_corpus
from lvmae_fast.train_config import PRESETS
from bench_args import at_least, writable_json  # sibling modules (bench/ is on sys.path when run)
from train_step import make_optimizer, make_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_store(tmp: Path, videos: int, dim: int, seed: int) -> Path:
    write_corpus(synthetic_corpus(videos, dim, seed=seed, max_segments=600), tmp / "emb")
    import_embeddings(tmp / "emb", tmp / "store", encoder="synthetic")
    return tmp / "store"


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.store or _make_store(Path(tmp), args.videos, args.dim, args.seed))
        recipe = PRESETS[args.preset]
        model_cfg = LVMAEConfig.from_preset(args.preset, in_dim=store.dim)
        scfg = SamplerConfig(duration_min=recipe["duration_min"], duration_max=recipe["duration_max"],
                             max_len=recipe["max_len"], batch_videos=args.batch_videos or recipe["batch_videos"],
                             max_tokens=args.max_tokens, mask_ratio=model_cfg.mask_ratio, masking=model_cfg.masking,
                             seed=args.seed, pad_to_buckets=args.cuda_graphs)
        sampler = LongVideoSampler(store, store.video_ids, scfg)
        torch.manual_seed(args.seed)
        model = LVMAE(model_cfg).to(device).train()
        pin = device.type == "cuda"
        step, graphed = make_step(model, make_optimizer(model), device, args.cuda_graphs, args.graph_optimizer,
                                  pinned_input=pin)

        def batches(epoch=0):  # endless, through one loader as the trainer does (workers live across epochs)
            stream = sampler.stream(epoch, 0, 10**9, num_workers=args.num_workers, pin_memory=pin,
                                    prefetch_factor=args.prefetch_factor)
            for _, _, batch in stream:
                yield batch

        # The timed window's batches, for the step-alone phase: the stream is a pure function of seed,
        # epoch and index, so they are drawn here from a second stream and held on the device (holding
        # the full loop's pinned batches instead would make the loader pin fresh memory each step,
        # which no training run does).
        # Warm-up long enough to drain the loader's queue: batches prefetched while the first (slow,
        # compiling) steps ran would otherwise be eaten inside the clock and flatter the full loop.
        warmup = max(args.warmup, max(args.num_workers, 1) * args.prefetch_factor + 5)
        ahead = batches()
        for _ in range(warmup):
            next(ahead)
        kept = [next(ahead).to(device) for _ in range(args.steps)]
        del ahead
        if graphed is not None:
            # Steady state: every shape of the timed window is captured before the clock. A run pays
            # each capture once, at most max_graphs times; in a short window they would dominate.
            for b in kept:
                graphed.prepare(b)

        # Full loop: the loader's workers read, normalise, pack and mask while the model steps.
        it = batches()
        for _ in range(warmup):
            step(next(it))
        _sync(device)
        shapes_before = len(graphed.buckets) if graphed is not None else 0
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
            step(batch)
            samples, tokens = samples + batch.num_videos, tokens + batch.num_tokens
            del batch  # as in the trainer: its pinned buffers go back to the host allocator's cache
        _sync(device)
        full_s = time.perf_counter() - t0
        # Shapes first seen inside the timed loop (0 with the window prepared above, unless max_graphs
        # was reached): reported, since each would be a one-off capture inside the clock.
        captures_timed = (len(graphed.buckets) - shapes_before) if graphed is not None else 0
        if args.profile:  # where the full loop's host time goes (blocking CUDA calls, the loader's queue)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(20):
                    step(next(it))
                _sync(device)
            Path(args.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45))
        del it

        # Loader alone (no model step): the ceiling the data path can feed, from a fresh epoch.
        it = batches(epoch=1000)
        for _ in range(min(args.warmup, 5)):
            next(it)
        loader_samples = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loader_samples += next(it).num_videos
        loader_s = time.perf_counter() - t0
        del it

        # Model step alone: the very same batches, already on the device.
        if (sum(b.num_videos for b in kept), sum(b.num_tokens for b in kept)) != (samples, tokens):
            raise RuntimeError("the regenerated batches differ from the full loop's: the sampler is not deterministic")
        for b in kept[: args.warmup]:
            step(b)
        _sync(device)
        t0 = time.perf_counter()
        for b in kept:
            step(b)
        _sync(device)
        step_s = time.perf_counter() - t0

    result = {
        "preset": args.preset, "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": args.steps, "warmup_steps": warmup, "cuda_graphs": args.cuda_graphs,
        "graphs_captured": bool(graphed is not None and graphed.capture),
        "graph_optimizer": args.graph_optimizer,
        "num_workers": args.num_workers, "batch_videos": scfg.batch_videos, "max_tokens": scfg.max_tokens,
        "tokens_per_batch": round(tokens / len(kept), 1),
        "full_loop_samples_per_s": round(samples / full_s, 2), "step_only_samples_per_s": round(samples / step_s, 2),
        "full_loop_tokens_per_s": round(tokens / full_s, 1), "step_only_tokens_per_s": round(tokens / step_s, 1),
        "loader_only_samples_per_s": round(loader_samples / loader_s, 2), "graph_captures_timed": captures_timed,
    }
    result["ratio"] = round(result["full_loop_samples_per_s"] / result["step_only_samples_per_s"], 4)
    result["target_met"] = result["ratio"] >= 0.95
    return result


def markdown(r: dict) -> str:
    return "\n".join([
        f"data-path benchmark: preset {r['preset']} on {r['device_name']}, {r['steps']} steps, "
        f"{r['num_workers']} workers, {r['tokens_per_batch']} tokens/batch",
        "",
        "| path | samples/s | tokens/s |",
        "|---|---|---|",
        f"| full loop (store -> sampler -> step) | {r['full_loop_samples_per_s']} | {r['full_loop_tokens_per_s']} |",
        f"| model step alone (same batches) | {r['step_only_samples_per_s']} | {r['step_only_tokens_per_s']} |",
        f"| loader alone (no step) | {r['loader_only_samples_per_s']} | |",
        f"| ratio (target >= 0.95) | {r['ratio']} ({'met' if r['target_met'] else 'NOT met'}) | |",
    ] + ([f"\n{r['graph_captures_timed']} batch shapes were first seen inside the timed full loop (each a "
          "CUDA graph capture on a GPU; beyond max_graphs they run eagerly)"] if r["graph_captures_timed"] else [])
        + (["\nNOTE: no CUDA graphs off a GPU: --cuda-graphs ran the same bucketed step uncaptured (not a graph "
            "measurement)"] if r["cuda_graphs"] and not r["graphs_captured"] else []))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--store", help="existing store (default: a synthetic one in a temp dir)")
    p.add_argument("--videos", type=int, default=256, help="synthetic videos")
    p.add_argument("--dim", type=int, default=64, help="synthetic embedding dim")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-videos", type=int, default=0, help="default: the preset's")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--prefetch-factor", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graphs", action="store_true", help="bucketed batches, forward+backward replayed as CUDA graphs")
    p.add_argument("--graph-optimizer", action="store_true",
                   help="with --cuda-graphs: capture the optimizer update too (whole-step graphs)")
    p.add_argument("--json-out", "--json", dest="json_out", help="also write the JSON result here (--json: the step mode's spelling)")
    p.add_argument("--profile", help="write a torch.profiler table (by self CPU time) of 20 more full-loop steps here")
    args = p.parse_args(argv)
    at_least(p, args, videos=1, dim=1, steps=1, warmup=0, batch_videos=0, max_tokens=0, num_workers=0,
             prefetch_factor=1, threads=0)
    writable_json(p, "--json-out", args.json_out)
    writable_json(p, "--profile", args.profile)
    if args.graph_optimizer and not args.cuda_graphs:
        p.error("--graph-optimizer needs --cuda-graphs")
    max_len = PRESETS[args.preset]["max_len"]
    if 0 < args.max_tokens < max_len:  # was the sampler's traceback, after the synthetic store was written
        p.error(f"--max-tokens must be 0 (no cap) or >= the {args.preset} preset's max_len {max_len}, so every "
                f"crop fits a batch; got {args.max_tokens}")
    try:
        resolve_device(args.device)  # auto | cpu | cuda[:N], as every lvmae command
        if args.store:
            Store(args.store)  # opened again by run(): here a missing store is one line, not a traceback
    except (ValueError, OSError) as err:
        p.error(str(err))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    print(json.dumps(result))
    if args.json_out:  # atomic: a run killed mid-write leaves no half-written file
        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
