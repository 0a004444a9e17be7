"""Pretraining-step benchmark: packed LV-MAE vs a faithful padded re-implementation of the reference.

Both run on the same batches (lengths ~ U[min_len, max_len], L2-normalised random embeddings) in one
process; the table reports samples/s, tokens/s, useful TFLOP/s (matmul FLOPs on real tokens only,
x3 for forward+backward), step time, peak memory and the packed/padded ratio. A "long" row runs
batch 1 at --long-len segments (packed only) to check the memory ceiling.

  python bench/pretrain.py --preset paper --device cuda --batch-sizes 16,256 --json out.json
  python bench/pretrain.py --preset tiny --device cpu --steps 2 --warmup 1      # CI-size smoke
  python bench/pretrain.py --mode data ...                                      # data-path mode
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]  # sibling bench modules; the checkout if not installed

from lvmae_fast.atomic import atomic_write_text  # noqa: E402
from lvmae_fast.attention import ATTN_IMPLS  # noqa: E402
from lvmae_fast.devices import resolve_device  # noqa: E402
from lvmae_fast.buckets import pad_to_bucket, seqlen_floors  # noqa: E402
from lvmae_fast.masking import build_masked_batch  # noqa: E402
from lvmae_fast.model import LVMAE, LVMAEConfig, matmul_flops  # noqa: E402
from lvmae_fast.packing import keep_counts, pack_sequences  # noqa: E402
from bench_args import at_least, positive_ints, writable_json  # noqa: E402
from reference_padded import ReferencePaddedMAE, reference_batch  # noqa: E402
from train_step import make_optimizer, make_step  # noqa: E402


def make_batches(n_batches, batch_size, in_dim, min_len, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=g).tolist()
        seqs = [torch.nn.functional.normalize(torch.randn(n, in_dim, generator=g), dim=-1) for n in lengths]
        batches.append(seqs)
    return batches


def useful_flops(config, lengths, mask_ratio):
    keep = keep_counts(lengths, mask_ratio)
    fwd = matmul_flops(config, enc_tokens=sum(keep) + len(lengths), dec_tokens=sum(lengths) + len(lengths),
                                 seq_sq_enc=sum((k + 1) ** 2 for k in keep), seq_sq_dec=sum((n + 1) ** 2 for n in lengths),
                                 pred_tokens=sum(lengths) - sum(keep), num_videos=len(lengths))
    # Backward = 2x forward, except the input projection's: its input needs no gradient, so only its weight
    # gradient is computed (1x), as torch's FlopCounterMode counts over a step (tests/test_bench.py).
    proj = 2 * sum(keep) * config.in_dim * config.embed_dim if config.in_dim != config.embed_dim else 0
    return 3 * fwd - proj


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


# torch.compile modes --compare-compile-modes offers: none that captures CUDA graphs of its own (the
# bench's graph rows capture whole steps; reduce-overhead's graphs inside them would not be captured).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


def run_packed(config, batches, device, steps, warmup, compile_model=False, profile_path=None, cuda_graphs=False,
               graph_optimizer=False, master_weights=False, overlap_chunks=0, compile_mode="default"):
    torch.manual_seed(0)  # every packed row starts from the same weights: their losses compare (--compare-attn)
    with torch.device(device):  # init on the GPU: a 0.4B-parameter CPU init costs seconds
        model = LVMAE(config)
    opt = make_optimizer(model, master_weights)  # before compiling: it may change the weights' dtype
    if compile_model:  # another mode: inductor autotunes its GEMMs (Triton templates, epilogues such as GELU fused)
        model.compile_blocks(**({} if compile_mode == "default" else {"mode": compile_mode}))
    g = torch.Generator().manual_seed(0)
    packed = []
    # As the trainer's sampler pads batches for graphs: each stream's max_seqlen fixed at the most rows a
    # crop of the longest length gives it, not rounded up to a power of two (512 for the decoder's 257),
    # which would widen every varlen attention grid.
    floors = seqlen_floors(max(s.shape[0] for seqs in batches for s in seqs), config.mask_ratio)
    for seqs in batches:  # masking/packing is the data loader's job: built before timing (see --mode data)
        x, cu, lengths = pack_sequences(seqs)
        batch = build_masked_batch(x, cu, lengths, "random", config.mask_ratio, g)
        # Graphed steps copy each batch into their static buffers, as the trainer does from pinned memory.
        if not cuda_graphs:
            packed.append(batch.to(device))
        else:
            padded = pad_to_bucket(batch, **floors)
            packed.append(padded.pin_memory() if device.type == "cuda" else padded)

    step, _ = make_step(model, opt, device, cuda_graphs, graph_optimizer, overlap_chunks=overlap_chunks)
    result = _time_steps(step, packed, device, steps, warmup)
    if profile_path and result["status"] == "ok":
        write_profile(step, packed, device, profile_path)
    return result


def write_profile(step, items, device, path):
    """Kernel/op table of 3 steps, to see whether a step is launch-bound or compute-bound."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(3):
            step(items[i % len(items)])
        Timer(device).sync()
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))


def run_padded(config, batches, device, steps, warmup, num_patches: int):
    """The reference's step (reference_padded.py): its batches built before the clock as its DataLoader
    workers build them, copied to the device inside the step as it does."""
    with torch.device(device):
        model = ReferencePaddedMAE(config, num_patches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")  # the reference: fp16 + GradScaler
    generator = torch.Generator().manual_seed(0)
    host = [reference_batch(seqs, config.mask_ratio, num_patches, generator) for seqs in batches]
    if device.type == "cuda":  # its DataLoader pins (MAE's pin_mem default)
        host = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in host]

    def step(item):
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in item.items()}
        with autocast(device, torch.float16):
            loss = model(b)
        if not math.isfinite(loss.item()):  # the reference's check: a host sync every step
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)  # its logged grad norm
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # as its loop does after every step
        return loss

    return _time_steps(step, host, device, steps, warmup)


def _time_steps(step, items, device, steps, warmup):
    if device.type == "cuda":
        gc.collect()   # earlier rows' models and optimizers, freed: not in this row's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        # Every distinct batch at least once before the clock: a first sight costs a graph capture or
        # a compile, which no steady-state step pays.
        for i in range(max(warmup, len(items))):
            step(items[i % len(items)])
        with Timer(device) as t:
            for i in range(steps):
                loss = step(items[(warmup + i) % len(items)])
        loss = float(loss.detach())
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    except Exception as err:  # a backend/compile failure is a result to report, not a reason to lose the table
        return {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"status": "ok", "seconds": t.seconds, "steps": steps, "peak_gib": peak, "loss": loss}


def summarise(name, result, batches, config, warmup, steps):
    row = {"impl": name, "batch": len(batches[0]), **{k: result.get(k) for k in ("status", "peak_gib")}}
    if result["status"] != "ok":
        return row
    timed = [batches[(warmup + i) % len(batches)] for i in range(steps)]
    samples = sum(len(b) for b in timed)
    tokens = sum(s.shape[0] for b in timed for s in b)
    flops = sum(useful_flops(config, [s.shape[0] for s in b], config.mask_ratio) for b in timed)
    sec = result["seconds"]
    row.update(samples_per_s=samples / sec, tokens_per_s=tokens / sec, useful_tflops=flops / sec / 1e12,
               step_ms=1e3 * sec / steps, loss=result["loss"])
    return row


NOT_MEASURED = "not measured"


def fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def print_table(rows):
    print("| impl | batch | samples/s | tokens/s | useful TFLOP/s | step ms | peak GiB | packed/padded |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['impl']} | {r['batch']} | {r.get('status')} | | | | | |")
            continue
        # No peak on CPU; no ratio where the padded baseline was skipped or failed ("-": the baseline itself).
        ratio_missing = "-" if r["impl"].startswith("padded") else NOT_MEASURED
        print(f"| {r['impl']} | {r['batch']} | {fmt(r['samples_per_s'], '.1f')} | {fmt(r['tokens_per_s'], '.0f')} | "
              f"{fmt(r['useful_tflops'], '.2f')} | {fmt(r['step_ms'], '.1f')} | {fmt(r['peak_gib'], '.2f', NOT_MEASURED)} | "
              f"{fmt(r.get('speedup'), '.2f', ratio_missing)} |")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=["step", "data"], default="step")
    known, rest = mode.parse_known_args(argv)
    if known.mode == "data":  # every other flag belongs to the data-path benchmark's own parser
        from pretrain_data import main as data_main
        data_main(rest)
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["step", "data"], default="step", help="step: packed vs padded; data: full loop vs step")
    p.add_argument("--preset", default="paper", choices=["paper", "base", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--in-dim", type=int, default=None, help="embedding dim (default: the preset's width)")
    p.add_argument("--batch-sizes", default="16,256")
    p.add_argument("--min-len", type=int, default=2)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--long-len", type=int, default=8192, help="batch-1 length for the memory row (0 = skip)")
    p.add_argument("--skip-padded", action="store_true")
    p.add_argument("--padded-max-batch", type=int, default=64, help="skip the padded baseline above this batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the packed model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time the packed step with bucketed shapes replayed as CUDA graphs (row 'packed+graphs')")
    p.add_argument("--graph-optimizer", action="store_true",
                   help="with --cuda-graphs: also time whole-step graphs, the optimizer update captured too "
                        "(row 'packed+graphs+opt'; it also computes the gradient norm, as the trainer does)")
    p.add_argument("--master-weights", action="store_true",
                   help="with --graph-optimizer: also time whole-step graphs with MasterWeightAdamW (bf16 matrix "
                        "weights, fp32 masters; row 'packed+graphs+opt+master')")
    p.add_argument("--overlap-update", action="store_true",
                   help="with --graph-optimizer: also time whole-step graphs whose AdamW update runs chunk by chunk "
                        "on a second stream during backward (row 'packed+graphs+opt+overlap')")
    p.add_argument("--overlap-chunks", default="8",
                   help="with --overlap-update: how many chunks the update is split into; a comma list times one "
                        "row per value (rows 'packed+graphs+opt+overlap/N')")
    p.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS)
    p.add_argument("--compare-attn", default="",
                   help="comma list of attention backends (e.g. fa4): each batch size's last mode asked for is "
                        "timed again with each, rows '<mode> attn=<impl>' beside the --attn-impl rows")
    p.add_argument("--compare-compile-modes", default="",
                   help="with --compile: comma list of torch.compile modes (" + ", ".join(COMPILE_MODES[1:]) + "): each "
                        "batch size's last mode asked for is timed again with the blocks compiled so, rows "
                        "'<mode> compile=<mode>' beside the default-mode rows")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="masked-loss kernels")
    p.add_argument("--json", "--json-out", dest="json", default=None, help="write results here (--json-out: the data mode's spelling)")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of the first packed batch size here: of its "
                        "last mode asked for (overlap, else master, else whole-step graphs, else graphs, else plain; "
                        "until 2026-11-27 whole-step graphs even when overlap or master rows followed)")
    args = p.parse_args(argv)
    batch_sizes = positive_ints(p, "--batch-sizes", args.batch_sizes)
    at_least(p, args, steps=1, warmup=0, min_len=1, long_len=0, padded_max_batch=0, in_dim=1)
    if args.max_len < args.min_len:
        p.error(f"--max-len ({args.max_len}) must be >= --min-len ({args.min_len})")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if keep_counts([args.max_len], args.mask_ratio)[0] >= args.max_len:
        # No sequence has a masked token: no loss to time (the padded row's mean over none is nan, as the
        # reference's, and that row read "failed").
        p.error(f"--max-len {args.max_len} with --mask-ratio {args.mask_ratio} masks no token of any sequence; "
                "raise either")
    writable_json(p, "--json", args.json)
    writable_json(p, "--profile", args.profile)
    if args.graph_optimizer and not args.cuda_graphs:
        p.error("--graph-optimizer needs --cuda-graphs")
    if args.master_weights and not args.graph_optimizer:
        p.error("--master-weights needs --graph-optimizer")
    if args.overlap_update and not args.graph_optimizer:
        p.error("--overlap-update needs --graph-optimizer")
    try:
        overlap_chunks = [int(n) for n in args.overlap_chunks.split(",")]
    except ValueError:
        overlap_chunks = []
    if not overlap_chunks or min(overlap_chunks) < 1:
        p.error(f"--overlap-chunks must be positive integers, comma-separated; got {args.overlap_chunks!r}")
    def comma_list(flag: str, text: str, allowed: tuple, what: str) -> list[str]:
        items = [item for item in text.split(",") if item]
        if set(items) - set(allowed):
            p.error(f"{flag}: unknown {what}(s) {sorted(set(items) - set(allowed))}; choose from {allowed}")
        return items

    compare_attn = comma_list("--compare-attn", args.compare_attn, ATTN_IMPLS, "backend")
    compare_compile = comma_list("--compare-compile-modes", args.compare_compile_modes, COMPILE_MODES, "mode")
    if compare_compile and not args.compile:
        p.error("--compare-compile-modes needs --compile")
    if args.compile:
        # Every compiled row (another mode, another attention backend, each batch size) adds versions of
        # the blocks' forward; past dynamo's limit (8) the blocks silently run uncompiled and the row
        # would time eager code under a compiled label.
        import torch._dynamo.config as dynamo_config   # (binds no local `torch`)

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    try:
        device = resolve_device(args.device)  # auto | cpu | cuda[:N], as every lvmae command
    except ValueError as err:
        p.error(str(err))

    width = LVMAEConfig.from_preset(args.preset, in_dim=8).embed_dim
    in_dim = args.in_dim or width
    try:  # the model's own range checks (a --max-len/--long-len past the position table's limit...): one line
        config = LVMAEConfig.from_preset(args.preset, in_dim=in_dim, max_len=max(args.max_len, args.long_len),
                                         mask_ratio=args.mask_ratio, masking="random", attn_impl=args.attn_impl,
                                         kernels=args.kernels)
    except ValueError as err:
        p.error(str(err))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "preset": args.preset, "in_dim": in_dim, "mask_ratio": args.mask_ratio,
            "lengths": [args.min_len, args.max_len], "steps": args.steps, "warmup": args.warmup,
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "graph_optimizer": args.graph_optimizer,
            "master_weights": args.master_weights, "overlap_update": args.overlap_update,
            "overlap_chunks": overlap_chunks if args.overlap_update else None,
            "inputs": "packed rows: masked and packed before the clock, batches on the device (graphs rows: "
                      "copied from pinned host memory each step); padded row: as the reference, masked and padded "
                      "to --max-len rows before the clock (its DataLoader workers), copied from pinned host memory "
                      "each step, with its per-step host syncs, unscale and gradient norm. Optimizer: fused AdamW (packed; the +master row: MasterWeightAdamW), torch default AdamW + GradScaler (padded)",
            "attn_impl": args.attn_impl, "compare_attn": compare_attn, "compare_compile_modes": compare_compile, "kernels": args.kernels, "complete": False}
    if args.cuda_graphs and device.type != "cuda":
        meta["note"] = ("no CUDA graphs off a GPU: the '+graphs' rows run the same bucketed step uncaptured, "
                        "so they are not a graph measurement")
    torch.manual_seed(0)
    rows = []
    result = {"meta": meta, "rows": rows}

    def add(row):
        """Keep each row as soon as it is measured: a run cut by a time limit keeps the rows it finished."""
        rows.append(row)
        print(f"[bench] {row['impl']} batch {row['batch']}: {row.get('status')}"
              + (f", {row['samples_per_s']:.1f} samples/s" if row.get("status") == "ok" else ""),
              file=sys.stderr, flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2))  # a killed run keeps the last complete file

    for bs in batch_sizes:
        batches = make_batches(4, bs, in_dim, args.min_len, args.max_len, seed=bs)
        # The profile is of the first batch size's fastest mode asked for: whole-step graphs, else graphs.
        profile = args.profile if not rows else None
        # The profiled row: the last mode asked for (overlap: its last chunk count).
        mode = ("overlap" if args.overlap_update else "master" if args.master_weights else "opt" if args.graph_optimizer
                else "graphs" if args.cuda_graphs else "plain")
        name = "packed+compile" if args.compile else "packed"
        first = len(rows)
        fastest = {}  # the last (most optimised) mode asked for: the one --compare-attn repeats

        def timed(label, cfg=config, profile_mode=None, **mode_kw):
            fastest.update(label=label, kw=mode_kw)
            add(summarise(label, run_packed(cfg, batches, device, args.steps, args.warmup, args.compile,
                                            profile if profile_mode == mode else None, **mode_kw),
                          batches, cfg, args.warmup, args.steps))

        timed(name, profile_mode="plain")
        if args.cuda_graphs:  # --compile applies here too: compiled blocks inside the captured graphs
            timed(f"{name}+graphs", profile_mode="graphs", cuda_graphs=True)
        if args.graph_optimizer:
            timed(f"{name}+graphs+opt", profile_mode="opt", cuda_graphs=True, graph_optimizer=True)
        if args.master_weights:
            timed(f"{name}+graphs+opt+master", profile_mode="master", cuda_graphs=True, graph_optimizer=True,
                  master_weights=True)
        for chunks in overlap_chunks if args.overlap_update else []:
            timed(f"{name}+graphs+opt+overlap" + (f"/{chunks}" if len(overlap_chunks) > 1 else ""),
                  profile_mode="overlap" if chunks == overlap_chunks[-1] else None, cuda_graphs=True,
                  graph_optimizer=True, overlap_chunks=chunks)
        base = dict(fastest)
        for impl in compare_attn:  # the same mode with another attention backend, in the same run
            timed(f"{base['label']} attn={impl}", cfg=dataclasses.replace(config, attn_impl=impl), **base["kw"])
        for compile_mode in compare_compile:  # the same mode with the blocks compiled another way
            timed(f"{base['label']} compile={compile_mode}", compile_mode=compile_mode, **base["kw"])
        if not args.skip_padded and bs <= args.padded_max_batch:
            padded = summarise("padded (reference)", run_padded(config, batches, device, args.steps, args.warmup,
                                                                 num_patches=args.max_len),
                               batches, config, args.warmup, args.steps)
            for row in rows[first:]:  # packed (and the graphs rows) vs this padded row
                if row["status"] == padded["status"] == "ok":
                    row["speedup"] = row["samples_per_s"] / padded["samples_per_s"]
            add(padded)
    if args.long_len:
        batches = make_batches(2, 1, in_dim, args.long_len, args.long_len, seed=1)
        steps = max(1, min(args.steps, 3))
        add(summarise(f"packed, L={args.long_len}", run_packed(config, batches, device, steps, 1),
                      batches, config, 1, steps))
    meta["complete"] = True
    print(f"\n## pretrain step: {meta['device']}, preset {args.preset}, torch {torch.__version__}\n")
    print(f"inputs: {meta['inputs']}\n")
    if "note" in meta:
        print(f"NOTE: {meta['note']}.\n")
    print_table(rows)
    print("\n" + json.dumps(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
