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
once) and rows for its two stages apart (similarity in both variants; selection), to show which one
stands between it and the bandwidth target.
No downloads, no prompts; a failing implementation is reported in the table rather than aborting.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from lvmae_fast import kernels as K
from lvmae_fast.atomic import atomic_write_text
from lvmae_fast.masking import adjacent_cosine, mask_lowest, semantic_mask_torch
from lvmae_fast.packing import cu_seqlens_from_lengths

# Peak HBM bandwidth by device-name substring: first match wins, so a name that contains another
# comes first (GH200 before H200, H100 NVL/PCIe before H100, L40S/L40 before L4).
PEAK_BW_TBS = [("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
               ("A100", 2.0), ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3), ("A10", 0.6)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, tbs in PEAK_BW_TBS:
        if key in name:
            return name, tbs * 1e12
    return name, None


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
def time_ms(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds per call. CUDA: triton's do_bench (L2 flushed between calls) or CUDA events."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
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
def make_lengths(spec: str, seed: int = 0) -> list[int]:
    """'16x256' = 16 videos of 256 segments; '256xU2-256' = 256 videos with L ~ U[2, 256]."""
    count, length = spec.split("x")
    if length.startswith("U"):
        lo, hi = (int(v) for v in length[1:].split("-"))
        g = torch.Generator().manual_seed(seed)
        return torch.randint(lo, hi + 1, (int(count),), generator=g).tolist()
    return [int(length)] * int(count)


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

        def triton_with(sim):
            def run():  # the similarity kernel semantic_mask launches: the default "tile" or the "stream" candidate
                default, KT.SIM_KERNEL = KT.SIM_KERNEL, sim
                try:
                    return K.semantic_mask(x, cu, ratio, max_seqlen=max_len, validate=False)
                finally:
                    KT.SIM_KERNEL = default
            return run
        impls["triton"] = triton_with("tile")
        impls["triton (stream sim)"] = triton_with("stream")
    bytes_moved = x.numel() * x.element_size() + 2 * cu.numel() * 4 + x.shape[0]  # x once, mask out
    # The eager entry point reads the per-video counts on the host (a sync no graph can hold); its
    # graph-replayed time is that of the same ops with the counts precomputed.
    graph_fns = {"torch eager": lambda: _semantic_graph(x, cu, k)}
    rows = []
    for name, fn in impls.items():
        rows.append(measure("semantic_mask", f"{spec} d={d}", name, fn, device, quick, bytes_moved,
                            check=lambda out: bool(torch.equal(out, want)), graph_fn=graph_fns.get(name)))
    if have_triton:
        rows += semantic_stages(x, cu, k, want, max_len, f"{spec} d={d}", device, quick)
    return rows


def semantic_stages(x, cu, k, want, max_len, case, device, quick):
    """The two kernels of semantic_mask timed apart (which one holds it back from the bandwidth
    target): the similarity pass (reads x, writes int32 keys) in both variants, and the selection
    (radix passes over the keys, one mask write)."""
    from lvmae_fast.kernels import _triton as KT

    T = x.shape[0]
    keys = KT.adjacent_keys(x, False, "tile")
    num_masked = k.to(torch.int32)
    radix_bits = KT.select_tiles(max_len, cu.numel() - 1, device.type == "cuda")[2]
    sim_bytes = x.numel() * x.element_size() + 4 * T
    select_bytes = 4 * T * (32 // radix_bits + 1) + T + 2 * cu.numel() * 4  # keys per pass (mostly L2), mask
    rows = [measure("semantic_mask stage: similarity", case, f"triton {sim}",
                    lambda sim=sim: KT.adjacent_keys(x, False, sim), device, quick, sim_bytes,
                    check=lambda out: out.shape == (T,) and out.dtype == torch.int32)
            for sim in ("tile", "stream")]
    rows.append(measure("semantic_mask stage: selection", case, "triton",
                        lambda: KT.select_lowest(keys, cu, num_masked, max_len), device, quick, select_bytes,
                        check=lambda out: bool(torch.equal(out, want))))
    return rows


def bench_masked_mse(spec, d, dtype, device, quick, use_compile, have_triton, backward):
    lengths = make_lengths(spec)
    T = sum(lengths)
    target = randn((T, d), device, 1).to(dtype)
    g = torch.Generator().manual_seed(1)
    rows_idx = torch.randperm(T, generator=g)[: T // 2].sort().values.to(device)  # 50% mask
    pred = randn((rows_idx.numel(), d), device, 2).to(dtype).requires_grad_(True)

    loss_impls = {"torch eager": _mse_eager}
    if use_compile:
        loss_impls["torch.compile"] = compiled(_mse_eager)
    if have_triton:
        loss_impls["triton"] = lambda p, t, r: K.masked_mse_rows(p, t, r)
    ref = _mse_eager(pred.detach(), target, rows_idx).item()  # fp32 accumulate; check is 1% anyway

    def runner(f):
        if backward:
            return lambda: torch.autograd.grad(f(pred, target, rows_idx), pred)[0]
        return lambda: f(pred, target, rows_idx)

    elem = pred.element_size()
    # Bytes the two-pass design moves: fwd reads pred rows + target rows; bwd reads both again and
    # writes the gradient (5 units; a single fused pass could do with 3, so this is traffic, not need).
    bytes_moved = pred.numel() * elem * (5 if backward else 2) + rows_idx.numel() * 8
    out = []
    for name, f in loss_impls.items():
        check = (lambda res: True) if backward else (lambda res: math.isclose(float(res), ref, rel_tol=1e-2))
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


def measure(kernel, case, impl, fn, device, quick, bytes_moved, check, graph_fn=None):
    """graph_fn: a capture-safe equivalent of fn (no host sync) for the graph-replayed column."""
    row = {"kernel": kernel, "case": case, "impl": impl, "ms": None, "gbps": None, "ok": None, "error": None,
           "ms_graph": None, "gbps_graph": None, "graph_error": None, "bytes": bytes_moved, "fits_l2": None}
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
    if device.type == "cuda":
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
                     f"{f(r['pct_peak_bw'], '.0f')} | {f(r.get('ms_graph'), '.3f')} | "
                     f"{f(r.get('speedup_vs_eager_graph'), '.2f')} | {f(r.get('pct_peak_bw_graph'), '.0f')} | {check} |")
    return "\n".join(lines)


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
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --quick", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
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
            "dim": d, "torch": torch.__version__, "triton_mode": K.triton_mode(),
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
                            "graph_error": None, "bytes": None, "fits_l2": None})
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
    return 1 if any(r["impl"] in ("triton", "(inputs)") for r in bad) else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    sys.exit(main())
