"""Benchmark the Triton kernels (kernels/) against torch eager and torch.compile.

    python bench/kernels.py                         # CUDA, paper shapes (d=1024), markdown table
    python bench/kernels.py --json out.json         # also write every measurement as JSON
    python bench/kernels.py --device cpu --quick    # CPU smoke (< 1 min): tiny shapes, no GPU figures

Kernels: semantic-mask selection (adjacent cosine + per-video k lowest) over a packed batch, and the
masked MSE over the decoded masked rows (50% mask), forward and forward+backward. GB/s counts the bytes
the kernels move: semantic mask reads x once and writes the mask (the minimum); masked MSE forward
reads the pred and target rows (the minimum); forward+backward adds the backward's second read of
both and the gradient write (5 units of pred size where one fused pass could do with 3). It is
compared with the card's memory bandwidth (detected from the device name). The graph-replayed % is
left empty where the working set fits in L2 (replays do not flush it: not an HBM figure).
Each implementation is also checked against the torch reference (mask exactly equal, loss close).
semantic_mask also gets a row for the row-streaming similarity kernel (a candidate that reads each row
once), one for the radix selection kernel (the default until 2026-11-26; the histogram kernel is the
default now), and rows for its two stages apart (similarity in both variants; selection by the radix
kernel and by the histogram one at two digit widths), to show which one stands between it and the bandwidth target.
No downloads, no prompts; a failing implementation is reported in the table rather than aborting.

    python bench/kernels.py --sweep-sim --json sweep.json   # similarity-kernel launch configs (CUDA)

--sweep-sim times semantic_mask's similarity stage alone over BLOCK_T x BLOCK_D x num_warps x num_stages
(and the stream kernel's ROWS), each config's keys checked bit-equal to the default's on integer-valued
rows first, at 256x8192, 256x256, 16x8192 (d=1024); then semantic_mask end to end with the fastest
config against the default (% of peak BW). Without CUDA it is a tiny interpreter smoke, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

# bench/ for bench_args; the checkout, if lvmae_fast is not installed
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from bench_args import at_least, writable_json  # noqa: E402

from lvmae_fast import kernels as K
from lvmae_fast.atomic import atomic_write_text
from lvmae_fast.masking import adjacent_cosine, mask_lowest, semantic_mask_torch
from lvmae_fast.packing import cu_seqlens_from_lengths

# Peak HBM bandwidth by device-name words (torch.cuda.get_device_name, e.g. "NVIDIA A100-SXM4-40GB"): the
# first entry all of whose words are words of the name wins, so a more specific entry comes first. Words,
# not substrings: "RTX A1000" is no A100, nor "L40S" an "L4". GH200 with HBM3e: 4.9 TB/s (HBM3: 4.0).
PEAK_BW_TBS = [("GH200 HBM3e", 4.9), ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0),
               ("H100", 3.35), ("A100 40GB", 1.555), ("A100 80GB PCIe", 1.935), ("A100", 2.039), ("L40S", 0.864),
               ("L40", 0.864), ("L4", 0.3), ("A10", 0.6)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_bandwidth_of(name)


def peak_bandwidth_of(name: str) -> float | None:
    """Bytes/s of the first PEAK_BW_TBS entry whose words are all words of `name` (case aside)."""
    words = set(re.split(r"[\s\-_]+", name.upper()))
    for key, tbs in PEAK_BW_TBS:
        if set(key.upper().split()) <= words:
            return tbs * 1e12
    return None


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
def time_ms(fn, device: torch.device, quick: bool, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds per call. CUDA: triton's do_bench (L2 flushed between calls; warmup and rep
    are its milliseconds of warm-up and of timed calls) or CUDA events."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except ImportError:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                fn()
            times = []
            for _ in range(20):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    fn()  # warm-up (and compile, where relevant)
    times, budget = [], time.perf_counter() + (0.5 if quick else 2.0)
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------
CASE_SPEC = re.compile(r"(\d+)x(?:(\d+)|U(\d+)-(\d+))")


def make_lengths(spec: str, seed: int = 0) -> list[int]:
    """'16x256' = 16 videos of 256 segments; '256xU2-256' = 256 videos with L ~ U[2, 256]. Anything else
    (a count or length of 0, lo > hi) is a ValueError naming the spec."""
    m = CASE_SPEC.fullmatch(spec)
    count, length, lo, hi = (None if v is None else int(v) for v in (m.groups() if m else (None,) * 4))
    if not m or min(v for v in (count, length, lo, hi) if v is not None) < 1 or (lo is not None and lo > hi):
        raise ValueError(f"{spec!r} is not COUNTxLEN or COUNTxUlo-hi with COUNT, LEN >= 1 and lo <= hi")
    if lo is not None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [length] * count


def randn(shape, device, seed):
    # Generated on the device: the largest case is 2M x 1024, too slow to draw on the host.
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device)


def packed_embeddings(lengths, d, dtype, device, seed=0):
    """L2-normalised embeddings, as the sampler feeds the model."""
    x = torch.nn.functional.normalize(randn((sum(lengths), d), device, seed), dim=-1).to(dtype)
    return x, cu_seqlens_from_lengths(lengths, device)


def _semantic_graph(x, cu, k):
    return mask_lowest(adjacent_cosine(x, cu), cu, k)


def _mse_eager(p, t, r):  # the lvmae_fast.loss torch path
    return (p.float() - t.index_select(0, r).float()).pow(2).mean(-1).mean()


_COMPILED: dict = {}


def compiled(fn):
    """One torch.compile wrapper per function for the whole run (shape changes recompile at most
    once more, with dynamic shapes, instead of once per case)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def num_masked_of(cu, ratio):
    lengths = (cu[1:] - cu[:-1]).long()
    return lengths - torch.floor(lengths.double() * (1.0 - ratio)).long().clamp_min(1)


def bench_semantic(spec, d, dtype, device, quick, use_compile, have_triton):
    lengths = make_lengths(spec)
    x, cu = packed_embeddings(lengths, d, dtype, device)
    ratio, max_len = 0.5, max(lengths)
    want = semantic_mask_torch(x, cu, ratio)
    k = num_masked_of(cu, ratio)

    impls = {"torch eager": lambda: semantic_mask_torch(x, cu, ratio)}
    if use_compile:  # the per-video counts inside the timed call, as the other rows compute them
        impls["torch.compile"] = lambda: compiled(_semantic_graph)(x, cu, num_masked_of(cu, ratio))
    if have_triton:
        from lvmae_fast.kernels import _triton as KT

        def triton_with(sim, select="hist"):
            def run():  # the kernels semantic_mask launches: similarity "tile" (default) or "stream", selection
                saved = KT.SIM_KERNEL, KT.SELECT_IMPL  # "hist" (default) or "radix" (the alternatives)
                KT.SIM_KERNEL, KT.SELECT_IMPL = sim, select
                try:
                    return K.semantic_mask(x, cu, ratio, max_seqlen=max_len, validate=False)
                finally:
                    KT.SIM_KERNEL, KT.SELECT_IMPL = saved
            return run
        impls["triton"] = triton_with("tile")
        impls["triton (stream sim)"] = triton_with("stream")
        impls["triton (radix select)"] = triton_with("tile", "radix")
    bytes_moved = x.numel() * x.element_size() + 2 * cu.numel() * 4 + x.shape[0]  # x once, mask out
    # The torch reference cannot be captured: it reads the per-video counts on the host, and even with
    # them precomputed its indexed writes copy a host value to the device ("Cannot copy between CPU and
    # CUDA tensors during CUDA graph capture"). Its graph column says so instead of that error.
    host_sync = {"torch eager": "host sync"}
    rows = []
    for name, fn in impls.items():
        rows.append(measure("semantic_mask", f"{spec} d={d}", name, fn, device, quick, bytes_moved,
                            check=lambda out: bool(torch.equal(out, want)),
                            not_capturable=host_sync.get(name)))
    if have_triton:
        rows += semantic_stages(x, cu, k, want, max_len, f"{spec} d={d}", device, quick)
    return rows


def semantic_stages(x, cu, k, want, max_len, case, device, quick):
    """The two kernels of semantic_mask timed apart (which one holds it back from the bandwidth
    target): the similarity pass (reads x, writes int32 keys) in both variants, and the selection
    (radix passes over the keys, one mask write) by the radix kernel and by the histogram kernel (the
    default), at its default digit width and one other (each checked equal to the torch mask)."""
    from lvmae_fast.kernels import _triton as KT

    T, B, gpu = x.shape[0], cu.numel() - 1, device.type == "cuda"
    keys = KT.adjacent_keys(x, False, "tile")
    num_masked = k.to(torch.int32)
    radix_bits = KT.select_tiles(max_len, B, gpu)[2]
    sim_bytes = x.numel() * x.element_size() + 4 * T
    mask_bytes = T + 2 * cu.numel() * 4
    select_bytes = 4 * T * (32 // radix_bits + 1) + mask_bytes  # keys per pass (mostly L2), mask
    # Checked on integer-valued rows of the same shape and dtype (the bytes timed are the same), where the
    # two kernels' keys are exact and must agree bit for bit (the whole-mask rows check tile against torch).
    x_int = torch.round(x.float() * 4).to(x.dtype)
    keys_int = KT.adjacent_keys(x_int, False, "tile")
    rows = [measure("semantic_mask stage: similarity", case, f"triton {sim}",
                    lambda sim=sim: KT.adjacent_keys(x_int, False, sim), device, quick, sim_bytes,
                    check=lambda out: bool(torch.equal(out, keys_int)))
            for sim in ("tile", "stream")]
    rows.append(measure("semantic_mask stage: selection", case, "triton radix",
                        lambda: KT.select_lowest(keys, cu, num_masked, max_len, impl="radix"), device, quick,
                        select_bytes,
                        check=lambda out: bool(torch.equal(out, want))))
    _, block, hist_bits, _ = KT.select_hist_tiles(max_len, B, gpu)
    for bits in (hist_bits, 5 if hist_bits == 8 else 8):
        # Videos that fit the tile are read once; longer ones once per pass and once more for the mask.
        reads = 1 if max_len <= block else -(-32 // bits) + 1
        rows.append(measure("semantic_mask stage: selection", case,
                            f"triton hist, {bits}-bit digits" + (" (default)" if bits == hist_bits else ""),
                            lambda bits=bits: KT.select_lowest(keys, cu, num_masked, max_len, bits, impl="hist"),
                            device, quick, 4 * T * reads + mask_bytes, check=lambda out: bool(torch.equal(out, want))))
    return rows


def bench_masked_mse(spec, d, dtype, device, quick, use_compile, have_triton, backward):
    lengths = make_lengths(spec)
    T = sum(lengths)
    target = randn((T, d), device, 1).to(dtype)
    g = torch.Generator().manual_seed(1)
    rows_idx = torch.randperm(T, generator=g)[: T // 2].sort().values.to(device)  # 50% mask
    # Predictions close to their own rows' targets (a trained model's): the loss is ~1e-4, and a kernel that
    # pairs rows wrongly or drops some gives ~2 or a few % off. Independent draws gave ~2 whatever the pairing.
    pred = (target[rows_idx].float() + 0.01 * randn((rows_idx.numel(), d), device, 2)).to(dtype).requires_grad_(True)

    loss_impls = {"torch eager": _mse_eager}
    if use_compile:
        loss_impls["torch.compile"] = compiled(_mse_eager)
    if have_triton:
        loss_impls["triton"] = lambda p, t, r: K.masked_mse_rows(p, t, r)
    # In float64 on the same (rounded) inputs: kernels add up in fp32, within ~1e-5 relative of it.
    ref = _mse_eager(pred.detach().double(), target.double(), rows_idx).item()
    ref_grad = torch.autograd.grad(_mse_eager(pred, target, rows_idx), pred)[0].float() if backward else None

    def loss_close(loss) -> bool:
        return math.isclose(float(loss.detach()), ref, rel_tol=1e-3)

    def grad_close(res) -> bool:
        # The loss, then the gradient against eager torch's, 1% of its largest entry (fp16/bf16 rounding
        # of each entry): a backward kernel recomputes from pred and target, blind to a forward bug.
        loss, grad = res
        return loss_close(loss) and bool((grad.float() - ref_grad).abs().max()
                                         <= 1e-2 * ref_grad.abs().max().clamp_min(1e-30))

    def runner(f):
        if backward:
            def fwd_bwd():
                loss = f(pred, target, rows_idx)
                return loss, torch.autograd.grad(loss, pred)[0]
            return fwd_bwd
        return lambda: f(pred, target, rows_idx)

    elem = pred.element_size()
    # Bytes the two-pass design moves: fwd reads pred rows + target rows; bwd reads both again and
    # writes the gradient (5 units; a single fused pass could do with 3, so this is traffic, not need).
    bytes_moved = pred.numel() * elem * (5 if backward else 2) + rows_idx.numel() * 8
    out = []
    for name, f in loss_impls.items():
        check = grad_close if backward else loss_close
        out.append(measure("masked_mse fwd+bwd" if backward else "masked_mse fwd", f"{spec} d={d}", name,
                           runner(f), device, quick, bytes_moved, check))
    return out


def graph_ms(fn) -> float:
    """Median milliseconds per call with the calls replayed from one CUDA graph: the GPU time alone,
    without the host's per-call Python and launch overhead (L2 is not flushed between calls)."""
    from triton.testing import do_bench_cudagraph
    return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def measure(kernel, case, impl, fn, device, quick, bytes_moved, check, graph_fn=None, not_capturable=None):
    """graph_fn: a capture-safe equivalent of fn (no host sync) for the graph-replayed column.
    not_capturable: why fn cannot be captured (e.g. "host sync"): no capture is tried, and the graph
    column reads "not capturable (<why>)" rather than a capture error."""
    row = {"kernel": kernel, "case": case, "impl": impl, "ms": None, "gbps": None, "ok": None, "error": None,
           "ms_graph": None, "gbps_graph": None, "graph_error": None, "graph_note": None, "bytes": bytes_moved,
           "fits_l2": None}
    if device.type == "cuda":
        # Replays do not flush L2: a working set that fits there is not an HBM-bandwidth figure.
        row["fits_l2"] = bytes_moved <= torch.cuda.get_device_properties(device).L2_cache_size
    grad_mode = torch.no_grad if "fwd+bwd" not in kernel else torch.enable_grad
    try:
        with grad_mode():
            row["ok"] = bool(check(fn()))
            row["ms"] = time_ms(fn, device, quick)
        row["gbps"] = bytes_moved / (row["ms"] * 1e-3) / 1e9
    except Exception as e:  # report and move on: OOM at the largest shape, compile failures, ...
        row["error"] = _describe(e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    if device.type == "cuda" and not_capturable:
        row["graph_note"] = f"not capturable ({not_capturable})"
    elif device.type == "cuda":
        # Small shapes are bound by the host (~10 launches of Python per call): this column separates
        # what the kernels cost on the GPU from what calling them costs.
        try:
            with grad_mode():
                row["ms_graph"] = graph_ms(graph_fn or fn)
            row["gbps_graph"] = bytes_moved / (row["ms_graph"] * 1e-3) / 1e9
        except Exception as e:
            row["graph_error"] = _describe(e)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def add_speedups(rows, peak):
    eager = {(r["kernel"], r["case"]): r["ms"] for r in rows if r["impl"] == "torch eager"}
    eager_graph = {(r["kernel"], r["case"]): r.get("ms_graph") for r in rows if r["impl"] == "torch eager"}
    for r in rows:
        base = eager.get((r["kernel"], r["case"]))
        r["speedup_vs_eager"] = base / r["ms"] if base and r["ms"] else None
        r["pct_peak_bw"] = 100 * r["gbps"] * 1e9 / peak if peak and r["gbps"] else None
        base_graph = eager_graph.get((r["kernel"], r["case"]))
        r["speedup_vs_eager_graph"] = base_graph / r["ms_graph"] if base_graph and r.get("ms_graph") else None
        r["pct_peak_bw_graph"] = (100 * r["gbps_graph"] * 1e9 / peak
                                  if peak and r.get("gbps_graph") and not r.get("fits_l2") else None)


def markdown(rows, gpu_measured: bool) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("| kernel | case | impl | time (ms) | speedup vs eager | GB/s | % peak BW "
            "| graph-replayed ms | speedup (graphs) | % peak BW (graph) | check |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        check = "ERROR: " + r["error"] if r["error"] else ("ok" if r["ok"] else "MISMATCH")
        if r.get("graph_error"):
            check += f" (graph: {r['graph_error']})"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['impl']} | {f(r['ms'], '.3f')} | "
                     f"{f(r['speedup_vs_eager'], '.2f')} | {f(r['gbps'], '.0f') if gpu_measured else '-'} | "
                     f"{f(r['pct_peak_bw'], '.0f')} | {r.get('graph_note') or f(r.get('ms_graph'), '.3f')} | "
                     f"{f(r.get('speedup_vs_eager_graph'), '.2f')} | {f(r.get('pct_peak_bw_graph'), '.0f')} | {check} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# --sweep-sim: launch configurations of the similarity kernel (semantic_mask's stage 1)
# ----------------------------------------------------------------------------------------------------
SWEEP_SHAPES = ["256x8192", "256x256", "16x8192"]  # the issue's target first: a time cut keeps it
SWEEP_GRID = {"block_t": (4, 8, 16, 32), "block_d": (128, 256, 512, 1024), "num_warps": (2, 4, 8),
              "num_stages": (1, 2, 3, 4)}
SWEEP_STREAM = {"rows": (8, 16, 32, 64, 128), "num_warps": (4, 8)}  # whole rows, triton's default stages
SWEEP_MAX_TILE = 16384  # BLOCK_T * BLOCK_D elements; beyond, two fp32 tiles of it cannot stay in registers
SWEEP_BUDGET_S = 150.0  # seconds from the start of the run; configs left after it are recorded as skipped
SWEEP_WARMUP_MS, SWEEP_REP_MS = 5, 25  # do_bench per config (the main table's 10/50, halved: ~200 configs)
SWEEP_TOP = 15
# CPU (Triton interpreter): a smoke of the sweep's code path, not a measurement.
SWEEP_CPU_SHAPES, SWEEP_CPU_DIM = ["4x16"], 48


def _triton_default_stages() -> int | None:
    """num_stages triton uses when a launch names none (3 on CUDA), so the grid entry equal to the
    default configuration can be recognised; None where the CUDA backend is absent."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return int(CUDAOptions.num_stages)
    except Exception:
        return None


def sim_label(cfg) -> str:
    if cfg is None:
        return "default"
    stages = "-" if cfg.num_stages is None else cfg.num_stages
    size = f"ROWS={cfg.block_t} BLOCK_D={cfg.block_d}" if cfg.kernel == "stream" else f"{cfg.block_t}x{cfg.block_d}"
    return f"{cfg.kernel} {size} w{cfg.num_warps} s{stages}"


def sweep_configs(D: int, T: int, gpu: bool):
    """(configs, skipped, default): the default configuration first (what semantic_mask launches), the
    stream kernel's default next, then the grid; skipped = [(config, why)] for absurd tiles."""
    from lvmae_fast.kernels import _triton as KT

    stages = _triton_default_stages() if gpu else None

    def spelt(cfg):  # the default's num_stages spelt out: the grid entry equal to it is the same kernel
        return cfg._replace(num_stages=stages) if cfg.num_stages is None else cfg

    default = spelt(KT.default_sim_config(D, T, gpu=gpu))
    width = KT._pow2(D)  # the stream kernel's whole-row width, as default_sim_config picks it
    stream_default = KT.SimConfig(KT.STREAM_ROWS, width, 4, stages, "stream")
    configs = [default] + ([stream_default] if stream_default != default else [])
    skipped = []
    if not gpu:  # interpreter smoke: one non-default tile config (BLOCK_D < d: the chunk loop) is enough
        configs.insert(1, KT.SimConfig(4, max(1, width // 4), 2, 1, "tile"))
        return configs, skipped, default
    for bt in SWEEP_GRID["block_t"]:
        for bd in SWEEP_GRID["block_d"]:
            for w in SWEEP_GRID["num_warps"]:
                for st in SWEEP_GRID["num_stages"]:
                    cfg = KT.SimConfig(bt, bd, w, st, "tile")
                    if cfg in configs:
                        continue
                    if bt * bd > SWEEP_MAX_TILE:
                        skipped.append((cfg, f"tile of {bt * bd} elements > {SWEEP_MAX_TILE}"))
                    elif bd > width:
                        skipped.append((cfg, f"BLOCK_D > d={D} rounded up to a power of two"))
                    else:
                        configs.append(cfg)
    for rows in SWEEP_STREAM["rows"]:
        for w in SWEEP_STREAM["num_warps"]:
            cfg = KT.SimConfig(rows, width, w, stages, "stream")
            if cfg not in configs:
                configs.append(cfg)
    return configs, skipped, default


def integer_rows(lengths, d, dtype, device, seed=0):
    """Packed rows of small integers (exact in every dtype): every dot product and squared norm is then
    exact whatever the summation order, so every launch configuration must give the default's keys
    bit for bit (and semantic_mask the torch reference's mask). The bytes moved, hence the time, do not
    depend on the values."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randint(-3, 4, (sum(lengths), d), generator=g, device=device, dtype=torch.int8).to(dtype)
    return x, cu_seqlens_from_lengths(lengths, device)


_WORKER_X: dict = {}


def _compile_sim_config(cfg: tuple, d: int, dtype_name: str) -> str | None:
    """Compile-pool task: launch one config on a small input of the sweep's dtype and d (same kernel,
    constexprs and argument specialisation as the sweep: rows a multiple of 16), which leaves the
    compiled kernel in triton's on-disk cache for the parent. None, or why it failed."""
    from lvmae_fast.kernels import _triton as KT

    key = (d, dtype_name)
    try:
        if key not in _WORKER_X:
            _WORKER_X[key] = torch.ones((4096, d), dtype=DTYPES[dtype_name], device="cuda")
        KT.adjacent_keys(_WORKER_X[key], False, config=KT.SimConfig(*cfg))
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return _describe(e)


def precompile_sim_configs(configs, d: int, dtype_name: str, workers: int, timeout_s: float, log) -> dict:
    """Compile the configs in `workers` spawned processes (triton compiles one kernel at a time per
    process; ~200 configs in series would take most of the budget). Returns {config: error} for the
    ones that failed there; the sweep still launches every config itself (cache hits when this worked)."""
    import multiprocessing as mp

    if workers <= 0 or not configs:
        return {}
    t0 = time.perf_counter()
    failed = {}
    try:
        with mp.get_context("spawn").Pool(workers) as pool:  # leaving the block terminates the workers
            res = pool.starmap_async(_compile_sim_config, [(tuple(c), d, dtype_name) for c in configs], chunksize=1)
            for cfg, err in zip(configs, res.get(timeout=max(1.0, timeout_s))):
                if err:
                    failed[cfg] = err
        log(f"[sweep] compiled {len(configs)} configs in {workers} processes: {time.perf_counter() - t0:.1f}s "
            f"({len(failed)} failed there)")
    except Exception as e:  # timeout, or no spawn here: the sweep compiles what is left itself
        log(f"[sweep] compile pool stopped after {time.perf_counter() - t0:.1f}s ({_describe(e)}); "
            "compiling the rest in this process")
    return failed


def sweep_shape(spec, d, dtype, device, configs, skipped, default, peak, deadline, timer, known_failed):
    """One shape: every config's keys checked equal to the default config's, then timed. Returns the
    result dict and the inputs (x, cu) for the whole-mask comparison."""
    from lvmae_fast.kernels import _triton as KT

    x, cu = integer_rows(make_lengths(spec), d, dtype, device)
    T = x.shape[0]
    nbytes = x.numel() * x.element_size() + 4 * T  # x read once, int32 keys written (as the stage row)
    ref = KT.adjacent_keys(x, False)  # config=None: what semantic_mask launches
    entries = []
    for cfg in configs:
        e = {"config": sim_label(cfg), **cfg._asdict(), "default": cfg == default, "status": None, "ms": None,
             "gbps": None, "pct_peak_bw": None, "speedup_vs_default": None}
        entries.append(e)
        if cfg in known_failed:
            e["status"] = f"failed: {known_failed[cfg]}"
            continue
        if time.perf_counter() > deadline and not e["default"]:
            e["status"] = "skipped: sweep time budget spent"
            continue
        try:
            out = KT.adjacent_keys(x, False, config=cfg)
            differ = int((out != ref).sum())
            if differ:
                e["status"] = f"mismatch: {differ} of {T} keys differ from the default config's"
                continue
            e["ms"] = timer(lambda cfg=cfg: KT.adjacent_keys(x, False, config=cfg))
            e["status"] = "ok"
            e["gbps"] = nbytes / (e["ms"] * 1e-3) / 1e9
            e["pct_peak_bw"] = 100 * e["gbps"] * 1e9 / peak if peak else None
        except Exception as err:  # compile failure, out of shared memory, ...: a row, not a lost sweep
            e["status"] = f"failed: {_describe(err)}"
            known_failed[cfg] = _describe(err)
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
    default_ms = next((e["ms"] for e in entries if e["default"] and e["ms"]), None)
    for e in entries:
        e["speedup_vs_default"] = default_ms / e["ms"] if default_ms and e["ms"] else None
    entries += [{"config": sim_label(cfg), **cfg._asdict(), "default": False, "status": f"skipped: {why}",
                 "ms": None, "gbps": None, "pct_peak_bw": None, "speedup_vs_default": None} for cfg, why in skipped]
    result = {"shape": spec, "T": T, "d": d, "dtype": str(dtype), "bytes": nbytes,
              "data": "integer-valued rows (exact similarities: keys compared bit for bit)", "results": entries}
    return result, x, cu


def sweep_markdown(result, gpu: bool, top: int = SWEEP_TOP) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    entries = result["results"]
    ok = sorted((e for e in entries if e["status"] == "ok"), key=lambda e: e["ms"])
    lines = [f"### similarity stage: {result['shape']} d={result['d']} {result['dtype']} ({result['T']} rows, "
             f"{result['bytes'] / 1e6:.1f} MB moved): top {min(top, len(ok))} of {len(ok)} configs that ran", "",
             "| rank | kernel | BLOCK_T / ROWS | BLOCK_D | warps | stages | time (ms) | GB/s | % peak BW | speedup vs default |",
             "|" + "---|" * 10]

    def line(rank, e):
        stages = "-" if e["num_stages"] is None else e["num_stages"]
        name = e["kernel"] + (" (default)" if e["default"] else "")
        return (f"| {rank} | {name} | {e['block_t']} | {e['block_d']} | {e['num_warps']} | {stages} | "
                f"{f(e['ms'], '.4f')} | {f(e['gbps'], '.0f') if gpu else '-'} | {f(e['pct_peak_bw'], '.1f')} | "
                f"{f(e['speedup_vs_default'], '.3f')}x |")

    lines += [line(i, e) for i, e in enumerate(ok[:top], 1)]
    lines += [line(i, e) for i, e in enumerate(ok, 1) if i > top and e["default"]]  # the default, wherever it ranks
    by_status: dict = {}
    for e in entries:
        if e["status"] != "ok":
            kind = e["status"].split(":")[0]
            by_status.setdefault(kind, []).append(e)
    for kind, es in by_status.items():
        reasons: dict = {}
        for e in es:
            reasons.setdefault(e["status"].split(": ", 1)[-1][:110], []).append(e["config"])
        lines.append(f"\n{kind}: {len(es)} configs")
        for why, names in list(reasons.items())[:6]:
            lines.append(f"  - {why} ({len(names)}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return "\n".join(lines)


def sweep_summary(doc) -> str:
    """The few lines to read (also the last ones printed, so a `tail` keeps them)."""
    def fig(e):
        if not e or e.get("ms") is None:
            return "-"
        pct = e.get("pct_peak_bw")
        return f"{e['ms']:.4f} ms" + ("" if pct is None else f" = {pct:.1f}% of peak BW")

    lines = ["## sweep summary (the issue's target: semantic_mask >= 80% of peak BW)"]
    for shape in doc["shapes"]:
        ok = sorted((e for e in shape["results"] if e["status"] == "ok"), key=lambda e: e["ms"])
        if not ok:
            lines.append(f"- similarity {shape['shape']}: {shape.get('status', 'no config ran')}")
            continue
        default = next((e for e in ok if e["default"]), None)
        speedup = ok[0]["speedup_vs_default"]
        lines.append(f"- similarity {shape['shape']}: default {default['config'] if default else '-'}: {fig(default)}; "
                     f"best {ok[0]['config']}: {fig(ok[0])}"
                     + (f" ({speedup:.3f}x)" if speedup else ""))
    for r in doc["semantic_mask"]:
        check = "ok" if r.get("ok") else f"CHECK FAILED ({r.get('error') or 'mismatch'})"
        lines.append(f"- semantic_mask whole {r['case']}, {r['impl']}: {fig(r)}; graph-replayed "
                     f"{'-' if r.get('ms_graph') is None else '%.4f ms' % r['ms_graph']}; {check}")
    return "\n".join(lines)


def sweep_whole_mask(spec, x, cu, default, best, device, quick, peak):
    """semantic_mask end to end (same call and bytes as the main table's triton row) with the default
    similarity config and with `best`; each mask checked equal to the torch reference (exact here)."""
    d = x.shape[1]
    lengths = (cu[1:] - cu[:-1]).tolist()
    ratio, max_len = 0.5, max(lengths)
    want = semantic_mask_torch(x, cu, ratio)
    bytes_moved = x.numel() * x.element_size() + 2 * cu.numel() * 4 + x.shape[0]
    rows = []
    for role, cfg in (("default", None), ("best", best)):  # None: exactly what semantic_mask launches today
        rows.append(measure("semantic_mask (whole)", f"{spec} d={d}", f"triton, sim {role}: {sim_label(cfg or default)}",
                            lambda cfg=cfg: K.semantic_mask(x, cu, ratio, max_seqlen=max_len, validate=False,
                                                            sim_config=cfg),
                            device, quick, bytes_moved, check=lambda out: bool(torch.equal(out, want))))
    add_speedups(rows, peak)
    return rows


def sweep_sim(device: torch.device, dtype, d: int, shapes, json_path=None, budget_s: float = SWEEP_BUDGET_S,
              workers: int = 0, started: float | None = None, log=None) -> tuple[dict, int]:
    """The similarity-config sweep; prints as it goes, rewrites json_path (atomically) after each shape
    and after the whole-mask comparison. Returns (document, exit code: 1 on a mismatch or a failed
    default/whole-mask check)."""
    from lvmae_fast.kernels import _triton as KT

    started = time.perf_counter() if started is None else started
    deadline = started + budget_s
    gpu = device.type == "cuda"
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    name, peak = peak_bandwidth(device)
    quick = not gpu

    def timer(fn):
        return time_ms(fn, device, quick, warmup=SWEEP_WARMUP_MS, rep=SWEEP_REP_MS)

    doc = {"meta": {"device": name, "device_type": device.type, "peak_bw_bytes_per_s": peak, "dtype": str(dtype),
                    "dim": d, "torch": torch.__version__, "triton_mode": K.triton_mode(), "shapes": list(shapes),
                    "gpu_figures_measured": gpu, "budget_s": budget_s, "complete": False,
                    "timing": (f"triton do_bench median, L2 flushed, warmup {SWEEP_WARMUP_MS} ms, rep {SWEEP_REP_MS} ms"
                               if gpu else "Triton interpreter on CPU: NOT GPU measurements")},
           "shapes": [], "semantic_mask": []}

    def save():
        if json_path:
            atomic_write_text(json_path, json.dumps(doc, indent=2))

    print(f"# similarity-kernel sweep: {name} | dtype {dtype} | d={d} | peak BW "
          f"{'%.2f TB/s' % (peak / 1e12) if peak else 'unknown'}", flush=True)
    if not gpu:
        print("NOTE: CPU smoke of --sweep-sim (Triton interpreter, a few configs at a tiny shape): the timings "
              "are NOT GPU measurements; no GB/s or % of peak.", flush=True)
    T0 = sum(make_lengths(shapes[0]))
    configs, skipped, default = sweep_configs(d, T0, gpu)
    for spec in shapes[1:]:  # the default depends on T only below 8 rows per tile; all shapes share it here
        if KT.default_sim_config(d, sum(make_lengths(spec)), gpu=gpu)[:2] != default[:2]:
            log(f"[sweep] note: {spec} has another default tile than {shapes[0]}; its default row is {shapes[0]}'s")
    doc["meta"].update(configs=len(configs), skipped_configs=len(skipped), default=sim_label(default))
    known_failed: dict = {}
    if gpu:
        pool_failed = precompile_sim_configs(configs, d, next(k for k, v in DTYPES.items() if v == dtype), workers,
                                             max(1.0, 0.5 * (deadline - time.perf_counter())), log)
        doc["meta"]["compile_pool_failures"] = {sim_label(c): why for c, why in pool_failed.items()}
    rc, order = 0, list(configs)
    for i, spec in enumerate(shapes):
        t0 = time.perf_counter()
        if i and t0 > deadline:
            log(f"[sweep] {spec}: not run (sweep time budget of {budget_s:.0f}s spent)")
            doc["shapes"].append({"shape": spec, "d": d, "dtype": str(dtype), "results": [],
                                  "status": "skipped: sweep time budget spent"})
            save()
            continue
        try:
            result, x, cu = sweep_shape(spec, d, dtype, device, order, skipped, default, peak, deadline, timer,
                                        known_failed)
        except Exception as e:  # the inputs (out of memory) or the default config itself
            log(f"[sweep] {spec}: {_describe(e)}")
            doc["shapes"].append({"shape": spec, "d": d, "dtype": str(dtype), "results": [],
                                  "status": f"failed: {_describe(e)}"})
            save()
            rc = 1
            continue
        doc["shapes"].append(result)
        entries = result["results"]
        if any(e["status"].startswith("mismatch") for e in entries) or not any(
                e["default"] and e["status"] == "ok" for e in entries):
            rc = 1
        log(f"[sweep] {spec}: {time.perf_counter() - t0:.1f}s")
        print("\n" + sweep_markdown(result, gpu), flush=True)
        save()
        ok = sorted((e for e in entries if e["status"] == "ok"), key=lambda e: e["ms"])
        if i == 0:
            # The whole semantic_mask with the fastest config against the default, right after the target
            # shape (the issue's figure is this row's % of peak), then the other shapes in this ranking.
            best = KT.SimConfig(*(ok[0][k] for k in KT.SimConfig._fields)) if ok else default
            try:
                doc["semantic_mask"] = sweep_whole_mask(spec, x, cu, default, best, device, quick, peak)
            except Exception as e:
                doc["semantic_mask"] = [{"kernel": "semantic_mask (whole)", "case": f"{spec} d={d}", "impl": "triton",
                                         "error": _describe(e)}]
            rows = doc["semantic_mask"]
            if any(r.get("error") or not r.get("ok") for r in rows):
                rc = 1
            print("\n### semantic_mask end to end, default vs best similarity config (the issue's target: "
                  ">= 80% of peak BW)\n\n" + markdown([r for r in rows if "ms" in r], gpu), flush=True)
            save()
            ms = {sim_label(c): e["ms"] for c, e in zip(order, entries) if e["status"] == "ok"}
            order = [default] + sorted((c for c in configs if c != default),
                                       key=lambda c: (sim_label(c) not in ms, ms.get(sim_label(c), 0.0)))
        del x, cu
        if gpu:
            torch.cuda.empty_cache()
    doc["meta"]["complete"] = True
    doc["meta"]["elapsed_s"] = time.perf_counter() - started
    save()
    print("\n" + sweep_summary(doc), flush=True)
    if not gpu:
        print("\nNOTE: CPU smoke: these are interpreter timings, NOT GPU measurements.")
    log(f"[sweep] done in {time.perf_counter() - started:.1f}s")
    return doc, rc


def sweep_main(args, device: torch.device, started: float) -> int:
    gpu = device.type == "cuda"
    if not gpu and "triton" not in sys.modules:
        # The CPU smoke runs the kernels in the interpreter, which triton fixes at its first import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    mode = K.triton_mode()
    if mode != ("compiled" if gpu else "interpret") or (not gpu and not K._interpreting()):
        need = ("compiled (unset TRITON_INTERPRET)" if gpu
                else "in interpreter mode on CPU (TRITON_INTERPRET=1 before triton is imported)")
        print(f"kernels.py --sweep-sim: needs triton {need}; triton is {mode or 'not importable'}", file=sys.stderr)
        return 2
    if gpu:
        dtype, d, shapes = DTYPES[args.dtype], args.dim or 1024, args.cases.split(",") if args.cases else SWEEP_SHAPES
    else:
        dtype, d, shapes = torch.float32, args.dim or SWEEP_CPU_DIM, args.cases.split(",") if args.cases else SWEEP_CPU_SHAPES
    workers = args.sweep_workers if args.sweep_workers is not None else (
        min(12, max(1, (os.cpu_count() or 2) - 2)) if gpu else 0)
    _, rc = sweep_sim(device, dtype, d, shapes, json_path=args.json, budget_s=args.sweep_budget, workers=workers,
                      started=started)
    if args.json:
        print(f"\nwrote {args.json}")
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--dim", type=int, default=None, help="embedding dim (default 1024; 64 with --quick)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated batch specs, e.g. 16x256,256xU2-256,16x8192 (COUNTxLEN or COUNTxUlo-hi)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--json", default=None, help="write results and environment to this JSON file")
    ap.add_argument("--sweep-sim", action="store_true",
                    help="time the similarity kernel (semantic_mask's stage 1) over a grid of launch configurations "
                         "(CUDA: %s at d=1024, then semantic_mask with the best one vs the default); without CUDA a "
                         "tiny interpreter smoke" % ", ".join(SWEEP_SHAPES))
    ap.add_argument("--sweep-budget", type=float, default=SWEEP_BUDGET_S,
                    help="--sweep-sim: seconds from the start; configs left after that are recorded as skipped")
    ap.add_argument("--sweep-workers", type=int, default=None,
                    help="--sweep-sim on CUDA: processes that compile the configs ahead (0: compile in this process)")
    args = ap.parse_args(argv)
    # One argparse error naming the flag before anything is measured, as the other bench scripts do.
    at_least(ap, args, dim=1, sweep_workers=0)
    if not args.sweep_budget >= 0:
        ap.error(f"--sweep-budget must be >= 0 seconds, got {args.sweep_budget}")
    for spec in (args.cases.split(",") if args.cases else []):
        try:
            make_lengths(spec)
        except ValueError as err:
            ap.error(f"--cases: {err}")
    writable_json(ap, "--json", args.json)
    started = time.perf_counter()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --quick", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.sweep_sim:
        return sweep_main(args, device, started)
    if not gpu and not args.quick and not args.cases:
        # The GPU case list on the host would need ~9 GB for its largest case and time nothing of interest.
        print("kernels.py: no CUDA device: running the CPU smoke (--quick shapes); GPU figures are not measured",
              file=sys.stderr)
        args.quick = True
    dtype = DTYPES[args.dtype] if gpu else torch.float32  # bf16 matmul-free, but CPU half ops are slow
    d = args.dim or (64 if args.quick else 1024)
    if args.cases:
        cases = args.cases.split(",")
    elif args.quick:
        cases = ["4x64", "16xU2-64"]
    else:
        # The issue's target case (batch 256 at 8192) first, then the paper's batch-256 crops: the JSON is
        # rewritten after every case, so a run cut by a time box keeps the cases that matter most.
        cases = ["256x8192", "256x256", "256xU2-256", "16x256", "16x8192", "1x32768"]
    # GPU: compiled Triton only (an interpreted run at these shapes would take hours). CPU: only through
    # the interpreter, which must be enabled (TRITON_INTERPRET=1) before triton is imported.
    have_triton = K.triton_mode() == "compiled" if gpu else K._interpreting()
    use_compile = not args.no_compile and gpu  # inductor on CPU needs a C++ toolchain and minutes
    name, peak = peak_bandwidth(device)

    meta = {"device": name, "device_type": device.type, "peak_bw_bytes_per_s": peak, "dtype": str(dtype),
            "dim": d, "torch": torch.__version__, "triton_mode": K.triton_mode() if have_triton else None,
            "gpu_figures_measured": gpu, "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
            "cases": cases}
    rows = []
    for spec in cases:
        t0 = time.perf_counter()
        new = []
        for kernel, run in [("semantic_mask", lambda: bench_semantic(spec, d, dtype, device, args.quick, use_compile,
                                                                     have_triton))] + [
                (f"masked_mse {'fwd+bwd' if bwd else 'fwd'}",
                 lambda bwd=bwd: bench_masked_mse(spec, d, dtype, device, args.quick, use_compile, have_triton, bwd))
                for bwd in (False, True)]:
            try:
                new += run()
            except Exception as e:  # building the inputs (e.g. out of memory): a row, not a lost run
                new.append({"kernel": kernel, "case": f"{spec} d={d}", "impl": "(inputs)", "ms": None, "gbps": None,
                            "ok": None, "error": _describe(e), "ms_graph": None, "gbps_graph": None,
                            "graph_error": None, "graph_note": None, "bytes": None, "fits_l2": None})
                if gpu:
                    torch.cuda.empty_cache()
        rows += new
        add_speedups(rows, peak)
        # Progress on stderr, and the JSON rewritten after every case, so a killed run keeps its numbers.
        print(f"[bench] {spec}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        print("\n".join(markdown(new, gpu).splitlines()[2:]), file=sys.stderr, flush=True)
        if args.json:  # atomic: a kill mid-write leaves the previous case's complete file
            atomic_write_text(args.json, json.dumps({"meta": meta, "results": rows}, indent=2))

    print(f"# kernels benchmark: {name} | torch {torch.__version__} | dtype {dtype} | d={d}"
          f" | peak BW {'%.2f TB/s' % (peak / 1e12) if peak else 'unknown'}")
    if not gpu:
        print("NOTE: CPU smoke run — GPU figures (Triton speed, GB/s, % of peak bandwidth, graph-replayed times) "
              "are NOT measured."
              + ("" if have_triton else " Triton rows skipped (set TRITON_INTERPRET=1 to run the interpreter)."))
    if not use_compile:
        print("NOTE: torch.compile not measured" + (" on CPU." if not gpu else " (--no-compile)."))
    print()
    print(markdown(rows, gpu))
    print("\n" + json.dumps({"meta": meta, "results": rows}))
    if args.json:
        print(f"\nwrote {args.json}")
    bad = [r for r in rows if r["error"] or r["ok"] is False]
    return 1 if any(r["impl"].startswith("triton") or r["impl"] == "(inputs)" for r in bad) else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    sys.exit(main())
