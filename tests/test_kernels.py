"""Triton kernels (kernels/, imported as lvmae_fast.kernels) against the torch references.

CPU: the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set per test by the `interp`
fixture so no other test module sees it); shapes stay tiny because the interpreter is slow.
GPU variants (`gpu` marker) run the compiled kernels at paper shapes.
Rules (flash-attention style): selections equal the reference exactly; numeric outputs have an error
vs a float64 reference at most 2x that of the same-dtype torch implementation, plus a tiny atol.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

# Triton picks interpreter vs compiled mode once per process, at its first import. Without CUDA, make
# that the interpreter, then restore the variable so no other test sees TRITON_INTERPRET=1 (the
# `interp` fixture sets it per test). With CUDA, the compiled kernels are tested instead (the
# interpreter tests then skip unless the whole run has TRITON_INTERPRET=1, which skips the GPU ones).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved

from lvmae_fast import kernels as K  # noqa: E402
from lvmae_fast.masking import adjacent_cosine, semantic_mask_torch  # noqa: E402
from lvmae_fast.packing import cu_seqlens_from_lengths  # noqa: E402

needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton not installed")


def compiled_gpu(fn):
    """GPU tests of the compiled kernels (a run with TRITON_INTERPRET=1 would interpret them)."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn)
    fn = pytest.mark.skipif(torch.cuda.is_available() and K.triton_mode() != "compiled",
                            reason="needs triton in compiled mode (unset TRITON_INTERPRET)")(fn)
    return pytest.mark.gpu(fn)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def interp(monkeypatch):
    """Run the Triton kernels on CPU tensors through the interpreter."""
    if K.triton_mode() != "interpret":
        pytest.skip("triton not installed or imported in compiled mode (run with TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["tile", "stream"])
def sim_kernel(request, monkeypatch):
    """Both similarity kernels (the tiled default and the row-streaming candidate) behind semantic_mask."""
    from lvmae_fast.kernels import _triton as KT
    monkeypatch.setattr(KT, "SIM_KERNEL", request.param)
    return request.param


@pytest.fixture(params=["radix", "hist"])
def select_impl(request, monkeypatch):
    """Both selection kernels behind semantic_mask (the histogram default and the radix alternative)."""
    from lvmae_fast.kernels import _triton as KT
    monkeypatch.setattr(KT, "SELECT_IMPL", request.param)
    return request.param


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Use the exact GPU launch configs (tiles, radix 4, videos per program) inside the interpreter."""
    from lvmae_fast.kernels import _triton as KT
    monkeypatch.setattr(KT, "GPU_TILES_IN_INTERPRETER", True)


def packed(lengths, d=16, dtype=torch.float32, seed=0, device="cpu", kind="int"):
    """kind='int': small integers, exact in every dtype, so any IEEE implementation computes bit-identical
    similarities (integer dots and squared norms, then correctly rounded sqrt and division) whatever its
    summation order or FMA use: the selection must match exactly, ties included, on any hardware.
    kind='randn': realistic dense data (similarities may differ in the last bits; fine at small L)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        x = torch.randint(-3, 4, (sum(lengths), d), generator=g).float()
    else:
        x = torch.randn(sum(lengths), d, generator=g)
    return x.to(device=device, dtype=dtype), cu_seqlens_from_lengths(lengths, device)


def num_masked(cu, ratio):
    """k_i per video, as the public semantic_mask computes it for the kernels."""
    lengths = (cu[1:] - cu[:-1]).long()
    return (lengths - torch.floor(lengths.double() * (1.0 - ratio)).long().clamp_min(1)).to(torch.int32)


def check_mask(x, cu, ratio, inverted, **kw):
    got = K.semantic_mask(x, cu, ratio, inverted=inverted, **kw)
    want = semantic_mask_torch(x, cu, ratio, inverted=inverted)
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} rows differ"
    return got


# ----------------------------------------------------------------------------------------------------
# semantic mask selection
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int", "randn"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverted", [False, True])
def test_semantic_mask_matches_torch(interp, dtype, inverted, kind):
    # 1 .. 1500 rows: the 1500-row video is longer than the 1024-row chunk (long-video loop).
    x, cu = packed([1, 2, 5, 37, 300, 1500], dtype=dtype, kind=kind)
    for ratio in (0.0, 0.25, 0.5, 0.9, 0.999):
        m = check_mask(x, cu, ratio, inverted)
        if ratio == 0.0:
            assert not m.any()


@pytest.mark.parametrize("inverted", [False, True])
def test_exact_ties_are_broken_as_torch_breaks_them(interp, inverted):
    # Tiled rows give exactly equal similarities: a short video tiled x8 (as the reference's recipe), and
    # one of 1800 rows, longer than the 1024-row chunk, whose ties cross the chunk boundary.
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1, 8, generator=g).repeat(8, 1), torch.randn(3, 8, generator=g).repeat(600, 1)])
    cu = cu_seqlens_from_lengths([8, 1800], x.device)
    for ratio in (0.25, 0.5, 0.9):
        check_mask(x, cu, ratio, inverted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverted", [False, True])
def test_stream_similarity_kernel_matches_the_tiled_one_and_torch(interp, monkeypatch, dtype, inverted):
    """The row-streaming candidate: bit-identical keys to the tiled kernel on integer data (exact in any
    summation order), including a program boundary inside a video and d that is not a power of two;
    on dense data the selection equals torch's."""
    from lvmae_fast.kernels import _triton as KT
    x, cu = packed([1, 2, 5, 37, 90], d=20, dtype=dtype, seed=3)  # 135 rows: 5 programs of 32 rows
    assert torch.equal(KT.adjacent_keys(x, inverted, "stream"), KT.adjacent_keys(x, inverted, "tile"))
    monkeypatch.setattr(KT, "SIM_KERNEL", "stream")
    x, cu = packed([1, 2, 5, 37, 300], dtype=dtype, kind="randn")
    check_mask(x, cu, 0.5, inverted)
    with pytest.raises(ValueError, match="sim_kernel"):
        KT.adjacent_keys(x, inverted, "other")


# Launch configurations of the similarity kernels (bench/kernels.py --sweep-sim): BLOCK_D below d (a chunk
# loop with a partial last chunk) and above it (masked lanes), BLOCK_T 4 and 32 (program boundaries inside
# videos), num_warps/num_stages (ignored by the interpreter, passed through on GPU), the stream kernel's ROWS.
SIM_CONFIGS = [(4, 8), (32, 64, 8, 2), (4, 32, 2, 1), (32, 8, 4, 4), (16, 16, 2, 3),
               ("stream", 4, 32, 4, None), ("stream", 64, 64, 8, 2)]


def _sim_config(spec):
    from lvmae_fast.kernels import _triton as KT
    if spec[0] == "stream":
        return KT.SimConfig(*spec[1:], kernel="stream")
    return spec  # a plain tuple: the tiled kernel (SIM_KERNEL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverted", [False, True])
def test_similarity_launch_configs_give_the_default_keys_and_masks(interp, dtype, inverted):
    """Every config: the default config's keys bit for bit (integer rows: exact in any summation order)
    and the torch reference's mask, through the launcher and the public semantic_mask, on ragged videos
    with L=1 ones; d=20 is not a power of two."""
    from lvmae_fast.kernels import _triton as KT
    x, cu = packed([1, 2, 1, 5, 19, 1, 30], d=20, dtype=dtype, seed=5)  # 59 rows
    k = num_masked(cu, 0.5)
    want_keys = KT.adjacent_keys(x, inverted)
    want = semantic_mask_torch(x, cu, 0.5, inverted=inverted)
    for spec in SIM_CONFIGS:
        cfg = _sim_config(spec)
        assert torch.equal(KT.adjacent_keys(x, inverted, config=cfg), want_keys), spec
        check_mask(x, cu, 0.5, inverted, sim_config=cfg)
    assert torch.equal(KT.semantic_mask(x, cu, k, inverted, max_seqlen=30, sim_config=(4, 8)), want)


def test_similarity_launch_config_checks(interp):
    from lvmae_fast.kernels import _triton as KT
    x, cu = packed([3, 5], d=20)
    assert KT.default_sim_config(20, 8, "tile", gpu=True) == KT.SimConfig(8, 32, 2, 1, "tile")
    # d=1024 on a GPU: the H200 sweep's winner at 256x8192 (tile 8x128, 2 warps, 1 stage)
    assert KT.default_sim_config(1024, 1 << 21, gpu=True) == KT.SimConfig(8, 128, 2, 1, "tile")
    assert KT.default_sim_config(1024, 1 << 21, gpu=False) == KT.SimConfig(256, 512, 4, None, "tile")
    assert KT.default_sim_config(20, 8, "stream").kernel == "stream"
    assert KT.default_sim_config(KT.STREAM_MAX_D + 1, 8, "stream").kernel == "tile"  # wide rows: tiled
    assert KT.as_sim_config((8, 256), 20, "stream") == KT.SimConfig(8, 256, 4, None, "stream")
    bad = [((3, 16), "power of two"), ((4, 16, 3), "power of two"), ((4, 16, 64), "at most 32"),
           ((4, 16, 4, 0), "num_stages"), ((4,), "BLOCK_T, BLOCK_D"), (7, "BLOCK_T, BLOCK_D"),
           ((4.0, 16), "power of two"), (KT.SimConfig(4, 16, kernel="stream"), "whole rows")]
    for config, match in bad:
        with pytest.raises(ValueError, match=match):
            KT.adjacent_keys(x, False, config=config)
    with pytest.raises(ValueError, match="whole rows"):
        KT.adjacent_keys(x, False, "stream", config=(32, 16))
    with pytest.raises(ValueError, match="contradicts"):
        KT.adjacent_keys(x, False, "tile", config=KT.SimConfig(32, 32, kernel="stream"))
    with pytest.raises(ValueError, match="sim_kernel"):
        KT.adjacent_keys(x, False, "other", config=(4, 16))
    with pytest.raises(ValueError, match="power of two"):
        K.semantic_mask(x, cu, 0.5, sim_config=(3, 16))  # the public entry point passes it through


def _bench_kernels_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("lvmae_bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_similarity_sweep_cpu_smoke(interp, tmp_path, capsys):
    """bench/kernels.py --sweep-sim without CUDA: a few configs through the interpreter, keys checked
    against the default's, then semantic_mask with the fastest vs the default; says the timings are not
    GPU measurements. Timings themselves are not asserted."""
    bench = _bench_kernels_module()
    out = tmp_path / "sweep.json"
    assert bench.main(["--sweep-sim", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NOT GPU measurements" in printed and "### similarity stage" in printed
    doc = __import__("json").loads(out.read_text())
    assert doc["meta"]["complete"] is True and doc["meta"]["gpu_figures_measured"] is False
    (shape,) = doc["shapes"]
    assert len(shape["results"]) >= 3 and all(e["status"] == "ok" for e in shape["results"])
    assert sum(e["default"] for e in shape["results"]) == 1
    assert {e["kernel"] for e in shape["results"]} == {"tile", "stream"}
    assert [r["ok"] for r in doc["semantic_mask"]] == [True, True]
    assert not list(tmp_path.glob(".*"))  # the atomic writes left no temp file


def test_similarity_sweep_times_only_configs_whose_keys_match(interp, monkeypatch):
    """A config whose keys differ from the default's is reported as a mismatch and never timed; a config
    that fails to launch is reported as failed (and not retried at the next shape)."""
    from lvmae_fast.kernels import _triton as KT
    bench = _bench_kernels_module()
    configs, skipped, default = bench.sweep_configs(48, 64, gpu=False)
    assert configs[0] == default and len(configs) >= 3
    real = KT.adjacent_keys

    def faulty(x, inverted, sim_kernel=None, config=None):
        if config is not None and config.kernel == "stream":
            raise RuntimeError("out of resource: shared memory")
        keys = real(x, inverted, sim_kernel, config=config)
        if config is not None and config.block_t == 4:
            keys[5] += 1
        return keys

    monkeypatch.setattr(KT, "adjacent_keys", faulty)
    timed = []

    def timer(fn):  # records what would be timed; no clock
        timed.append(fn)
        return 1.0

    failed = {}
    result, _, _ = bench.sweep_shape("4x16", 48, torch.float32, torch.device("cpu"), configs, skipped, default,
                                     None, float("inf"), timer, failed)
    status = {(e["kernel"], e["block_t"], e["default"]): e["status"] for e in result["results"]}
    assert status[("tile", default.block_t, True)] == "ok"
    assert status[("tile", 4, False)] == "mismatch: 1 of 64 keys differ from the default config's"
    assert [v for k, v in status.items() if k[0] == "stream"] == ["failed: RuntimeError: out of resource: shared memory"]
    assert len(timed) == 1 and len(failed) == 1
    monkeypatch.setattr(KT, "adjacent_keys", real)
    result, _, _ = bench.sweep_shape("2x8", 48, torch.float32, torch.device("cpu"), configs, skipped, default,
                                     None, float("inf"), timer, failed)
    assert [e["status"] for e in result["results"]].count("ok") == len(configs) - 1  # the failure carried over


def test_kernels_bench_marks_the_uncapturable_torch_reference():
    """The graph-replayed column of a host-syncing implementation reads "not capturable (host sync)",
    with the check still "ok"; a real capture error stays visible in the check column."""
    bench = _bench_kernels_module()
    base = {"kernel": "semantic_mask", "case": "c", "ms": 1.0, "gbps": 1.0, "ok": True, "error": None,
            "ms_graph": None, "gbps_graph": None, "bytes": 1, "fits_l2": False}
    rows = [{**base, "impl": "torch eager", "graph_error": None, "graph_note": "not capturable (host sync)"},
            {**base, "impl": "triton", "graph_error": "RuntimeError: boom", "graph_note": None}]
    bench.add_speedups(rows, None)
    eager, triton_row = bench.markdown(rows, True).splitlines()[2:]
    assert "| not capturable (host sync) |" in eager and eager.endswith("| ok |") and "Error" not in eager
    assert triton_row.endswith("| ok (graph: RuntimeError: boom) |")


@pytest.mark.parametrize("radix_bits", [2, 4, 8])
@pytest.mark.parametrize("inverted", [False, True])
def test_gpu_launch_configs_in_interpreter(interp, gpu_tiles, radix_bits, inverted):
    """GPU tiles, several videos per program, and radix widths; max_seqlen unknown -> 1024 chunks."""
    from lvmae_fast.kernels import _triton as KT
    x, cu = packed([3, 1, 60, 1030, 7, 250], d=260, seed=1)  # d=260 > 256: loops over dim chunks
    k = num_masked(cu, 0.5)
    want = semantic_mask_torch(x, cu, 0.5, inverted=inverted)
    for max_seqlen in (None, 1030):
        got = KT.semantic_mask(x, cu, k, inverted, max_seqlen=max_seqlen, radix_bits=radix_bits)
        assert torch.equal(got, want)
    # short videos only: 16 per program on GPU
    x, cu = packed([2, 9, 5, 16, 1, 3] * 6, d=8, seed=2)
    check_mask(x, cu, 0.5, inverted)


@pytest.mark.parametrize("inverted", [False, True])
def test_ties_equal_embeddings(interp, sim_kernel, select_impl, inverted):
    """All-equal embeddings: every similarity ties (after the first row's 0.0), broken by row."""
    L = 9
    x = torch.randn(1, 16).repeat(L, 1)
    cu = cu_seqlens_from_lengths([L])
    m = check_mask(x, cu, 0.5, inverted)
    keep = max(1, int(L * 0.5))
    want = torch.zeros(L, dtype=torch.bool)
    # paper: first row (0.0) < cos(a, a) ~ 1, the k = L - keep lowest masked -> rows 0..k-1;
    # inverted (the reference): the keep lowest kept -> rows 0..keep-1, the rest masked
    if inverted:
        want[keep:] = True
    else:
        want[:L - keep] = True
    assert torch.equal(m, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 100, 768])
def test_exact_copies_of_the_previous_row_score_one_and_tie(interp, sim_kernel, dtype, d):
    """Runs of exact copies (the windows of a static scene): |a| |b| taken as the product of two roots is
    1 ulp off for about half of all norms, so copies scored 1 - 6e-8, 1.0 or 1 + 1.2e-7 by rounding, and
    Triton and torch kept different copies. Each copy now scores exactly 1.0 in both, the copies of
    different rows tie, and the lower-row rule decides, as a naive ranking by (score, row) does."""
    g = torch.Generator().manual_seed(d)
    run_lengths = [5, 3, 6, 4, 7, 5]
    x = torch.cat([torch.randn(1, d, generator=g).repeat(n, 1) for n in run_lengths]).to(dtype)
    L = len(x)
    cu = cu_seqlens_from_lengths([L])
    starts = torch.zeros(L, dtype=torch.bool)
    starts[torch.tensor([0, *torch.tensor(run_lengths).cumsum(0)[:-1].tolist()])] = True
    sim = adjacent_cosine(x, cu)
    assert (sim[~starts] == 1.0).all(), sim[~starts].tolist()
    naive = torch.where(starts, F.cosine_similarity(x.double(), x.double().roll(1, 0), dim=-1), 1.0)
    naive[0] = 0.0
    for inverted in (False, True):
        for ratio in (0.25, 0.5, 0.9):
            keep = max(1, int(L * (1 - ratio)))
            order = sorted(range(L), key=lambda i: (float(naive[i]), i))
            want = torch.zeros(L, dtype=torch.bool)
            if inverted:  # the reference keeps the `keep` lowest, ties from the lower row
                want[order[keep:]] = True
            else:
                want[order[:L - keep]] = True
            assert torch.equal(semantic_mask_torch(x, cu, ratio, inverted=inverted), want), (inverted, ratio)
            assert torch.equal(K.semantic_mask(x, cu, ratio, inverted=inverted), want), (inverted, ratio)


@pytest.mark.parametrize("inverted", [False, True])
def test_ties_alternating_negative_similarity(interp, sim_kernel, select_impl, inverted):
    """A, B, A, B, ...: identical negative similarities (cos is symmetric bit-for-bit)."""
    a = torch.randn(16)
    x = torch.stack([a, -a + 0.1 * torch.randn(16)] * 5)
    cu = cu_seqlens_from_lengths([4, 6])
    check_mask(x, cu, 0.5, inverted)


@pytest.mark.parametrize("inverted", [False, True])
def test_zero_vectors(interp, sim_kernel, select_impl, inverted):
    """Zero rows have similarity 0 (no NaN) and tie with each video's first row, -0.0 included."""
    x, cu = packed([6, 10, 1, 5], d=8)
    x[[0, 2, 3, 8, 9, 12, 20]] = 0.0
    x[13] = -x[13].abs()  # negative partner of a zero row: the dot product is -0.0 in IEEE
    assert torch.isfinite(adjacent_cosine(x, cu)).all()
    for ratio in (0.3, 0.5, 0.8):
        check_mask(x, cu, ratio, inverted)


def test_keep_at_least_one_and_length_one(interp, sim_kernel, select_impl):
    x, cu = packed([1, 1, 2, 3, 1, 40])
    for ratio in (0.5, 0.9, 0.999999):
        m = check_mask(x, cu, ratio, False)
        visible = torch.bincount(torch.repeat_interleave(torch.arange(6), cu.diff().long())[~m], minlength=6)
        assert (visible >= 1).all()
    assert not m[cu[[0, 1, 4]].long()].any()  # L = 1 videos keep their only row


def test_many_videos_one_batch(interp, select_impl):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 9, (4096,), generator=g).tolist()
    x, cu = packed(lengths, d=4, seed=3)
    check_mask(x, cu, 0.5, False)
    check_mask(x, cu, 0.75, True)


def test_single_video_and_32768_segments(interp, select_impl):
    x, cu = packed([7], d=8)
    check_mask(x, cu, 0.5, False)
    x, cu = packed([1, 3, 32768], d=4, seed=4)  # 32 chunks of 1024 in one program
    check_mask(x, cu, 0.5, False)


def test_empty_videos_and_batch(interp, sim_kernel, select_impl):
    x, cu = packed([3, 5], d=8)
    cu0 = torch.tensor([0, 3, 3, 8], dtype=torch.int32)  # a zero-length video in the middle
    check_mask(x, cu0, 0.5, False)
    e = K.semantic_mask(torch.zeros(0, 8), torch.zeros(1, dtype=torch.int32), 0.5)
    assert e.shape == (0,) and e.dtype == torch.bool


# The histogram selection kernel (SELECT_IMPL "hist", the default since its H200 timing): beyond the tests
# above that run both kernels through semantic_mask, the paths only it has (videos kept in registers or
# streamed in chunks, chosen per program; a max_seqlen below the longest video; digit widths that do not
# divide 32) and the whole int32 key range, both with the interpreter's tiles and the GPU's.
def reference_lowest(keys, cu, k):
    """Per video the k lowest int32 keys (first row's key 0), ties to the lower row: torch's stable sort."""
    out = torch.zeros(keys.shape[0], dtype=torch.bool)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        if e > s and int(k[b]) > 0:
            kk = keys[s:e].long()
            kk[0] = 0
            out[s + torch.sort(kk, stable=True).indices[: int(k[b])]] = True
    return out


def raw_keys(T, seed=0):
    """int32 keys, half anywhere in int32, half at the ends of int32 and of the 8- and 5-bit digits'
    ranges (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -2 ** 31, 2 ** 31 - 1
    anywhere = torch.randint(lo, hi, (T,), generator=g, dtype=torch.int64)
    edges = torch.tensor([lo, lo + 1, -(1 << 27), -(1 << 24), -1, 0, 1, (1 << 24) - 1, 1 << 24, hi - 1, hi])
    at_edges = edges[torch.randint(0, edges.numel(), (T,), generator=g)]
    return torch.where(torch.rand(T, generator=g) < 0.5, anywhere, at_edges).to(torch.int32)


@pytest.mark.parametrize("gpu", [False, True])
def test_hist_selection_on_raw_keys(interp, request, gpu):
    """Keys over all of int32 (both ends, negative and positive, digit-range edges): the k lowest per
    video exactly, for digit widths that divide 32 and that do not (1, 3, 5, 8), max_seqlen exact, unknown
    and too small (the kernel then streams what does not fit); equal to the radix kernel too."""
    from lvmae_fast.kernels import _triton as KT
    if gpu:
        request.getfixturevalue("gpu_tiles")
    lengths = [1, 2, 0, 5, 37, 300, 1500, 130]
    cu = cu_seqlens_from_lengths(lengths)
    keys = raw_keys(sum(lengths), seed=7)
    for ratio in (0.3, 0.999):
        k = num_masked(cu, ratio)
        want = reference_lowest(keys, cu, k)
        assert torch.equal(KT.select_lowest(keys, cu, k, max(lengths), impl="radix"), want)
        for max_seqlen, bits in ((1500, None), (None, 3), (40, None), (1500, 8), (1500, 1)):
            got = KT.select_lowest(keys, cu, k, max_seqlen, bits, impl="hist")
            assert torch.equal(got, want), (ratio, max_seqlen, bits, int((got != want).sum()))


def test_selection_refuses_an_unknown_impl_and_too_wide_hist_digits(interp):
    """A misspelt selection kernel or a digit width the histogram cannot hold is named, not run."""
    from lvmae_fast.kernels import _triton as KT
    cu = cu_seqlens_from_lengths([3, 4])
    keys, k = raw_keys(7, seed=1), num_masked(cu, 0.5)
    with pytest.raises(ValueError, match=r"select_impl must be one of \('radix', 'hist'\), got 'sort'"):
        KT.select_lowest(keys, cu, k, 4, impl="sort")
    for bits in (0, 9):
        with pytest.raises(ValueError, match=f"histogram selection must be in 1..8, got {bits}"):
            KT.select_lowest(keys, cu, k, 4, bits, impl="hist")


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("inverted", [False, True])
def test_hist_selection_matches_torch(interp, request, gpu, inverted):
    """semantic_mask with the histogram kernel against the torch reference: integer rows (exact ties) and
    zero rows, a video longer than the register tile (9000 > HIST_MAX_BLOCK: chunked) beside short ones,
    ratio 0 to near 1, max_seqlen given and not."""
    from lvmae_fast.kernels import _triton as KT
    if gpu:
        request.getfixturevalue("gpu_tiles")
    x, cu = packed([1, 2, 5, 37, 300, 1500, 9000], d=8, seed=8)
    x[[3, 4, 9, 400]] = 0.0
    keys = KT.adjacent_keys(x, False)
    for ratio in (0.0, 0.5, 0.999):
        want = semantic_mask_torch(x, cu, ratio, inverted=inverted)
        k = num_masked(cu, ratio)
        for max_seqlen in (9000, None):
            if inverted:  # the reference's rule: the lowest L - k kept, the rest masked
                got = ~KT.select_lowest(keys, cu, (cu[1:] - cu[:-1] - k).to(torch.int32), max_seqlen, impl="hist")
            else:
                got = KT.select_lowest(keys, cu, k, max_seqlen, impl="hist")
            assert torch.equal(got, want), (ratio, max_seqlen)
    assert torch.equal(KT.semantic_mask(x, cu, k, inverted, max_seqlen=9000, select_impl="hist"), want)


@pytest.mark.parametrize("gpu", [False, True])
def test_hist_selection_one_long_video_and_4096_short_ones(interp, request, gpu):
    """The launch extremes: one 32768-row video (chunks in one program; max_seqlen known and not) and
    4096 videos of 1-8 rows (many per program; without max_seqlen each would get its own program, which
    the interpreter takes minutes over)."""
    from lvmae_fast.kernels import _triton as KT
    if gpu:
        request.getfixturevalue("gpu_tiles")
    g = torch.Generator().manual_seed(3)
    for lengths, tiles in (([1, 3, 32768], (32768, None)), (torch.randint(1, 9, (4096,), generator=g).tolist(), (8,))):
        x, cu = packed(lengths, d=4, seed=4)
        keys = KT.adjacent_keys(x, False)
        k = num_masked(cu, 0.5)
        want = semantic_mask_torch(x, cu, 0.5)
        for max_seqlen in tiles:
            assert torch.equal(KT.select_lowest(keys, cu, k, max_seqlen, impl="hist"), want)


def test_select_impl_choices(interp):
    from lvmae_fast.kernels import _triton as KT
    assert KT.SELECT_IMPL == "hist"  # the default since its H200 timing (radix stays selectable)
    # GPU tiles: one video up to HIST_MAX_BLOCK in registers at ~16 keys a thread; short ones share a tile
    assert KT.select_hist_tiles(8192, 256, gpu=True) == (1, 8192, KT.GPU_HIST_RADIX_BITS, 16)
    assert KT.select_hist_tiles(32768, 1, gpu=True) == (1, KT.HIST_MAX_BLOCK, KT.GPU_HIST_RADIX_BITS, 16)
    assert KT.select_hist_tiles(None, 256, gpu=True) == (1, 1024, KT.GPU_HIST_RADIX_BITS, 8)
    assert KT.select_hist_tiles(8, 4096, gpu=True) == (16, 32, 4, 4)
    assert KT.select_hist_tiles(256, 1024, gpu=True) == (2, 256, 4, 4)
    assert KT.select_hist_tiles(3, 1, gpu=True) == (1, 32, KT.GPU_HIST_RADIX_BITS, 1)  # a key a thread
    x, cu = packed([3, 5], d=8)
    keys, k = KT.adjacent_keys(x, False), num_masked(cu, 0.5)
    with pytest.raises(ValueError, match="select_impl"):
        KT.select_lowest(keys, cu, k, impl="sort")
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1..8"):
            KT.select_lowest(keys, cu, k, radix_bits=bits, impl="hist")
    with pytest.raises(ValueError, match="divide 32"):
        KT.select_lowest(keys, cu, k, radix_bits=5, impl="radix")


def test_semantic_mask_bad_input():
    x, cu = packed([3, 5], d=8)
    with pytest.raises(ValueError, match=r"\[T, d\]"):
        K.semantic_mask(x[:, 0], cu, 0.5)
    with pytest.raises(ValueError, match="int32"):
        K.semantic_mask(x, cu.to(torch.int16), 0.5)
    with pytest.raises(ValueError, match="T=8"):
        K.semantic_mask(x, torch.tensor([0, 3, 7], dtype=torch.int32), 0.5)
    with pytest.raises(ValueError, match="non-decreasing"):
        K.semantic_mask(x, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 0.5)
    for bad in (1.0, -0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="mask_ratio"):
            K.semantic_mask(x, cu, bad)


def test_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the torch path (same results)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, cu = packed([4, 9, 1], d=8)
    check_mask(x, cu, 0.5, True)
    p, t = torch.randn(5, 8, requires_grad=True), torch.randn(14, 8)
    rows = torch.tensor([0, 3, 7, 8, 13])
    torch.testing.assert_close(K.masked_mse_rows(p, t, rows), (p - t[rows]).pow(2).mean())


# ----------------------------------------------------------------------------------------------------
# dispatch switch
# ----------------------------------------------------------------------------------------------------
def test_use_triton(monkeypatch):
    cpu = torch.zeros(1)
    assert K.use_triton("torch", cpu) is False
    assert K.use_triton("auto", cpu) is False
    with pytest.raises(ValueError, match="switch"):
        K.use_triton("cuda", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if K.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            K.use_triton("triton", cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if K.triton_mode() == "interpret":
            assert K.use_triton("triton", cpu) is True
        else:  # set too late for this process
            with pytest.raises(RuntimeError, match="before the first import"):
                K.use_triton("triton", cpu)
    monkeypatch.setattr(K, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install lvmae_fast\[triton\]"):
        K.use_triton("triton", cpu)
    assert K.use_triton("auto", cpu) is False


# ----------------------------------------------------------------------------------------------------
# fused masked losses
# ----------------------------------------------------------------------------------------------------
def ref_row_loss(p, t, loss):
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-6)  # the reference's nn.CosineSimilarity eps
    return (p - t).pow(2).mean(-1)


def assert_within_2x(got, ref64, same_dtype, rel_atol=1e-6):
    """flash-attention rule: |got - ref| <= 2 |same-dtype torch - ref| + atol (scaled to |ref|)."""
    err = (got.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    atol = rel_atol * max(ref64.abs().max().item(), 1e-30)
    assert err <= 2 * base + atol, f"kernel error {err:.3g} > 2 x torch error {base:.3g} + {atol:.3g}"


def loss_and_grad(fn, p):
    p = p.detach().clone().requires_grad_(True)
    loss = fn(p)
    (g,) = torch.autograd.grad(loss, p)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_masked_mse_rows_fwd_bwd(interp, dtype, loss, d=48):
    g = torch.Generator().manual_seed(5)
    target = torch.randn(200, d, generator=g).to(dtype)
    rows = torch.randperm(200, generator=g)[:90]
    pred = (target[rows].float() + 0.5 * torch.randn(90, d, generator=g)).to(dtype)
    if dtype == torch.float32:
        # Zero prediction: the cosine clamp path, d(1 - cos)/dp ~ 1/eps. fp32 only: beyond fp16's
        # range, and the interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even),
        # which on such a large single value exceeds the 2x budget.
        pred[3] = 0.0
    got, got_g = loss_and_grad(lambda p: K.masked_mse_rows(p, target, rows, loss=loss), pred)
    ref, ref_g = loss_and_grad(lambda p: ref_row_loss(p, target.double()[rows], loss).mean(), pred.double())
    same, same_g = loss_and_grad(lambda p: ref_row_loss(p, target[rows], loss).mean(), pred)
    assert got.dtype == torch.float32 and got_g.dtype == dtype and torch.isfinite(got_g).all()
    assert_within_2x(got, ref, same)
    assert_within_2x(got_g, ref_g, same_g, rel_atol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_masked_loss_gpu_tiles_dim_loop(interp, gpu_tiles, loss):
    """GPU tile sizes in the interpreter: d=600 loops over three 256-wide chunks; rows not a multiple of 8."""
    g = torch.Generator().manual_seed(6)
    target = torch.randn(40, 600, generator=g)
    rows = torch.randint(0, 40, (21,), generator=g)  # repeated target rows are fine
    pred = torch.randn(21, 600, generator=g)
    got, got_g = loss_and_grad(lambda p: K.masked_mse_rows(p, target, rows, loss=loss), pred)
    ref, ref_g = loss_and_grad(lambda p: ref_row_loss(p, target.double()[rows], loss).mean(), pred.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g.double(), ref_g, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mse_full_rows(interp, dtype):
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(120, 40, generator=g).to(dtype)
    target = torch.randn(120, 40, generator=g).to(dtype)
    masked = torch.rand(120, generator=g) < 0.5
    got, got_g = loss_and_grad(lambda p: K.masked_mse(p, target, masked), pred)
    ref, ref_g = loss_and_grad(lambda p: (p - target.double()).pow(2).mean(-1)[masked].mean(), pred.double())
    same, same_g = loss_and_grad(lambda p: (p - target).pow(2).mean(-1)[masked].mean(), pred)
    assert_within_2x(got, ref, same)
    assert_within_2x(got_g, ref_g, same_g, rel_atol=1e-5)
    assert (got_g[~masked] == 0).all()
    # backward scales with grad_out (read on the device, no host sync)
    p = pred.detach().clone().requires_grad_(True)
    (K.masked_mse(p, target, masked) * 3.0).backward()
    assert_within_2x(p.grad, 3.0 * ref_g, same_g * 3.0, rel_atol=1e-5)


def test_masked_losses_empty(interp):
    pred = torch.randn(10, 8, requires_grad=True)
    loss = K.masked_mse(pred, torch.randn(10, 8), torch.zeros(10, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (pred.grad == 0).all()
    none = torch.zeros(0, 8, requires_grad=True)
    loss = K.masked_mse_rows(none, torch.randn(10, 8), torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and none.grad.shape == (0, 8)


def test_masked_loss_bad_input():
    p, t = torch.randn(4, 8), torch.randn(10, 8)
    rows = torch.arange(4)
    with pytest.raises(ValueError, match="loss"):
        K.masked_mse_rows(p, t, rows, loss="l1")
    with pytest.raises(ValueError, match="dim"):
        K.masked_mse_rows(p, torch.randn(10, 9), rows)
    with pytest.raises(ValueError, match="length 4"):
        K.masked_mse_rows(p, t, torch.arange(3))
    with pytest.raises(ValueError, match="int64"):
        K.masked_mse_rows(p, t, rows.float())
    with pytest.raises(ValueError, match="out of range"):
        K.masked_mse_rows(p, t, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        K.masked_mse_rows(p[0], t, rows)
    with pytest.raises(ValueError, match="must match"):
        K.masked_mse(p, t, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        K.masked_mse(t, t, torch.zeros(10))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_model_loss_refuses_bad_input_alike_on_both_paths(interp, kernels):
    """masked_reconstruction_loss's torch path (CPU's default) raised torch's IndexError/RuntimeError
    where the Triton path names the problem; norm_targets over 1-dim embeddings was a NaN loss."""
    from lvmae_fast.loss import masked_reconstruction_loss

    p, t = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"rows index out of range \[0, 10\)"):
        masked_reconstruction_loss(p, t, torch.tensor([0, 1, 2, 10]), kernels=kernels)
    with pytest.raises(ValueError, match="pred dim 4 != target dim 8"):
        masked_reconstruction_loss(p[:, :4], t, torch.arange(4), kernels=kernels)
    with pytest.raises(ValueError, match="rows must be a 1-D index tensor of length 4"):
        masked_reconstruction_loss(p, t, torch.arange(3), kernels=kernels)
    with pytest.raises(ValueError, match="d=0 columns"):
        masked_reconstruction_loss(p[:, :0], t[:, :0], torch.arange(4), kernels=kernels)
    with pytest.raises(ValueError, match="norm_targets needs embeddings of 2 or more dims, got 1"):
        masked_reconstruction_loss(p[:, :1], t[:, :1], torch.arange(4), norm_targets=True, kernels=kernels)
    # two dims are enough: the loss against the standardised targets, by hand
    rows = torch.tensor([1, 3, 5, 7])
    got = masked_reconstruction_loss(p[:, :2], t[:, :2], rows, norm_targets=True, kernels=kernels)
    x = t[rows, :2].double()
    z = (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(got.double(), ((p[:, :2].double() - z) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_norm_targets_config_needs_two_dims():
    from lvmae_fast.model import LVMAEConfig

    with pytest.raises(ValueError, match=r"config: norm_targets needs in_dim >= 2"):
        LVMAEConfig.from_preset("tiny", in_dim=1, norm_targets=True)
    assert LVMAEConfig.from_preset("tiny", in_dim=1).in_dim == 1   # without it one dim is fine


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_semantic_masking_refuses_embeddings_without_columns(interp, kernels):
    """With no columns every cosine is 0 and the mask was the tie-break's row order, silently."""
    x, cu = torch.zeros(6, 0), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="d=0 columns"):
        K.semantic_mask(x, cu, 0.5) if kernels == "triton" else semantic_mask_torch(x, cu, 0.5)


# ----------------------------------------------------------------------------------------------------
# the compiled (non-interpreted) kernels: front end + PTX for sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lvmae_fast.kernels import _triton as KT
    assert not KT.INTERPRETED
    pred = {"pred_ptr": "*bf16", "tgt_ptr": "*fp32", "rows_ptr": "*i64", "mask_ptr": "*u8"}
    flags = {"HAS_ROWS": True, "HAS_MASK": True, "COSINE": True, "EPS": 1e-8, "BLOCK_M": 8, "BLOCK_D": 256}
    cases = [
        (KT.adjacent_key_kernel, {"x_ptr": "*fp16", "key_ptr": "*i32", "T": "i32", "D": "i32", "stride_x": "i32"},
         {"INVERTED": True, "EPS": 1e-8, "BLOCK_T": 8, "BLOCK_D": 256}, 4),
        (KT.adjacent_key_stream_kernel, {"x_ptr": "*bf16", "key_ptr": "*i32", "T": "i32", "D": "i32",
         "stride_x": "i32"}, {"INVERTED": False, "EPS": 1e-8, "ROWS": 32, "BLOCK_D": 1024}, 4),
        (KT.select_lowest_kernel, {"key_ptr": "*i32", "cu_ptr": "*i32", "k_ptr": "*i32", "out_ptr": "*u8",
         "B": "i32"}, {"VIDS": 4, "BLOCK": 256, "RADIX_BITS": 4}, 8),
        (KT.select_hist_kernel, {"key_ptr": "*i32", "cu_ptr": "*i32", "k_ptr": "*i32", "out_ptr": "*u8",
         "B": "i32"}, {"VIDS": 1, "BLOCK": 8192, "RADIX_BITS": 5}, 16),
        (KT.select_hist_kernel, {"key_ptr": "*i32", "cu_ptr": "*i32", "k_ptr": "*i32", "out_ptr": "*u8",
         "B": "i32"}, {"VIDS": 16, "BLOCK": 32, "RADIX_BITS": 4}, 4),
        (KT.loss_fwd_kernel, {**pred, "part_ptr": "*fp32", "N": "i32", "D": "i32", "stride_p": "i32",
         "stride_t": "i32"}, flags, 4),
        (KT.loss_bwd_kernel, {**pred, "scale_ptr": "*fp32", "grad_ptr": "*bf16", "N": "i32", "D": "i32",
         "stride_p": "i32", "stride_t": "i32", "stride_g": "i32"}, flags, 4),
    ]
    import os, re, subprocess, tempfile
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for fn, sig, const, warps in cases:
        src = ASTSource(fn, {**sig, **{k: "constexpr" for k in const}},
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm
        assert "ptx" in asm, fn
        # Registers and spills at sm_90 from the bundled ptxas, where one accepts this PTX version.
        for ptxas in ("ptxas-blackwell", "ptxas"):
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(asm["ptx"]); f.flush()
                try:
                    r = subprocess.run([os.path.join(bins, ptxas), "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                                       capture_output=True, text=True, timeout=120)
                except OSError:
                    continue
            regs = re.search(r"Used (\\d+) registers", r.stderr)
            spills = re.search(r"(\\d+) bytes spill stores", r.stderr)
            if r.returncode == 0 and regs and spills:
                print(f"REGS {fn.__name__} {regs.group(1)} {spills.group(1)}")
                break
    print("COMPILED_OK")
""")

# Register budgets at sm_90 (4 warps) of the similarity kernels, where semantic_mask is bandwidth-bound:
# more registers = fewer resident warps to hide memory latency. Measured with triton 3.9's ptxas: 72 and
# 32 (an in-kernel overflow branch once took the tiled kernel to 120).
SIM_REGISTER_BUDGET = {"_adjacent_key_body": 80, "_adjacent_key_stream_body": 40}


@needs_triton
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (types, constexpr use): compile every kernel
    for an H100 target offline, without a GPU, in a fresh process (this one may be in interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "nvcc" in r.stderr.lower()):
        pytest.skip(f"CUDA toolchain unavailable for offline compilation: {r.stderr[-500:]}")
    assert r.returncode == 0 and "COMPILED_OK" in r.stdout, r.stderr[-3000:]
    launches = [(name, int(regs), int(spills)) for name, regs, spills in
                (line.split()[1:] for line in r.stdout.splitlines() if line.startswith("REGS "))]
    usage = {name: (regs, spills) for name, regs, spills in launches}
    for name, budget in SIM_REGISTER_BUDGET.items():
        if name in usage:  # absent where no bundled ptxas reads this triton's PTX
            assert usage[name][0] <= budget and usage[name][1] == 0, (name, usage[name])
    # The histogram selection keeps a whole video in registers: at 16 warps ptxas caps a thread at 128
    # registers, so a tile that outgrows them spills instead of failing.
    assert all(spills == 0 for name, _, spills in launches if name == "_select_hist_body"), launches


# ----------------------------------------------------------------------------------------------------
# GPU (compiled kernels, paper shapes)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("lengths", [[8192] * 4, list(range(1, 257)) * 4, [1, 32768, 5]])
@compiled_gpu
def test_gpu_semantic_mask(sim_kernel, dtype, inverted, lengths):
    x, cu = packed(lengths, d=1024, dtype=dtype, device="cuda")
    for ratio in (0.0, 0.5, 0.9):
        check_mask(x, cu, ratio, inverted)
        check_mask(x, cu, ratio, inverted, validate=False)  # no max_seqlen: 1024-row chunks path
    # exact ties on the GPU too
    tie = x[:1].repeat(300, 1)
    check_mask(tie, cu_seqlens_from_lengths([100, 200], "cuda"), 0.5, inverted)


@pytest.mark.parametrize("lengths", [[8192] * 256, list(range(1, 257)) * 4, [1, 32768, 5], [8] * 4096, [2, 9, 5]])
@compiled_gpu
def test_gpu_hist_selection(monkeypatch, lengths):
    """Compiled histogram selection (the default) = the radix kernel's mask bit for bit at paper shapes,
    on int32 keys over the whole range: videos in registers (8192), many a program, in chunks (32768), a
    tile smaller than a warp, max_seqlen known and not; then semantic_mask with it against torch on real
    similarities."""
    from lvmae_fast.kernels import _triton as KT
    cu = cu_seqlens_from_lengths(lengths, "cuda")
    keys = raw_keys(sum(lengths), seed=9).cuda()
    for ratio in (0.0, 0.5, 0.9):
        k = num_masked(cu, ratio)
        want = KT.select_lowest(keys, cu, k, max(lengths), impl="radix")
        for max_seqlen in (max(lengths), None):
            assert torch.equal(KT.select_lowest(keys, cu, k, max_seqlen, impl="hist"), want), (ratio, max_seqlen)
    monkeypatch.setattr(KT, "SELECT_IMPL", "hist")
    x, cu = packed(lengths[:64], d=1024, dtype=torch.bfloat16, device="cuda")
    check_mask(x, cu, 0.5, False)
    check_mask(x, cu, 0.5, True, validate=False)


@compiled_gpu
def test_gpu_similarity_launch_configs():
    """Compiled: a few launch configs (warps, stages, BLOCK_D below/at d, the stream kernel's ROWS) give
    the default's keys bit for bit at d=1024 on integer rows, and semantic_mask the torch mask."""
    from lvmae_fast.kernels import _triton as KT
    x, cu = packed([1, 300, 8192, 2, 57], d=1024, dtype=torch.bfloat16, device="cuda")
    want = KT.adjacent_keys(x, False)
    for cfg in [(4, 128, 2, 1), (16, 512, 8, 2), (32, 256, 4, 4), (8, 1024, 4, 3),
                KT.SimConfig(16, 1024, 8, 2, "stream")]:
        assert torch.equal(KT.adjacent_keys(x, False, config=cfg), want), cfg
        check_mask(x, cu, 0.5, False, sim_config=cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
@compiled_gpu
def test_gpu_masked_losses(dtype, loss):
    g = torch.Generator().manual_seed(8)
    T, d = 16 * 1024, 1024
    target = torch.randn(T, d, generator=g).to(dtype).cuda()
    rows = torch.randperm(T, generator=g)[: T // 2].cuda()
    pred = (target[rows].float() + 0.5 * torch.randn(T // 2, d, generator=g).cuda()).to(dtype)
    got, got_g = loss_and_grad(lambda p: K.masked_mse_rows(p, target, rows, loss=loss), pred)
    ref, ref_g = loss_and_grad(lambda p: ref_row_loss(p, target.double()[rows], loss).mean(), pred.double())
    same, same_g = loss_and_grad(lambda p: ref_row_loss(p, target[rows], loss).mean(), pred)
    assert_within_2x(got, ref, same)
    assert_within_2x(got_g, ref_g, same_g, rel_atol=1e-5)
    masked = torch.zeros(T, dtype=torch.bool, device="cuda")
    masked[rows] = True
    full = torch.zeros_like(target)
    full[rows] = pred
    got, got_g = loss_and_grad(lambda p: K.masked_mse(p, target, masked), full)
    ref, ref_g = loss_and_grad(lambda p: (p - target.double()).pow(2).mean(-1)[masked].mean(), full.double())
    same, same_g = loss_and_grad(lambda p: (p - target).pow(2).mean(-1)[masked].mean(), full)
    assert_within_2x(got, ref, same)
    assert_within_2x(got_g, ref_g, same_g, rel_atol=1e-5)


@pytest.mark.parametrize("strategy", ["semantic", "semantic_inverted"])
def test_build_masked_batch_through_the_kernel_switch_matches_torch(interp, strategy):
    # The packed-batch builder passes max_seqlen, so the kernel skips its validating host read.
    from lvmae_fast.masking import build_masked_batch
    from lvmae_fast.packing import pack_sequences

    torch.manual_seed(0)
    x, cu, lengths = pack_sequences([torch.randn(n, 16) for n in (1, 5, 40, 3, 300)])
    via_kernel = build_masked_batch(x, cu, lengths, strategy, 0.5, kernels="triton")
    via_torch = build_masked_batch(x, cu, lengths, strategy, 0.5, kernels="torch")
    assert torch.equal(via_kernel.masked, via_torch.masked)
    assert torch.equal(via_kernel.dec_src, via_torch.dec_src)


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_nonfinite_unmasked_rows_are_never_read(request, monkeypatch, path):
    """NaN/Inf in rows the loss does not use (unmasked rows; target rows not listed) leave the loss and
    the gradient finite and equal to a reference built from the used rows only, on both backends."""
    if path == "interpreter":
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(9)
    pred, target = torch.randn(12, 24, generator=g), torch.randn(12, 24, generator=g)
    masked = torch.rand(12, generator=g) < 0.5
    masked[[0, 2]], masked[[1, 3]] = True, False
    pred[1], target[3] = float("inf"), float("nan")
    got, got_g = loss_and_grad(lambda p: K.masked_mse(p, target, masked), pred)
    m = masked.nonzero().flatten()
    ref, ref_g_rows = loss_and_grad(lambda p: (p - target.double()[m]).pow(2).mean(-1).mean(), pred.double()[m])
    same, same_g_rows = loss_and_grad(lambda p: (p - target[m]).pow(2).mean(-1).mean(), pred[m])
    assert torch.isfinite(got) and torch.isfinite(got_g).all()
    assert (got_g[~masked] == 0).all()
    assert_within_2x(got, ref, same)
    assert_within_2x(got_g[m], ref_g_rows, same_g_rows, rel_atol=1e-5)
    # The rows variant (both losses): target rows outside `rows` may be non-finite too.
    rows = torch.tensor([0, 2, 5, 2])
    target[[1, 7]] = torch.tensor([float("nan"), float("inf")])[:, None]
    for loss in ("mse", "cosine"):
        p_rows = pred[[0, 2, 4, 6]]
        got, got_g = loss_and_grad(lambda p: K.masked_mse_rows(p, target, rows, loss=loss), p_rows)
        ref, ref_g = loss_and_grad(lambda p: ref_row_loss(p, target.double()[rows], loss).mean(), p_rows.double())
        same, same_g = loss_and_grad(lambda p: ref_row_loss(p, target[rows], loss).mean(), p_rows)
        assert torch.isfinite(got) and torch.isfinite(got_g).all()
        assert_within_2x(got, ref, same)
        assert_within_2x(got_g, ref_g, same_g, rel_atol=1e-5)


def _model_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["random", "semantic"])
@pytest.mark.parametrize("loss, norm_targets", [("mse", False), ("mse", True), ("cosine", False), ("cosine", True)])
def test_model_forward_with_triton_kernels_matches_torch(interp, monkeypatch, strategy, loss, norm_targets):
    """LVMAE.forward with kernels='triton' (semantic mask + fused loss through masked_reconstruction_loss)
    vs kernels='torch': loss and every parameter gradient within the file's rule (error vs an fp64
    reference <= 2x the fp32 torch path's error + tiny atol)."""
    from dataclasses import replace

    from lvmae_fast.masking import build_masked_batch
    from lvmae_fast.model import LVMAE, LVMAEConfig
    from lvmae_fast.packing import pack_sequences

    torch.manual_seed(0)
    cfg = LVMAEConfig.from_preset("tiny", in_dim=16, attn_impl="sdpa", loss=loss, norm_targets=norm_targets,
                                  masking=strategy, kernels="triton")
    model = LVMAE(cfg)
    x, cu, lengths = pack_sequences([F.normalize(torch.randn(n, 16), dim=-1) for n in (1, 5, 40, 3, 30)])
    calls = []

    def spy(name):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    spy("semantic_mask"), spy("masked_mse_rows")
    batch = build_masked_batch(x, cu, lengths, strategy, 0.5, torch.Generator().manual_seed(1), kernels="triton")
    ref_batch = build_masked_batch(x, cu, lengths, strategy, 0.5, torch.Generator().manual_seed(1), kernels="torch")
    assert torch.equal(batch.masked, ref_batch.masked) and batch.masked.any()
    got, got_g = _model_loss_and_grads(model, batch)
    # The kernels really ran: the semantic-mask kernel (semantic only) and the fused loss.
    assert calls == (["semantic_mask"] if strategy == "semantic" else []) + ["masked_mse_rows"]
    model.config.kernels = "torch"
    same, same_g = _model_loss_and_grads(model, batch)
    ref, ref_g = _model_loss_and_grads(model.double(), replace(batch, x=batch.x.double()))
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert_within_2x(got, ref, same)
    for k in ref_g:
        assert torch.isfinite(got_g[k]).all(), k
        assert_within_2x(got_g[k], ref_g[k], same_g[k], rel_atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_semantic_mask_accepts_int64_offsets_and_numpy_ratios_and_refuses_nan(request, path):
    import numpy as np

    if path == "interpreter":
        request.getfixturevalue("interp")
    x, cu = packed([3, 1, 6, 9], kind="randn")
    want = semantic_mask_torch(x, cu, 0.5)
    assert torch.equal(K.semantic_mask(x, cu.long(), np.float32(0.5)), want)
    assert torch.equal(K.semantic_mask(x, cu.long(), 0.5, validate=False), want)
    x[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf values \(rows \[4\]\)"):
        K.semantic_mask(x, cu, 0.5)
    with pytest.raises(ValueError, match="int32 .* or int64"):
        K.semantic_mask(x, cu.float(), 0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: the first pass overflows
@pytest.mark.parametrize("path", ["torch", "tile", "stream"])
def test_semantic_mask_huge_rows_keep_their_cosine(request, monkeypatch, path):
    """Rows of norm ~1e19 and up (fp32, bf16) overflowed the fp32 squared norm: inf/inf = NaN similarities,
    a wrong selection (and the kernel ranked NaN unlike torch). Cosine is scale-invariant: rows scaled by
    powers of two (exact), all of them or some among normal rows, must select exactly as unscaled."""
    if path == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        request.getfixturevalue("interp")
        from lvmae_fast.kernels import _triton as KT
        monkeypatch.setattr(KT, "SIM_KERNEL", path)
    x, cu = packed([3, 17, 40], d=24, kind="randn", seed=11)
    some = (torch.arange(x.shape[0]) % 3 == 0)[:, None]
    for dtype, huge in ((torch.float32, 2.0 ** 70), (torch.bfloat16, 2.0 ** 100)):
        xd = x.to(dtype)
        for inverted in (False, True):
            want = semantic_mask_torch(xd, cu, 0.5, inverted=inverted)
            for scale in (torch.full_like(some, huge, dtype=torch.float32), torch.where(some, huge, 1.0)):
                got = K.semantic_mask((xd.float() * scale).to(dtype), cu, 0.5, inverted=inverted)
                assert torch.equal(got, want), (dtype, inverted)
    # A huge row beside a small one: scaled by a fixed 2^-80 it kept a norm of ~1e-5, and the product of
    # the two norms fell under the clamp, shrinking their cosine (0.97 -> 0.66: row 2 was masked instead).
    x = torch.tensor([[5e-4, 3e-4], [1e19, 1e19], [1.0, 0.0]])
    true_cos = F.cosine_similarity(x[1:].double(), x[:-1].double(), dim=-1)  # 0.970, 0.707
    assert true_cos[0] > true_cos[1]
    assert K.semantic_mask(x, torch.tensor([0, 3], dtype=torch.int32), 1 / 3, inverted=True).tolist() == [False, True, False]


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_masked_losses_give_target_a_gradient_and_support_double_backward(request, monkeypatch, path):
    """A target that requires grad gets torch's gradient (the Triton path returned None silently), and
    create_graph=True works (the Triton path's gradient had no graph: a cryptic error one step later)."""
    if path == "interpreter":
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(12)
    target = torch.randn(30, 16, generator=g)
    rows = torch.tensor([1, 5, 5, 29, 0])  # a repeated row: its target gradient adds up
    masked = torch.rand(30, generator=g) < 0.5
    cases = [("rows mse", lambda p, t: K.masked_mse_rows(p, t, rows), lambda p, t: ref_row_loss(p, t[rows], "mse").mean(),
              torch.randn(5, 16, generator=g)),
             ("rows cosine", lambda p, t: K.masked_mse_rows(p, t, rows, loss="cosine"),
              lambda p, t: ref_row_loss(p, t[rows], "cosine").mean(), torch.randn(5, 16, generator=g)),
             ("mask", lambda p, t: K.masked_mse(p, t, masked), lambda p, t: ref_row_loss(p, t, "mse")[masked].mean(),
              torch.randn(30, 16, generator=g))]
    for name, fn, ref_fn, pred in cases:
        def grads(f, p, t):
            p, t = p.clone().requires_grad_(True), t.clone().requires_grad_(True)
            return torch.autograd.grad(f(p, t), (p, t))
        got, ref, same = grads(fn, pred, target), grads(ref_fn, pred.double(), target.double()), grads(ref_fn, pred, target)
        for a, b, c in zip(got, ref, same):
            assert_within_2x(a, b, c, rel_atol=1e-5)
        # Hessian-vector product through the loss
        v = torch.randn(pred.shape, generator=g)

        def hvp(f):
            p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
            (gp,) = torch.autograd.grad(f(p, t), p, create_graph=True)
            return torch.autograd.grad((gp * v).sum(), (p, t))
        for a, b in zip(hvp(fn), hvp(ref_fn)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_semantic_mask_takes_offset_lists_and_tensor_ratios_losses_refuse_d0(request, monkeypatch, path):
    import numpy as np

    if path == "interpreter":
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, cu = packed([3, 1, 6], kind="randn", seed=13)
    want = semantic_mask_torch(x, cu, 0.5)
    for offsets in (cu.tolist(), tuple(cu.tolist()), cu.numpy(), cu.numpy().astype(np.int64)):
        assert torch.equal(K.semantic_mask(x, offsets, 0.5), want)
    assert torch.equal(K.semantic_mask(x, cu, torch.tensor(0.5)), want)
    with pytest.raises(ValueError, match="mask_ratio"):
        K.semantic_mask(x, cu, torch.tensor(1.0))
    with pytest.raises(ValueError, match="int32"):
        K.semantic_mask(x, [0.0, 4.0, 10.0], 0.5)
    with pytest.raises(ValueError, match="T=10"):
        K.semantic_mask(x, [0, 4, 9], 0.5)
    with pytest.raises(ValueError, match="d=0"):  # was a silent NaN (mean over no dims)
        K.masked_mse(torch.zeros(4, 0), torch.zeros(4, 0), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="d=0"):
        K.masked_mse_rows(torch.zeros(2, 0), torch.zeros(4, 0), torch.tensor([0, 1]))


@pytest.mark.parametrize("path", ["torch", "interpreter"])
def test_a_float32_or_tensor_ratio_keeps_the_count_of_its_double(request, monkeypatch, path):
    """keep_counts took n * (1 - ratio) in the ratio's own type: float32(0.3) gave 10 x 0.7f = 7.0 kept where
    the kernels (in double) keep int(6.99999988) = 6, so the torch and Triton paths masked different counts and
    build_masked_batch(kernels="triton") failed its count check."""
    import numpy as np

    from lvmae_fast.masking import build_masked_batch, make_mask

    if path == "interpreter":
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, cu = packed([10, 7], kind="randn", seed=21)
    for ratio in (np.float32(0.3), torch.tensor(0.3)):
        keep = [max(1, int(n * (1 - float(ratio)))) for n in (10, 7)]  # 6, 4
        assert keep == [6, 4]
        torch_mask = make_mask("semantic", x, cu, ratio, kernels="torch")
        assert [int((~torch_mask[a:b]).sum()) for a, b in ((0, 10), (10, 17))] == keep
        assert torch.equal(K.semantic_mask(x, cu, ratio), torch_mask)
        batch = build_masked_batch(x, cu, [10, 7], "semantic", ratio, kernels="triton" if path == "interpreter" else "torch")
        assert len(batch.visible_rows) == sum(keep) and torch.equal(batch.masked, torch_mask)


def test_cosine_loss_gradient_below_the_norm_clamp_is_torchs(interp):
    """Below |p| = 1e-6 the kernel dropped the norm's own gradient, where torch's cosine_similarity (the
    reference's loss) keeps it: gradients of predictions (and targets) that small differed by a few %."""
    g = torch.Generator().manual_seed(22)
    target = torch.randn(6, 4, generator=g)
    target[4] *= 1e-7
    rows = torch.tensor([1, 4, 2])
    pred = torch.randn(3, 4, generator=g)
    pred[0] *= 1e-7

    def grads(p, t):
        p, t = p.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = K.masked_mse_rows(p, t, rows, loss="cosine") if p.dtype == torch.float32 else \
            ref_row_loss(p, t[rows], "cosine").mean()
        return torch.autograd.grad(loss, (p, t))

    for got, want in zip(grads(pred, target), grads(pred.double(), target.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cosine", [False, True])
def test_bf16_loss_gradients_are_rounded_to_nearest_as_on_a_gpu(interp, cosine):
    # The interpreter's .to(bfloat16) truncates: half the gradient entries came out one bf16 step small.
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(64, 100, generator=g).to(torch.bfloat16).requires_grad_()
    target = torch.randn(64, 100, generator=g).to(torch.bfloat16)
    rows = torch.arange(64)
    got, = torch.autograd.grad(K.masked_mse_rows(pred, target, rows, "cosine" if cosine else "mse"), pred)
    p32 = pred.detach().float().requires_grad_()
    if cosine:
        want_loss = (1 - torch.nn.functional.cosine_similarity(p32, target.float(), dim=-1)).mean()
    else:
        want_loss = ((p32 - target.float()) ** 2).mean(-1).mean()
    want, = torch.autograd.grad(want_loss, p32)
    assert (got == want.to(torch.bfloat16)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_torch_path_adds_a_repeated_target_rows_gradients_in_fp32(monkeypatch, dtype, loss):
    """The torch path gathered a half-precision target before the fp32 loss, so a repeated row's gradients
    were added in fp16/bf16 (each rounded; one alone could overflow to -inf where the kernel path, which
    adds in fp32, gave -36896). Now: the fp32 gradient rounded once, as a float32 target gets it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(5)
    target = (torch.randn(40, 24, generator=g) * 3).to(dtype).requires_grad_()
    pred = torch.randn(200, 24, generator=g).to(dtype)
    rows = torch.randint(0, 40, (200,), generator=g)  # every target row gathered ~5 times
    K.masked_mse_rows(pred, target, rows, loss=loss).backward()
    target32 = target.detach().float().requires_grad_()
    K.masked_mse_rows(pred.float(), target32, rows, loss=loss).backward()
    assert torch.equal(target.grad, target32.grad.to(dtype))
