"""Benchmarks run end to end at CPU size and write the JSON they promise (timings are not asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_kernels import interp  # noqa: F401 - fixture (and triton's interpreter mode without CUDA)

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package), to call its main() or patch what it calls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lvmae_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_pretrain_step_bench_with_cuda_graphs_rows(tmp_path):
    out = tmp_path / "step.json"
    bench("bench/pretrain.py", "--preset", "tiny", "--device", "cpu", "--steps", 2, "--warmup", 1, "--batch-sizes", 4,
          "--long-len", 0, "--cuda-graphs", "--graph-optimizer", "--master-weights", "--overlap-update", "--overlap-chunks", "32,4",
          "--compare-attn", "sdpa,fa4", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["packed", "packed+graphs", "packed+graphs+opt", "packed+graphs+opt+master",
                                         "packed+graphs+opt+overlap/32", "packed+graphs+opt+overlap/4",
                                         "packed+graphs+opt+overlap/4 attn=sdpa", "packed+graphs+opt+overlap/4 attn=fa4",
                                         "padded (reference)"]
    # A backend this machine cannot run is a row saying why, not a lost table.
    fa4 = rows.pop(7)
    assert fa4["status"].startswith("failed: RuntimeError: attn_impl='fa4' needs a CUDA device")
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["speedup"] > 0 for r in rows[:7])
    # Every packed row starts from the same weights and batches (each built its own random model before):
    # the same loss, master weights' rounding aside.
    assert all(abs(r["loss"] - rows[0]["loss"]) < 1e-5 for r in rows[:7] if "master" not in r["impl"]), rows
    assert abs(rows[3]["loss"] - rows[0]["loss"]) < 1e-2 * rows[0]["loss"]


def test_pretrain_bench_profiles_the_last_mode_asked_for(tmp_path, monkeypatch):
    """--profile profiles the last mode asked for, here the overlap row of the last chunk count (it used to
    profile the whole-step row whatever followed, and a file named for the overlap held that)."""
    bench_pretrain = load_bench("pretrain")
    calls = []
    real = bench_pretrain.run_packed

    def spy(config, batches, device, steps, warmup, compile_model=False, profile_path=None, **mode):
        calls.append((profile_path, mode))
        return real(config, batches, device, steps, warmup, compile_model, profile_path, **mode)

    monkeypatch.setattr(bench_pretrain, "run_packed", spy)
    out = tmp_path / "profile.txt"
    assert bench_pretrain.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-sizes",
                                "4,8", "--long-len", "0", "--skip-padded", "--cuda-graphs", "--graph-optimizer",
                                "--master-weights", "--overlap-update", "--overlap-chunks", "8,4",
                                "--profile", str(out)]) == 0
    assert len(calls) == 2 * 6  # plain, graphs, opt, master, overlap/8, overlap/4 at each batch size
    assert [mode for path, mode in calls if path] == [{"cuda_graphs": True, "graph_optimizer": True, "overlap_chunks": 4}]
    assert "Self CPU" in out.read_text()


def test_pretrain_bench_compiles_the_compared_rows_in_the_mode_asked_for(tmp_path, monkeypatch):
    """--compare-compile-modes: the last mode asked for is timed again with its blocks compiled in each
    mode given (the default-mode row first), in the same run."""
    from lvmae_fast.model import LVMAE

    bench_pretrain = load_bench("pretrain")
    compiled = []

    def spy(self, **kwargs):  # records the mode instead of compiling (minutes on a CPU)
        compiled.append(kwargs)
        return self

    monkeypatch.setattr(LVMAE, "compile_blocks", spy)
    out = tmp_path / "modes.json"
    assert bench_pretrain.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-sizes",
                                "4", "--long-len", "0", "--skip-padded", "--compile", "--cuda-graphs",
                                "--compare-compile-modes", "max-autotune-no-cudagraphs", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == [
        "packed+compile", "packed+compile+graphs", "packed+compile+graphs compile=max-autotune-no-cudagraphs"]
    assert compiled == [{}, {}, {"mode": "max-autotune-no-cudagraphs"}]
    assert result["meta"]["compare_compile_modes"] == ["max-autotune-no-cudagraphs"]


def test_pretrain_bench_refuses_bad_flags():
    for args, message in ((["--overlap-update"], "--overlap-update needs --graph-optimizer"),
                          (["--cuda-graphs", "--graph-optimizer", "--overlap-update", "--overlap-chunks", "32,0"],
                           "--overlap-chunks must be positive integers, comma-separated; got '32,0'"),
                          (["--overlap-chunks", "many"], "--overlap-chunks must be positive integers"),
                          (["--compare-attn", "sdpa,xformers"], "--compare-attn: unknown backend(s) ['xformers']"),
                          (["--compile", "--compare-compile-modes", "reduce-overhead"],
                           "--compare-compile-modes: unknown mode(s) ['reduce-overhead']"),
                          (["--compare-compile-modes", "max-autotune-no-cudagraphs"],
                           "--compare-compile-modes needs --compile"),
                          # (below: a traceback after the first row was timed, no JSON; 0 became the width)
                          (["--profile", "/nonexistent/p.txt"], "--profile /nonexistent/p.txt: folder /nonexistent does not"),
                          (["--in-dim", "0"], "--in-dim must be >= 1, got 0"),
                          (["--mode", "data", "--profile", "/nonexistent/p.txt"], "--profile /nonexistent/p.txt: folder")):
        r = subprocess.run([sys.executable, "bench/pretrain.py", "--preset", "tiny", "--device", "cpu", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-500:])


def test_data_bench_receives_its_own_flags(tmp_path):
    """--steps/--warmup after --mode data reach the data benchmark (they used to be swallowed)."""
    out = tmp_path / "data.json"
    bench("bench/pretrain.py", "--mode", "data", "--preset", "tiny", "--device", "cpu", "--videos", 24, "--steps", 3,
          "--warmup", 1, "--num-workers", 0, "--cuda-graphs", "--graph-optimizer", "--json-out", out)
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["cuda_graphs"] is True and result["graph_optimizer"] is True
    assert result["full_loop_samples_per_s"] > 0
    assert result["loader_only_samples_per_s"] > 0
    assert result["graph_captures_timed"] == 0  # every timed shape was prepared before the clock


def test_extract_bench_links_copies(tmp_path):
    out = tmp_path / "extract.json"
    r = bench("bench/extract.py", "--quick", "--device", "cpu", "--videos", 1, "--duration", 6, "--copies", 3,
              "--decode-workers", 8, "--video-dir", tmp_path / "videos", "--json", out)
    result = json.loads(out.read_text())
    assert result["copies"] == 3 and result["end_to_end"]["done"] == 3  # the original and two links
    # Whole-video decode rows run at most one decode per video (the label said 8); end to end, the flag.
    assert "| decode, PyAV CPU, 3 videos at once," in r.stdout and "8 videos at once" not in r.stdout
    assert "| end to end, --decoder pyav --decode-workers 8 (x realtime) |" in r.stdout
    assert result["end_to_end"]["windows"] == 3 * 1  # 6 s at 5 s windows: one full window each (+ 1 s dropped)
    assert result["decode_dali_gpu"].startswith("not measured")
    assert len(list((tmp_path / "videos").iterdir())) == 3


def load_extract_bench():
    return load_bench("extract")


def restore_decode_switches(monkeypatch):
    """bench/extract.py's main() sets decode switches process-wide, as its flags ask: start each test from
    lvmae extract's defaults and restore them after it."""
    from lvmae_fast import extract
    from lvmae_fast.video import decode_pyav

    monkeypatch.setattr(decode_pyav, "SKIP_GOP_TAILS", True)
    monkeypatch.setattr(decode_pyav, "NVDEC_SHARED_CONTEXT", False)
    monkeypatch.setattr(extract, "FRAME_THREADS", None)
    monkeypatch.setattr(extract, "CPU_DECODE_NICE", 0)
    monkeypatch.setattr(extract, "SIDE_STREAMS", False)


def test_extract_bench_decode_flags_reach_the_decoder(tmp_path, monkeypatch, capsys):
    """--gop-tails decode turns GOP-tail skipping off for the run's decodes, --frame-threads sets each
    decode's frame threads, --nvdec-context the NVDEC decodes' CUDA context and --cpu-decode-nice the CPU
    decodes' nice value, --deblocking skip the PyAV decodes' loop filter (the A/Bs a GPU host runs); the defaults are lvmae extract's own."""
    from lvmae_fast import extract
    from lvmae_fast.video import decode_pyav

    extract_bench = load_extract_bench()
    tails_seen, threads_seen, deblock_seen = [], [], []
    real_decoded, real_stream = decode_pyav._decoded, decode_pyav._video_stream

    def spy_decoded(container, stream, keep, tails=None, errors=None, on_software=None):
        tails_seen.append(tails is not None)
        return real_decoded(container, stream, keep, tails, errors, on_software)

    def spy_stream(container, index, threads, deblock=True):
        threads_seen.append(threads)
        deblock_seen.append(deblock)
        return real_stream(container, index, threads, deblock)

    monkeypatch.setattr(decode_pyav, "_decoded", spy_decoded)
    monkeypatch.setattr(decode_pyav, "_video_stream", spy_stream)
    restore_decode_switches(monkeypatch)
    for mode, threads in (("decode", 0), ("skip", 3)):
        tails_seen.clear(), threads_seen.clear(), deblock_seen.clear()
        out = tmp_path / f"{mode}.json"
        assert extract_bench.main(["--quick", "--device", "cpu", "--videos", "1", "--duration", "6", "--video-dir",
                                   str(tmp_path / "videos"), "--only", "end_to_end_pyav", "--gop-tails", mode,
                                   "--frame-threads", str(threads), "--nvdec-context", "shared" if threads else "own",
                                   "--cpu-decode-nice", str(threads), *(["--side-streams"] if threads else []),
                                   "--deblocking", "skip" if threads else "keep", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        # (no NVDEC on a CPU box: the flag is checked to reach the module switch the NVDEC settings read)
        assert decode_pyav.NVDEC_SHARED_CONTEXT == bool(threads) and result["nvdec_context"] == ("shared" if threads else "own")
        assert extract.CPU_DECODE_NICE == result["cpu_decode_nice"] == threads
        assert extract.SIDE_STREAMS == result["side_streams"] == bool(threads)  # (no CUDA here: the switch only)
        expected_threads = threads or extract.pyav_threads()
        assert result["gop_tails"] == mode and result["frame_threads"] == expected_threads
        assert tails_seen and set(tails_seen) == {mode == "skip"}, (mode, tails_seen)
        assert threads_seen and set(threads_seen) == {expected_threads}, (threads, threads_seen)
        assert set(deblock_seen) == {not threads} and result["deblocking"] == ("skip" if threads else "keep")
        # The table says which settings differ from lvmae extract's (two runs' tables looked alike).
        printed = capsys.readouterr().out
        heading = next(line for line in printed.splitlines() if line.startswith("### Ingestion benchmark"))
        want = (["gop_tails decode"] if mode == "decode" else
                ["deblocking skip", "nvdec_context shared", "side_streams 1", "frame_threads 3", "cpu_decode_nice 3"])
        assert all(item in heading for item in want) and ("gop_tails" in heading) == (mode == "decode"), heading
        assert ("and GOP tails skipped" in printed) == (mode == "skip")


def test_extract_bench_variants_time_the_rows_again_under_their_settings(tmp_path, monkeypatch, capsys):
    """--variant: after the run's own rows, each variant's pass times the selected rows again with its
    settings switched on (and its own stores: a pass that resumed the last one's would time nothing);
    the run's settings come back after the passes."""
    from lvmae_fast import extract
    from lvmae_fast.video import decode_pyav

    extract_bench = load_extract_bench()
    restore_decode_switches(monkeypatch)
    calls = []
    real = extract_bench.extract_videos

    def spy(inputs, out, **kw):
        calls.append((Path(out).name, kw["decode_workers"], extract.CPU_DECODE_NICE, extract.SIDE_STREAMS,
                      decode_pyav.SKIP_GOP_TAILS, extract.FRAME_THREADS, kw["skip_deblocking"]))
        return real(inputs, out, **kw)

    monkeypatch.setattr(extract_bench, "extract_videos", spy)
    out = tmp_path / "variants.json"
    assert extract_bench.main(["--quick", "--device", "cpu", "--videos", "1", "--duration", "6", "--video-dir",
                               str(tmp_path / "videos"), "--only", "end_to_end_pyav", "--decode-workers", "2",
                               "--variant", "cpu_decode_nice=3,side_streams=1,decode_workers=1",
                               "--variant", "gop-tails=decode,frame_threads=1,deblocking=skip", "--variant", "base",
                               "--variant", "base", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    first, second = "cpu_decode_nice=3,side_streams=1,decode_workers=1", "gop-tails=decode,frame_threads=1,deblocking=skip"
    assert calls == [("store_warmup", 2, 0, False, True, None, False), ("store_pyav", 2, 0, False, True, None, False),
                     ("store_pyav_variant1", 1, 3, True, True, None, False),
                     ("store_pyav_variant2", 2, 0, False, False, 1, True),
                     ("store_pyav_variant3", 2, 0, False, True, None, False),
                     ("store_pyav_variant4", 2, 0, False, True, None, False)]
    for label in (first, second, "base", "base#2"):   # a repeated variant keeps both rows
        row = result[f"end_to_end_pyav@{label}"]
        assert row["done"] == 1 and row["realtime_factor"] > 0, (label, row)
    assert result["variants"][first] == {"cpu_decode_nice": 3, "side_streams": "1", "decode_workers": 1}
    # decode_pyav_parallel (2 workers) is not selected by --only: no variant row of it either
    assert "decode_pyav_parallel@base" not in result and "variant base: decode_pyav_parallel" not in capsys.readouterr().out
    assert (extract.CPU_DECODE_NICE, extract.SIDE_STREAMS, decode_pyav.SKIP_GOP_TAILS, extract.FRAME_THREADS) == (
        0, False, True, None)


def test_a_variant_with_only_rows_it_does_not_time_is_refused(capsys):
    """--only end_to_end --variant ...: no variant row ran, exit 0, and the JSON listed the variant as run."""
    extract_bench = load_extract_bench()
    with pytest.raises(SystemExit) as exit_info:
        extract_bench.main(["--quick", "--device", "cpu", "--only", "end_to_end,encoder_fp", "--variant",
                            "deblocking=skip"])
    assert exit_info.value.code == 2 and "--only selects none of them" in capsys.readouterr().err


def test_a_decode_workers_variant_times_the_parallel_row_with_its_own_workers_and_videos(tmp_path, monkeypatch):
    """With one decode worker the run has no parallel row, and a decode_workers=3 variant had none to repeat;
    a variant raising the count decoded the run's own 2-per-worker set (2 videos for 3 workers)."""
    extract_bench = load_extract_bench()
    restore_decode_switches(monkeypatch)
    calls, real = [], extract_bench.bench_pyav_decode

    def spy(paths, spec, workers=1, **kw):
        calls.append((len(paths), workers))
        return real(paths, spec, workers, **kw)

    monkeypatch.setattr(extract_bench, "bench_pyav_decode", spy)
    out = tmp_path / "v.json"
    assert extract_bench.main(["--quick", "--device", "cpu", "--videos", "1", "--duration", "5", "--copies", "6",
                               "--video-dir", str(tmp_path / "videos"), "--only", "decode_pyav_parallel",
                               "--decode-workers", "1", "--variant", "decode_workers=3", "--variant", "base",
                               "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode_pyav_parallel"].startswith("not measured")
    row = result["decode_pyav_parallel@decode_workers=3"]
    assert (row["workers"], row["videos"]) == (3, 6) and calls[-1] == (6, 3)
    assert result["decode_pyav_parallel@base"].startswith("not measured (1 decode worker")  # no 1-worker "parallel" row


def test_extract_bench_nvdec_decode_row_counts_the_videos_ffmpeg_decoded_in_software(tmp_path):
    """The NVDEC decode row's rate is NVDEC's only if NVDEC decoded: videos whose NVDEC settings FFmpeg
    did not use (decoded in software, silently) are counted in the row; a CPU row has no such count."""
    from av.codec.hwaccel import HWAccel

    from lvmae_fast import synth
    from lvmae_fast.video.jobs import WindowSpec

    extract_bench = load_extract_bench()
    paths = [synth.write_video(tmp_path / f"v{k}.mp4", duration=2.0, fps=10, codec="h264", seed=k).path
             for k in range(3)]
    spec = WindowSpec(seconds=1.0)
    unused = extract_bench.bench_pyav_decode(paths, spec, 2, hwaccel=lambda: HWAccel("drm", allow_software_fallback=True))
    assert unused["software_fallback_videos"] == 3 and unused["windows_per_s"] > 0
    assert "software_fallback_videos" not in extract_bench.bench_pyav_decode(paths, spec, 2)


def test_extract_bench_decode_rows_count_no_frames_of_failed_videos(tmp_path, monkeypatch):
    """A decode row added every probed video's frames, failed decodes too: NVDEC settings that fail for
    each video timed at 70887 frames/s against the CPU's 4668, with 0 windows and no word of it."""
    from lvmae_fast import synth
    from lvmae_fast.video.jobs import Failed, WindowSpec

    extract_bench = load_extract_bench()
    paths = [synth.write_video(tmp_path / f"v{k}.mp4", duration=2.0, fps=10, codec="h264", seed=k).path
             for k in range(3)]
    real, failing = extract_bench.pyav_events, set()

    def events(job, *args, **kwargs):
        if job.path in failing:
            yield Failed(job, "NVDEC could not open the stream")
            return
        yield from real(job, *args, **kwargs)

    monkeypatch.setattr(extract_bench, "pyav_events", events)
    spec = WindowSpec(seconds=1.0)
    whole = extract_bench.bench_pyav_decode(paths, spec, 2)
    failing.add(str(paths[0]))
    part = extract_bench.bench_pyav_decode(paths, spec, 2)
    assert (whole["failed_videos"], part["failed_videos"]) == (0, 1)
    # 20 frames per video: 60 decoded, then 40 (rates: frames over each row's own seconds)
    assert whole["frames_per_s"] * whole["seconds"] == pytest.approx(60)
    assert part["frames_per_s"] * part["seconds"] == pytest.approx(40)
    failing.update(str(p) for p in paths)
    with pytest.raises(RuntimeError, match="every video's decode failed, e.g. NVDEC could not open the stream"):
        extract_bench.bench_pyav_decode(paths, spec, 2)


def test_extract_bench_refuses_bad_decode_flags():
    for args, message in ((["--frame-threads", "-1"], "--frame-threads must be >= 0, got -1"),
                          (["--gop-tails", "sometimes"], "--gop-tails: invalid choice"),
                          (["--nvdec-context", "borrowed"], "--nvdec-context: invalid choice"),
                          (["--cpu-decode-nice", "-2"], "--cpu-decode-nice must be >= 0, got -2"),
                          (["--variant", "colour=red"], "--variant 'colour=red': unknown setting 'colour'"),
                          (["--variant", "frame_threads=-1"], "frame_threads takes an integer >= 0, got '-1'"),
                          (["--variant", "nvdec_context=borrowed"], "nvdec_context takes own or shared, got 'borrowed'")):
        r = subprocess.run([sys.executable, "bench/extract.py", "--quick", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-500:])


def test_extract_bench_only_runs_the_measurements_asked_for(tmp_path):
    """--only: the rows named run, the others read not measured; an unknown name is a one-line error.
    Every stage() key of the benchmark is one --only accepts."""
    import re

    out = tmp_path / "extract.json"
    bench("bench/extract.py", "--quick", "--device", "cpu", "--videos", 1, "--duration", 6,
          "--video-dir", tmp_path / "videos", "--only", "end_to_end_pyav,encoder_fp", "--json", out)
    result = json.loads(out.read_text())
    assert result["end_to_end_pyav"]["done"] == 1 and result["encoder_fp"]["windows_per_s"] > 0
    # Each measured stage's process CPU time per wall second: positive, at most every core busy.
    for key in ("end_to_end_pyav", "encoder_fp"):
        assert 0 < result[key]["cpu_cores_busy"] <= os.cpu_count() + 0.5, (key, result[key])
    for key in ("end_to_end", "decode_pyav", "decode_pyav_parallel"):
        assert result[key] == "not measured (not in --only)", key
    r = subprocess.run([sys.executable, "bench/extract.py", "--quick", "--only", "end_to_end_pyav,decode_fast"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--only: unknown measurement decode_fast" in r.stderr
    extract_bench = load_extract_bench()
    source = (REPO / "bench" / "extract.py").read_text()
    assert set(re.findall(r'stage\("([a-z_]+)"', source)) == extract_bench.STAGE_KEYS


def test_useful_flops_count_the_linear_layers_torch_runs():
    """matmul_flops (behind the benchmark's useful TFLOP/s) against torch's FlopCounterMode on the
    forward pass: the linear layers (input projection on visible tokens, encoder on visible + CLS,
    decoder on all + CLS, prediction on masked rows) must match exactly; attention products are
    counted separately (FlopCounterMode sees the CPU path's padded blocks, not the real tokens)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lvmae_fast.masking import build_masked_batch
    from lvmae_fast.model import LVMAE, LVMAEConfig, matmul_flops
    from lvmae_fast.packing import pack_sequences

    lengths = [4, 6, 9]
    cfg = LVMAEConfig.from_preset("tiny", in_dim=24, attn_impl="sdpa", kernels="torch")  # in_dim != width
    model = LVMAE(cfg)
    g = torch.Generator().manual_seed(0)
    x, cu, L = pack_sequences([torch.randn(n, 24, generator=g) for n in lengths])
    batch = build_masked_batch(x, cu, L, "random", 0.5, g)
    def linear_flops(run):
        with FlopCounterMode(display=False) as counter:
            run()
        return sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[-1] in ("addmm", "mm"))

    keep = batch.visible_rows.numel()
    expected = matmul_flops(cfg, enc_tokens=keep + len(lengths), dec_tokens=sum(lengths) + len(lengths),
                            seq_sq_enc=0, seq_sq_dec=0, pred_tokens=sum(lengths) - keep, num_videos=len(lengths))
    assert linear_flops(lambda: model(batch)) == expected
    # Over forward + backward, what bench/pretrain.py's useful_flops counts: 3x, less the input projection's
    # input gradient (its input needs none).
    counted = linear_flops(lambda: model(batch).backward())
    assert counted == 3 * expected - 2 * keep * 24 * cfg.embed_dim
    vis = [max(1, int(n * 0.5)) for n in lengths]
    attention = matmul_flops(cfg, enc_tokens=keep + len(lengths), dec_tokens=sum(lengths) + len(lengths),
                             seq_sq_enc=sum((k + 1) ** 2 for k in vis), seq_sq_dec=sum((n + 1) ** 2 for n in lengths),
                             pred_tokens=sum(lengths) - keep, num_videos=len(lengths)) - expected
    assert load_bench("pretrain").useful_flops(cfg, lengths, 0.5) == counted + 3 * attention


def bench_patched(code, *args):
    """Run a benchmark's main() in a subprocess after `code` patched its module (imported as `bench`)."""
    script = f"import sys; sys.path.insert(0, 'bench'); {code}; sys.exit(bench.main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_pretrain_step_json_keeps_the_rows_of_a_cut_run(tmp_path):
    """Each row is saved (atomically) as soon as it is measured: a run cut by a time limit (here: inside
    the padded baseline) keeps its packed row, marked incomplete."""
    out = tmp_path / "step.json"
    r = bench_patched("import pretrain as bench\ndef cut(*a, **k): raise KeyboardInterrupt\nbench.run_padded = cut",
                      "--preset", "tiny", "--device", "cpu", "--steps", 1, "--warmup", 1, "--batch-sizes", 4,
                      "--long-len", 0, "--json", out)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    result = json.loads(out.read_text())
    assert result["meta"]["complete"] is False and result["meta"]["device"]
    assert [row["impl"] for row in result["rows"]] == ["packed"] and result["rows"][0]["status"] == "ok"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_extract_bench_records_a_failed_stage_and_goes_on(tmp_path):
    out = tmp_path / "extract.json"
    r = bench_patched("import extract as bench\ndef boom(*a, **k): raise RuntimeError('decoder exploded')\n"
                      "bench.extract_videos = boom",
                      "--quick", "--device", "cpu", "--videos", 1, "--duration", 6, "--video-dir", tmp_path / "v",
                      "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["end_to_end"] == "not measured (failed: RuntimeError: decoder exploded)"
    assert result["decode_pyav"]["frames_per_s"] > 0 and result["encoder_fp"]["windows_per_s"] > 0
    assert "| end to end, videos decoded by: - (x realtime) | not measured (failed" in r.stdout


def test_extract_bench_does_not_reuse_videos_of_another_duration(tmp_path):
    """--video-dir reuses written videos only when they match the requested ones (it used to time a
    6 s video under an 11 s run's labels)."""
    videos = tmp_path / "videos"
    for duration, windows in ((6, 1), (11, 2)):
        out = tmp_path / f"extract{duration}.json"
        bench("bench/extract.py", "--quick", "--device", "cpu", "--videos", 1, "--duration", duration,
              "--video-dir", videos, "--json", out)
        assert json.loads(out.read_text())["end_to_end"]["windows"] == windows
    assert len(list(videos.iterdir())) == 2


def test_kernels_bench_without_cuda_runs_the_cpu_smoke():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the default is the GPU case list")
    r = bench("bench/kernels.py", "--no-compile")
    assert "no CUDA device: running the CPU smoke" in r.stderr
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert result["meta"]["quick"] is True and result["meta"]["cases"] == ["4x64", "16xU2-64"]
    assert "NOT measured" in r.stdout


def test_pretrain_benches_take_the_device_values_every_command_takes(tmp_path):
    """`--device auto` (torch.device('auto') raised a RuntimeError traceback in the step mode) runs; a
    device this host lacks, or one no command supports, is a one-line argparse error in both modes."""
    import torch

    out = tmp_path / "auto.json"
    bench("bench/pretrain.py", "--preset", "tiny", "--device", "auto", "--steps", 1, "--warmup", 1, "--batch-sizes", 2,
          "--long-len", 0, "--skip-padded", "--json", out)
    assert [r["status"] for r in json.loads(out.read_text())["rows"]] == ["ok"]
    bad = ["mps"] + ([] if torch.cuda.is_available() else ["cuda"])
    for mode in ("step", "data"):
        for device in bad:
            r = subprocess.run([sys.executable, "bench/pretrain.py", "--mode", mode, "--preset", "tiny",
                                "--device", device], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (mode, device, r.stderr[-2000:])
            assert "Traceback" not in r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith(f"pretrain.py: error: device '{device}'"), r.stderr[-500:]


@pytest.mark.parametrize("in_dim", [64, 24])  # 64: the reference's layout (no input projection)
def test_the_padded_baseline_computes_the_models_loss_on_the_same_masks(in_dim):
    """bench/reference_padded.py (the reference's step: samples padded to num_patches, per-sample loops)
    on the weights of an LVMAE and the masks it drew gives the packed model's loss on those masks."""
    from lvmae_fast.model import LVMAE, LVMAEConfig
    from lvmae_fast.packing import PackedBatch, pack_sequences

    reference = load_bench("reference_padded")
    cfg = LVMAEConfig.from_preset("tiny", in_dim=in_dim, masking="random", attn_impl="sdpa", kernels="torch")
    torch.manual_seed(0)
    model = LVMAE(cfg).double()
    padded = reference.ReferencePaddedMAE(cfg, num_patches=20).double()
    state = {k.replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.2"): v for k, v in model.state_dict().items()}
    padded.load_state_dict({k: v for k, v in state.items() if k in padded.state_dict()}, strict=True)
    seqs = [torch.randn(n, in_dim, dtype=torch.float64) for n in (2, 5, 20, 9, 1)]
    b = reference.reference_batch(seqs, 0.5, 20, torch.Generator().manual_seed(1))
    b = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
    x, cu, lengths = pack_sequences(seqs)
    masked = torch.cat([b["mask"][i, :n].bool() for i, n in enumerate(lengths)])
    assert int(masked.sum()) == sum(n - max(1, int(n * 0.5)) for n in lengths)
    with torch.no_grad():
        torch.testing.assert_close(padded(b), model(PackedBatch.from_mask(x, cu, lengths, masked)), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="does not fit the reference's 20 patches"):
        reference.reference_batch([torch.randn(21, in_dim)], 0.5, 20)


def test_the_ingestion_benchs_encoder_preprocesses_as_clip_mean(tmp_path, monkeypatch):
    """The bench builds its ViT-L/14 without a checkpoint dir (CLIPMeanEncoder.__new__): it resized bilinear
    (the base class's default) while `lvmae extract --encoder clip-mean` resizes bicubic, so its rows left
    out the bicubic resize a real job runs. (A small vision tower here: the ViT-L/14 would take seconds.)"""
    import transformers

    from lvmae_fast.video.encoders import build_encoder

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)
    real_config = transformers.CLIPConfig
    monkeypatch.setattr(transformers, "CLIPConfig", lambda text_config, vision_config, projection_dim:
                        real_config(text_config=text_config, vision_config=tiny, projection_dim=projection_dim))
    enc = load_extract_bench().vit_l14_encoder()
    transformers.CLIPModel(real_config(vision_config=tiny, projection_dim=24)).save_pretrained(tmp_path)
    real = build_encoder("clip-mean", weights=str(tmp_path))
    assert real.resample == "bicubic"
    assert (enc.resample, enc.resize, enc.preprocess_style, enc.mean, enc.std) == \
        (real.resample, real.resize, real.preprocess_style, real.mean, real.std)


def test_kernels_bench_checks_the_gradient_of_its_fwd_bwd_rows(monkeypatch):
    # The fwd+bwd rows read "ok" whatever the gradient was: a backward off by -1000x passed.
    kb = load_bench("kernels")

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * -1000.0

    for fn, ok in ((lambda p, t, r: WrongGrad.apply(kb._mse_eager(p, t, r)), False), (kb._mse_eager, True)):
        monkeypatch.setattr(kb.K, "masked_mse_rows", fn)
        rows = kb.bench_masked_mse("4x16", 16, torch.float32, torch.device("cpu"), True, False, True, True)
        assert {row["impl"]: row["ok"] for row in rows} == {"torch eager": True, "triton": ok}


def test_kernels_bench_checks_which_rows_its_loss_reads(monkeypatch):
    """pred and target were independent draws (a loss of ~2 whatever the pairing, checked to 1%): a forward
    kernel pairing prediction i with target row i, or dropping rows, read "ok"; the fwd+bwd rows checked
    only the gradient, which the backward kernel recomputes without the forward's value."""
    kb = load_bench("kernels")
    for fn, ok in ((lambda p, t, r: kb._mse_eager(p, t, torch.arange(len(r))), False),   # rows ignored
                   (lambda p, t, r: kb._mse_eager(p[1:], t, r[1:]), False),             # one row dropped
                   (kb._mse_eager, True)):
        monkeypatch.setattr(kb.K, "masked_mse_rows", fn)
        for backward in (False, True):
            rows = kb.bench_masked_mse("4x16", 16, torch.float32, torch.device("cpu"), True, False, True, backward)
            assert {row["impl"]: row["ok"] for row in rows} == {"torch eager": True, "triton": ok}, backward


def test_kernels_bench_peak_bandwidth_by_device_name():
    """Matched by substring: every A100 read 2.0 TB/s (the 40 GB ones have 1.555: a true 80% of peak
    showed as 62%), and an "RTX A1000 Laptop GPU" matched "A100"."""
    kb = load_bench("kernels")
    for name, tbs in (("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9),
                      ("NVIDIA H200", 4.8), ("NVIDIA GH200 480GB", 4.0), ("NVIDIA GH200 144G HBM3e", 4.9),
                      ("NVIDIA A100-SXM4-40GB", 1.555), ("NVIDIA A100-PCIE-40GB", 1.555),
                      ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA L40S", 0.864),
                      ("NVIDIA L4", 0.3), ("NVIDIA RTX A1000 6GB Laptop GPU", None)):
        assert kb.peak_bandwidth_of(name) == (tbs * 1e12 if tbs else None), name


@pytest.mark.usefixtures("interp")
def test_kernels_bench_exits_1_on_a_mismatch_in_any_triton_row(monkeypatch):
    """Only the rows named exactly "triton" counted: a wrong radix selection (rows "triton (radix select)",
    "triton radix") read MISMATCH and the run exited 0."""
    kb = load_bench("kernels")
    from lvmae_fast.kernels import _triton as KT

    real = KT.select_lowest

    def inverted(keys, *args, impl="hist", **kwargs):
        return real(-keys if impl == "radix" else keys, *args, impl=impl, **kwargs)

    monkeypatch.setattr(KT, "select_lowest", inverted)
    assert kb.main(["--device", "cpu", "--cases", "4x16", "--dim", "16", "--no-compile"]) == 1


@pytest.mark.parametrize("script, args, message", [
    ("pretrain.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("pretrain.py", ["--batch-sizes", "4,x"], "--batch-sizes must be integers >= 1"),
    ("pretrain.py", ["--batch-sizes", "0"], "--batch-sizes must be integers >= 1"),
    ("pretrain.py", ["--min-len", "10", "--max-len", "5"], "--max-len (5) must be >= --min-len (10)"),
    ("pretrain.py", ["--min-len", "0"], "--min-len must be >= 1"),
    ("pretrain.py", ["--mask-ratio", "1.0"], "--mask-ratio must be in (0, 1)"),
    ("pretrain.py", ["--json", "/nonexistent/dir/x.json"], "folder /nonexistent/dir does not exist"),
    ("pretrain.py", ["--mode", "data", "--steps", "0"], "--steps must be >= 1, got 0"),
    # tracebacks, a "failed" row, or a result file that could not be written after the whole run
    ("pretrain.py", ["--long-len", "5000000"], "max_len=5000000 is beyond"),
    ("pretrain.py", ["--min-len", "1", "--max-len", "1"], "--max-len 1 with --mask-ratio 0.5 masks no token"),
    ("pretrain.py", ["--json", "bench"], "--json bench is a folder: give a file name"),
    ("pretrain.py", ["--mode", "data", "--max-tokens", "10"], "--max-tokens must be 0 (no cap) or >= the tiny "),
    ("pretrain.py", ["--mode", "data", "--store", "/nonexistent"], "no embedding store at /nonexistent"),
    ("pretrain.py", ["--mode", "data", "--profile", "bench"], "--profile bench is a folder"),
    ("extract.py", ["--duration", "nan"], "--duration must be a finite number >= 1.0, got nan"),
    ("extract.py", ["--duration", "inf"], "--duration must be a finite number >= 1.0, got inf"),
    ("pretrain.py", ["--mode", "data", "--json-out", "/nonexistent/x.json"], "does not exist or is not writable"),
    ("extract.py", ["--videos", "0"], "--videos must be >= 1, got 0"),
    ("extract.py", ["--duration", "0"], "--duration must be >= 1.0, got 0.0"),
    ("extract.py", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("extract.py", ["--json", "/nonexistent/x.json"], "does not exist or is not writable"),
    # kernels.py: a traceback after the first case, 0 put back to the default width, rows reading ERROR
    ("kernels.py", ["--json", "/nonexistent/x.json"], "does not exist or is not writable"),
    ("kernels.py", ["--dim", "0"], "--dim must be >= 1, got 0"),
    ("kernels.py", ["--cases", "abc"], "--cases: 'abc' is not COUNTxLEN or COUNTxUlo-hi"),
    ("kernels.py", ["--cases", "4x0"], "--cases: '4x0' is not COUNTxLEN"),
    ("kernels.py", ["--cases", "4xU5-2"], "--cases: '4xU5-2' is not COUNTxLEN"),
    ("kernels.py", ["--sweep-sim", "--sweep-budget", "-1"], "--sweep-budget must be >= 0 seconds"),
])
def test_bench_flags_out_of_range_are_one_argparse_error_before_anything_runs(script, args, message):
    # Were tracebacks after a measurement, fake "failed" rows with exit 0, or defaults put in their place.
    r = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_extract_bench_on_a_host_without_the_device_asked_for_is_one_argparse_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    r = subprocess.run([sys.executable, "bench/extract.py", "--device", "cuda"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cuda" in r.stderr, r.stderr[-2000:]
