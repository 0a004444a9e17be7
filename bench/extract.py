"""Ingestion benchmark: decode frames/s (DALI GPU vs PyAV CPU, same files), encoder windows/s, end-to-end
video-seconds per wall-second (x realtime), on H.264 test videos written by lvmae_fast.synth (--content
camera by default: High-profile H.264 with B-frames at a camera-like bit rate; flat: the solid scenes
earlier runs used, which decode several times faster than real footage).

    python bench/extract.py                      # 1080p30 H.264, ViT-L/14-sized encoder (random weights), fp16
    python bench/extract.py --quick --device cpu # smoke: small videos, tiny encoder, < 1 min
    python bench/extract.py --copies 16 --json results.json   # 16x the corpus (links, no re-encoding)

--copies K links every written video K times, so that GPU decode and the end-to-end rate are measured
over enough video to amortise pipeline start-up (PyAV's CPU decode is timed on the originals, or on 2
videos per decode worker where the copies give that many).
DALI decode is timed through its reader API (`--dali-api reader`, extract's default) with the default
frame-selection rule (`--sampling time`; also `index` with --index-rule, the slowest row), and through
its in-memory decoder API (`--dali-api decoder`). End to end: `--decoder dali` with each API where DALI
and CUDA are present (else `--decoder auto`, which is PyAV), and `--decoder pyav`.

A path that cannot run here (no CUDA, no nvidia-dali, no transformers) is reported as "not measured":
nothing is estimated. Target on one H100: end-to-end >= 100x realtime.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Sibling bench modules, and the checkout if lvmae_fast is not installed.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from bench_args import at_least, writable_json
from lvmae_fast import synth
from lvmae_fast.atomic import atomic_write_text
from lvmae_fast.devices import resolve_device
from lvmae_fast import extract as extract_module
from lvmae_fast.extract import cuda_index, decoded_by_text, extract_videos, pyav_events, pyav_threads
from lvmae_fast.video import decode_pyav
from lvmae_fast.video.decode_dali import DEFAULT_DALI_API, dali_available
from lvmae_fast.video.jobs import Failed, VideoJob, Window, WindowSpec, prepare_job
from lvmae_fast.video.ordered import default_decode_workers, ordered_parallel

NOT_MEASURED = "not measured"


def vit_l14_encoder():
    """CLIP ViT-L/14 image tower (304M params), random weights, averaged over T frames (clip-mean)."""
    from transformers import CLIPConfig, CLIPModel

    from lvmae_fast.video.encoders.hf import CLIPMeanEncoder

    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14)
    # Built without a checkpoint dir: the class's defaults (bicubic resize, as CLIPImageProcessor) hold.
    enc = CLIPMeanEncoder.__new__(CLIPMeanEncoder)
    torch.nn.Module.__init__(enc)
    enc.model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
    enc.dim, enc.image_size, enc.name = 768, 224, "clip-mean-vit-l14-random"
    from lvmae_fast.video.encoders.base import CLIP_MEAN, CLIP_STD
    enc.mean, enc.std = CLIP_MEAN, CLIP_STD
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


# --content: what the test videos hold. camera: textured, panning, grainy scenes in High-profile H.264
# with B-frames at 8 Mbit/s (1080p), decoding like real footage; flat: write_video's solid scenes in
# ultrafast Constrained Baseline H.264 (what runs before 2026-11-26 used), which decode several times faster.
CONTENTS = ("camera", "flat")


def video_names(folder: Path, count: int, duration: float, size, fps: float, content: str = "camera") -> list[Path]:
    """Named by what they hold: a --video-dir reused with other --duration/--quick/--content settings gets
    new files instead of silently timing the old ones under the new settings' labels."""
    kind = "" if content == "flat" else f"_{content}"  # flat keeps the names earlier runs wrote
    return [folder / f"bench{i}_{size[0]}x{size[1]}_{fps:g}fps_{duration:g}s{kind}.mp4" for i in range(count)]


def make_videos(folder: Path, count: int, duration: float, size, fps: float, content: str = "camera") -> list[Path]:
    def write(i: int, path: Path) -> Path:
        if not path.is_file():  # written under a temp name, then renamed: a killed run leaves no half file
            tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
            if content == "camera":
                synth.write_camera_like(tmp, duration=duration, fps=fps, size=size, seed=i, keyint=int(fps * 2))
            else:
                synth.write_video(tmp, duration=duration, fps=fps, size=size, codec="h264", gop=int(fps * 2), seed=i)
            os.replace(tmp, path)
        return path

    # Side by side: a camera-like 1080p video takes seconds of numpy and x264 work per second of video.
    names = video_names(folder, count, duration, size, fps, content)
    with ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1))) as pool:
        return list(pool.map(write, range(count), names))


def bench_pyav_decode(paths, spec, workers: int = 1, threads: int | None = None, skip_nonref: bool = True,
                      hwaccel=None, deblock: bool = True) -> dict:
    """PyAV decode of every window, `workers` videos at once with `threads` frame threads each (default:
    as `lvmae extract --decode-workers`; 0 = FFmpeg's own count, extract's one decode before 2026-11-26).
    skip_nonref=False decodes every frame, as extract did before 2026-11-26 (decode_pyav.SKIP_UNNEEDED_NONREF);
    deblock=False as `lvmae extract --skip-deblocking`."""
    decode_pyav.SKIP_UNNEEDED_NONREF = skip_nonref
    try:
        return _bench_pyav_decode(paths, spec, workers, threads, hwaccel, deblock)
    finally:
        decode_pyav.SKIP_UNNEEDED_NONREF = True


def _bench_pyav_decode(paths, spec, workers: int, threads: int | None, hwaccel=None, deblock: bool = True) -> dict:
    threads = pyav_threads() if threads is None else threads
    frames = [0]
    software = set()   # NVDEC rows: videos FFmpeg decoded in software instead (then not NVDEC's rate)
    failed = {}        # path -> reason: a video whose decode failed counts no frames (it did not decode them)
    lock = threading.Lock()

    def video(p):
        job = prepare_job(VideoJob(p.stem, str(p), deblock=deblock), spec)
        reason = None
        for event in pyav_events(job, threads, hwaccel=hwaccel, on_software=lambda: software.add(job.path)):
            if isinstance(event, Failed):
                reason = event.reason
            yield event
        with lock:
            if reason is None:
                # Every frame of the file, the rows' stated unit: a decode that skips frames it does not need
                # (non-references, GOP tails, the frames after the last window) is credited with them too.
                frames[0] += job.index.num_frames
            else:
                failed[job.path] = reason

    t0 = time.perf_counter()
    windows = sum(isinstance(e, Window) for e in ordered_parallel(paths, video, workers=workers, depth=16))
    dt = time.perf_counter() - t0
    if failed and len(failed) == len(paths):
        raise RuntimeError(f"every video's decode failed, e.g. {next(iter(failed.values()))}")
    row = {"frames_per_s": frames[0] / dt, "windows_per_s": windows / dt, "seconds": dt, "workers": workers,
           "frame_threads": threads or "auto", "failed_videos": len(failed)}
    if hwaccel is not None:
        row["software_fallback_videos"] = len(software)
    return row


# Every measurement main() runs through stage(): the keys --only selects from.
STAGE_KEYS = frozenset({"end_to_end_pyav", "end_to_end_hybrid", "end_to_end_nvdec", "end_to_end_dali_decoder",
                        "end_to_end", "encoder_fp", "decode_pyav", "decode_pyav_every_frame", "decode_pyav_parallel",
                        "decode_nvdec", "decode_dali_gpu_decoder_api", "decode_dali_gpu", "decode_dali_gpu_index_rule"})


def frames_ratio(a, b):
    """a's decode rate over b's, or not measured when either row is not a measurement."""
    return a["frames_per_s"] / b["frames_per_s"] if isinstance(a, dict) and isinstance(b, dict) else NOT_MEASURED


def ratio_cell(r) -> str:
    return r if isinstance(r, str) else f"{r:.2f}"


# --variant: the decode settings a variant may change, each with its allowed values (a type: an int >= 0).
VARIANT_SETTINGS = {"gop_tails": ("skip", "decode"), "deblocking": ("keep", "skip"),
                    "nvdec_context": ("own", "shared"), "side_streams": ("0", "1"),
                    "frame_threads": int, "cpu_decode_nice": int, "decode_workers": int, "nvdec_workers": int}
# lvmae extract's own settings (each flag's default): the table's heading names those a run changes.
DEFAULT_SETTINGS = {"gop_tails": "skip", "deblocking": "keep", "nvdec_context": "own", "side_streams": "0",
                    "frame_threads": 0, "cpu_decode_nice": 0, "decode_workers": 0, "nvdec_workers": 0}
# The rows a variant times again (those of them --only selects), under the variant's settings.
VARIANT_ROWS = ("end_to_end_pyav", "end_to_end_hybrid", "end_to_end_nvdec", "decode_pyav_parallel", "decode_nvdec")


def parse_variant(text: str) -> dict:
    """'nvdec_context=shared,side_streams=1' -> {'nvdec_context': 'shared', 'side_streams': '1'};
    'base' (or nothing) -> {}: the run's own settings again. ValueError names what is wrong."""
    settings = {}
    for item in (part.strip() for part in text.split(",")):
        if not item or item == "base":
            continue
        key, _, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        allowed = VARIANT_SETTINGS.get(key)
        if allowed is None:
            raise ValueError(f"unknown setting {key!r} (choose from {', '.join(VARIANT_SETTINGS)})")
        if allowed is int:
            if not value.isdigit():
                raise ValueError(f"{key} takes an integer >= 0, got {value!r}")
            settings[key] = int(value)
        elif value not in allowed:
            raise ValueError(f"{key} takes {' or '.join(allowed)}, got {value!r}")
        else:
            settings[key] = value
    return settings


def apply_settings(settings: dict) -> None:
    """Set the process-wide decode switches a run's (or a variant's) settings name."""
    decode_pyav.SKIP_GOP_TAILS = settings["gop_tails"] == "skip"
    decode_pyav.NVDEC_SHARED_CONTEXT = settings["nvdec_context"] == "shared"
    extract_module.FRAME_THREADS = settings["frame_threads"] or None  # read by pyav_threads(), at each job's start
    extract_module.CPU_DECODE_NICE = settings["cpu_decode_nice"]
    extract_module.SIDE_STREAMS = settings["side_streams"] == "1"


def link_copies(paths: list[Path], copies: int) -> list[Path]:
    """paths plus (copies - 1) hard links (symlinks where hard links fail) of each, distinct names."""
    out = list(paths)
    for k in range(1, copies):
        for p in paths:
            link = p.with_name(f"{p.stem}_copy{k}{p.suffix}")
            if not link.exists():
                try:
                    os.link(p, link)
                except OSError:
                    link.symlink_to(p.resolve())
            out.append(link)
    return out


def bench_dali_decode(paths, spec, readers: int, batch_size: int, dali_api: str = "reader") -> dict | str:
    if not torch.cuda.is_available():
        return NOT_MEASURED + " (no CUDA)"
    try:
        import nvidia.dali  # noqa: F401

        from lvmae_fast.video.decode_dali import decode_windows_dali
    except ImportError:
        return NOT_MEASURED + " (nvidia-dali not installed)"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # Probing (a demux of every file) is timed here as in the PyAV row: both rows do the same work.
    jobs = [prepare_job(VideoJob(p.stem, str(p)), spec) for p in paths]
    frames = sum(j.index.num_frames for j in jobs)
    windows = 0
    for ev in decode_windows_dali(jobs, spec, device="gpu", device_id=torch.cuda.current_device(),
                                  readers=readers, batch_size=batch_size, dali_api=dali_api):
        windows += isinstance(ev, Window)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    expected = sum(j.num_windows for j in jobs)
    if windows != expected:  # DALI handed videos back (reader error, codec): its rate would be made up
        return f"{NOT_MEASURED} (DALI decoded {windows} of {expected} windows)"
    # frames: every frame of the files (the decoder walks each GOP to the sampled frames)
    return {"frames_per_s": frames / dt, "windows_per_s": windows / dt, "seconds": dt, "readers": readers,
            "windows": windows, **({"dali_api": dali_api} if dali_api != "reader" else {})}


def bench_encoder(model, device, dtype, T: int, batch: int, iters: int) -> dict:
    x = torch.randn(batch, T, 3, model.image_size, model.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        model.encode_video(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model.encode_video(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"windows_per_s": batch * iters / dt, "images_per_s": batch * iters * T / dt, "batch": batch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small videos + tiny encoder: a < 1 min smoke run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--videos", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds per test video")
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--decode-workers", type=int, default=0,
                    help="decodes PyAV runs at once in the parallel rows (0 = extract's default: one per CPU, at most 16)")
    ap.add_argument("--nvdec-workers", type=int, default=0,
                    help="the hybrid row's NVDEC decodes at once, beside --decode-workers CPU ones (0 = extract's default)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--content", choices=CONTENTS, default="camera",
                    help="test videos: camera = textured, panning, grainy scenes, High-profile H.264 with B-frames at "
                         "8 Mbit/s (1080p), decoding like real footage (default); flat = solid scenes, ultrafast "
                         "Constrained Baseline, as runs before 2026-11-26 (decode several times faster)")
    ap.add_argument("--index-rule", action="store_true",
                    help="also time DALI's reader with --sampling index (the slowest row)")
    ap.add_argument("--copies", type=int, default=1, help="link each video this many times (amortise start-up)")
    ap.add_argument("--only", default=None,
                    help="comma-separated measurement keys to run (e.g. end_to_end_hybrid,end_to_end_pyav; the JSON's "
                         "keys); the others read 'not measured (not in --only)'. For a second look at a few rows "
                         "on a GPU host without paying for the rest")
    ap.add_argument("--gop-tails", choices=VARIANT_SETTINGS["gop_tails"], default=DEFAULT_SETTINGS["gop_tails"],
                    help="skip (default, as lvmae extract since 2026-11-27) or decode the GOP tails after each GOP's "
                         "last sampled frame (decode_pyav.SKIP_GOP_TAILS): run twice to see what skipping gains")
    ap.add_argument("--deblocking", choices=VARIANT_SETTINGS["deblocking"], default=DEFAULT_SETTINGS["deblocking"],
                    help="keep (default, as lvmae extract) or skip the in-loop deblocking filter in the PyAV rows "
                         "(lvmae extract --skip-deblocking; H.264, HEVC, VP8): run twice, or --variant deblocking=skip, "
                         "to see what skipping gains")
    ap.add_argument("--frame-threads", type=int, default=0,
                    help="frame threads per PyAV decode in the parallel and end-to-end rows (0 = lvmae extract's "
                         "own count, extract.pyav_threads: 2 on a 16-CPU host): run twice to see what it costs")
    ap.add_argument("--nvdec-context", choices=VARIANT_SETTINGS["nvdec_context"], default=DEFAULT_SETTINGS["nvdec_context"],
                    help="NVDEC decodes each in a CUDA context of their own (default, as lvmae extract) or in torch's "
                         "(decode_pyav.NVDEC_SHARED_CONTEXT): run twice to see which is faster")
    ap.add_argument("--cpu-decode-nice", type=int, default=0,
                    help="raise the nice value of CPU decode threads by N in the end-to-end rows (extract.CPU_DECODE_NICE; "
                         "0 = off, as lvmae extract): NVDEC decodes and the encoder's loop then run first when every core "
                         "is decoding. Run twice to see what it changes")
    ap.add_argument("--side-streams", action="store_true",
                    help="uploads and preprocessing on each decode thread's CUDA stream, the encoder on its own "
                         "(extract.SIDE_STREAMS; off = the default stream, as lvmae extract): run twice to see what it changes")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                    help="after every other row, time the rows " + ", ".join(VARIANT_ROWS) + " (those --only selects) "
                         "again with these settings changed, in this process, on the same videos: rows "
                         "'<row>@<variant>'. Keys: " + ", ".join(VARIANT_SETTINGS) + " (as the flags of the same "
                         "name; side_streams=0|1). 'base' repeats the run's own settings. Repeatable: one pass each, "
                         "in order. Saves a process start, a model build and a warm-up per A/B, and keeps each A/B "
                         "within one run")
    ap.add_argument("--video-dir", default=None,
                    help="keep the test videos here and reuse ones already written (writing 1080p costs minutes)")
    args = ap.parse_args(argv)
    # Negative worker counts: else every end-to-end row records the same ValueError; 0 videos, seconds or
    # batch: else the defaults stood in for them.
    at_least(ap, args, decode_workers=0, nvdec_workers=0, frame_threads=0, cpu_decode_nice=0, videos=1,
             duration=1.0, batch_size=1, readers=1, copies=1)
    writable_json(ap, "--json", args.json)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    only = None if args.only is None else {key.strip() for key in args.only.split(",") if key.strip()}
    if only is not None and not only <= STAGE_KEYS:
        ap.error(f"--only: unknown measurement {', '.join(sorted(only - STAGE_KEYS))} (choose from "
                 f"{', '.join(sorted(STAGE_KEYS))})")
    if args.variant and only is not None and not only & set(VARIANT_ROWS):  # else the passes time nothing
        ap.error(f"--variant re-times {', '.join(VARIANT_ROWS)}; --only selects none of them")
    variants = []
    for text in args.variant:
        try:
            settings = parse_variant(text)
        except ValueError as err:
            ap.error(f"--variant {text!r}: {err}")
        label = text.strip() or "base"
        repeats = sum(name == label or name.startswith(f"{label}#") for name, _ in variants)
        variants.append((f"{label}#{repeats + 1}" if repeats else label, settings))  # 'base' twice: base, base#2
    logging.basicConfig(level=logging.WARNING)
    base_settings = {"gop_tails": args.gop_tails, "deblocking": args.deblocking, "nvdec_context": args.nvdec_context,
                     "side_streams": "1" if args.side_streams else "0", "frame_threads": args.frame_threads,
                     "cpu_decode_nice": args.cpu_decode_nice, "decode_workers": args.decode_workers,
                     "nvdec_workers": args.nvdec_workers}
    apply_settings(base_settings)

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.quick:
        count, duration, size, fps = args.videos or 2, args.duration or 10.0, (320, 180), 30.0
    else:
        count, duration, size, fps = args.videos or 4, args.duration or 30.0, (1920, 1080), 30.0
    spec = WindowSpec(seconds=5.0, frames=8)
    workers = args.decode_workers or default_decode_workers()
    # The pass running: the run's own (base) or a --variant's; each pass writes stores of its own.
    current = {"decode_workers": workers, "nvdec_workers": args.nvdec_workers, "deblocking": args.deblocking,
               "stores": ""}
    batch = args.batch_size or (8 if args.quick else 64)
    results = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "dtype": str(dtype).replace("torch.", ""), "videos": count, "video_seconds_each": duration,
               "resolution": f"{size[0]}x{size[1]}", "fps": fps, "codec": "h264", "content": args.content, "window_seconds": spec.seconds,
               "frames_per_window": spec.frames, "decode_workers": workers, "gop_tails": args.gop_tails,
               "nvdec_context": args.nvdec_context, "cpu_decode_nice": args.cpu_decode_nice,
               "side_streams": args.side_streams,
               "frame_threads": pyav_threads(), "deblocking": args.deblocking,
               "python": platform.python_version(), "torch": torch.__version__}

    with tempfile.TemporaryDirectory(prefix="lvmae_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        video_dir = Path(args.video_dir) if args.video_dir else tmp / "videos"
        originals = make_videos(video_dir, count, duration, size, fps, args.content)  # reuses the ones already there
        paths = link_copies(originals, max(1, args.copies))
        results["copies"] = max(1, args.copies)
        results["synth_seconds"] = round(time.perf_counter() - t0, 2)

        def save():
            if args.json:  # atomic: a run killed mid-write keeps the previous complete file
                atomic_write_text(args.json, json.dumps(results, indent=2, default=str))

        measures = {}  # VARIANT_ROWS key -> its measurement, for the --variant passes

        def stage(key, measure):
            """Run one measurement, then save everything so far: a run cut by a time limit keeps it. A
            stage that fails is recorded as not measured (with the error) and the others still run.
            A variant's row ('<row>@<variant>') runs when its row is selected."""
            if key in VARIANT_ROWS:
                measures[key] = measure
            if only is not None and key.partition("@")[0] not in only:
                results[key] = f"{NOT_MEASURED} (not in --only)"
                return
            t_stage, cpu_stage = time.perf_counter(), time.process_time()
            try:
                results[key] = measure()
                if isinstance(results[key], dict):
                    # Process CPU time (every thread: FFmpeg's, DALI's, ours) per wall second: tells a
                    # CPU-bound stage (near the core count) from one waiting on NVDEC or the GPU.
                    results[key]["cpu_cores_busy"] = round((time.process_time() - cpu_stage)
                                                           / max(time.perf_counter() - t_stage, 1e-9), 2)
            except Exception as err:
                results[key] = f"{NOT_MEASURED} (failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
            print(f"[bench] {key}: {json.dumps(results[key], default=str)[:200]} "
                  f"({time.perf_counter() - t_stage:.0f} s, ended {time.strftime('%H:%M:%S')})",  # vs nvidia-smi's log
                  file=sys.stderr, flush=True)
            save()

        if args.quick:
            from lvmae_fast.video.encoders import build_encoder
            model, enc_name = build_encoder("tiny"), "tiny (meaningless, smoke only)"
        else:
            try:
                model, enc_name = vit_l14_encoder(), "ViT-L/14 clip-mean, random weights"
            except ImportError:
                model, enc_name = None, None
        results["encoder"] = enc_name or NOT_MEASURED + " (transformers not installed)"
        if model is not None:
            model = model.to(device=device, dtype=dtype)
        # Most important first (the end-to-end target, then the decode rates: PyAV's CPU baseline takes
        # seconds, so it goes before DALI's), so a cut run keeps them.
        # DALI's one-off start-up (CUDA context, NVDEC, plugin load) in an untimed run first, so that
        # neither the end-to-end nor the DALI rows pay it (a failure here shows again in the DALI rows).
        for api in ("reader", "decoder"):
            try:
                bench_dali_decode(originals[:1], spec, args.readers, batch, dali_api=api)
            except Exception as err:
                print(f"[bench] DALI warm-up ({api} API) failed: {type(err).__name__}: {err}", file=sys.stderr)
        results["end_to_end_dali_api"] = DEFAULT_DALI_API  # what the end-to-end row's DALI videos used
        # NVDEC through PyAV: None when it works here, else why not (checked on a test clip).
        nvdec_ok = "no CUDA" if device.type != "cuda" else decode_pyav.nvdec_problem(cuda_index(device))
        save()
        if model is not None:
            def end_to_end(decoder: str, store: str, dali_api: str = DEFAULT_DALI_API, videos=None):
                videos = paths if videos is None else videos
                if current["deblocking"] == "skip" and decoder not in ("pyav", "auto"):  # auto: PyAV
                    return f"{NOT_MEASURED} (deblocking is skipped in PyAV's software decodes only)"
                summary = extract_videos([(p.stem, str(p)) for p in videos], tmp / (store + current["stores"]), encoder=model,
                                         seconds=spec.seconds, frames=spec.frames, batch_size=batch,
                                         device=str(device), readers=args.readers, decoder=decoder,
                                         decode_workers=current["decode_workers"], dali_api=dali_api,
                                         nvdec_workers=current["nvdec_workers"],
                                         skip_deblocking=current["deblocking"] == "skip")
                if not summary["done"]:  # a rate over no video would read as a measurement of 0x
                    return f"{NOT_MEASURED} (all {summary['failed']} videos failed to extract)"
                return {k: summary[k] for k in ("decoder", "decoded_by", "decode_workers", "nvdec_workers", "windows",
                                                "video_seconds", "wall_seconds", "realtime_factor", "done", "failed")}
            # The encoder's and the pipeline's one-off start-up (kernels, allocator, threads) in an untimed run.
            try:
                end_to_end("pyav", "store_warmup", videos=originals[:1])
            except Exception as err:  # noqa: BLE001 - shows again in the timed rows
                print(f"[bench] end-to-end warm-up failed: {type(err).__name__}: {err}", file=sys.stderr)
            # Most informative first (a run cut by its time limit keeps them): the paths a GPU host would
            # use by default or next (PyAV, PyAV on NVDEC, DALI's decoder API), then DALI's reader.
            stage("end_to_end_pyav", lambda: end_to_end("pyav", "store_pyav"))
            if nvdec_ok is None:  # PyAV's decodes on NVDEC (FFmpeg's CUDA hwaccel), then both at once
                stage("end_to_end_hybrid", lambda: end_to_end("hybrid", "store_hybrid"))
                stage("end_to_end_nvdec", lambda: end_to_end("nvdec", "store_nvdec"))
            else:
                results["end_to_end_hybrid"] = results["end_to_end_nvdec"] = f"{NOT_MEASURED} ({nvdec_ok})"
            on_dali = device.type == "cuda" and dali_available()
            if on_dali:  # the in-memory decoder API end to end
                stage("end_to_end_dali_decoder", lambda: end_to_end("dali", "store_dali_decoder", "decoder"))
            else:
                results["end_to_end_dali_decoder"] = NOT_MEASURED + " (needs CUDA and nvidia-dali)"
            # DALI's default (reader) API where it can run (GPU + nvidia-dali), else `--decoder auto` (PyAV).
            stage("end_to_end", lambda: end_to_end("dali" if on_dali else "auto", "store"))
            stage("encoder_fp", lambda: bench_encoder(model, device, dtype, spec.frames, batch, 3 if args.quick else 20))
        else:
            results["encoder_fp"] = results["end_to_end"] = results["end_to_end_pyav"] = NOT_MEASURED + " (no encoder)"
        # Both PyAV rows decode the same files: enough of them to keep every worker busy.
        decode_set = paths[:max(len(originals), 2 * workers)]
        results["decode_pyav_videos"] = len(decode_set)
        deblock = args.deblocking == "keep"
        stage("decode_pyav", lambda: bench_pyav_decode(decode_set, spec, 1, threads=0, deblock=deblock))
        stage("decode_pyav_every_frame", lambda: bench_pyav_decode(decode_set, spec, 1, threads=0, skip_nonref=False,
                                                                   deblock=deblock))
        one = results["decode_pyav"]
        results["decode_pyav_skip_over_every_frame"] = frames_ratio(one, results["decode_pyav_every_frame"])
        def parallel():  # 2 videos per worker of this pass (a variant may raise the count), as many as there are
            n = current["decode_workers"]
            if n == 1:
                return f"{NOT_MEASURED} (1 decode worker: the decode_pyav row is that decode)"
            subset = paths[:max(len(originals), 2 * n)]
            return {**bench_pyav_decode(subset, spec, n, deblock=current["deblocking"] == "keep"), "videos": len(subset)}

        if workers > 1:
            stage("decode_pyav_parallel", parallel)
        else:  # the row above already is the one-worker decode; a variant with more workers still runs it
            measures["decode_pyav_parallel"] = parallel
            results["decode_pyav_parallel"] = f"{NOT_MEASURED} (1 decode worker here: pass --decode-workers N)"
        results["decode_pyav_parallel_over_one"] = frames_ratio(results["decode_pyav_parallel"], one)
        save()
        if nvdec_ok is None:
            stage("decode_nvdec", lambda: f"{NOT_MEASURED} (NVDEC always deblocks)" if current["deblocking"] == "skip"
                  else bench_pyav_decode(decode_set, spec, current["decode_workers"],
                                         hwaccel=lambda: decode_pyav.nvdec_accel(cuda_index(device))))
        else:
            results["decode_nvdec"] = f"{NOT_MEASURED} ({nvdec_ok})"
        results["decode_nvdec_over_pyav"] = frames_ratio(results["decode_nvdec"], one)
        save()
        # The in-memory decoder API first, then the reader, same files.
        stage("decode_dali_gpu_decoder_api", lambda: bench_dali_decode(paths, spec, args.readers, batch,
                                                                       dali_api="decoder"))
        results["decode_dali_decoder_api_over_pyav"] = frames_ratio(results["decode_dali_gpu_decoder_api"], one)
        save()
        stage("decode_dali_gpu", lambda: bench_dali_decode(paths, spec, args.readers, batch))
        results["decode_dali_over_pyav"] = frames_ratio(results["decode_dali_gpu"], one)
        save()
        if args.index_rule:  # last: the slowest row (98 s for 32 min of 1080p on an H200)
            stage("decode_dali_gpu_index_rule", lambda: bench_dali_decode(
                paths, dataclasses.replace(spec, rule="index"), args.readers, batch))
        else:
            results["decode_dali_gpu_index_rule"] = NOT_MEASURED + " (pass --index-rule)"
        # --variant passes: the rows measured above again, each under its settings, then the run's own.
        results["variants"] = {label: settings for label, settings in variants}
        for number, (label, settings) in enumerate(variants, 1):
            merged = {**base_settings, **settings}
            apply_settings(merged)
            current.update(decode_workers=merged["decode_workers"] or default_decode_workers(),
                           nvdec_workers=merged["nvdec_workers"], deblocking=merged["deblocking"],
                           stores=f"_variant{number}")
            try:
                for key in VARIANT_ROWS:
                    if key in measures and (only is None or key in only):
                        stage(f"{key}@{label}", measures[key])
            finally:
                apply_settings(base_settings)
                current.update(decode_workers=workers, nvdec_workers=args.nvdec_workers, deblocking=args.deblocking,
                               stores="")
        save()

    def cell(r, key, fmt="{:.0f}"):
        if not isinstance(r, dict):
            return r
        failed = r.get("failed_videos", 0)  # decode rows: frames of failed videos are not counted
        return fmt.format(r[key]) + (f" ({failed} videos failed, their frames not counted)" if failed else "")

    e2e = results["end_to_end"]
    # The run's decode settings that are not lvmae extract's defaults: two runs' tables must tell apart.
    changed = [f"{key} {value}" for key, value in base_settings.items()
               if key not in ("decode_workers", "nvdec_workers") and value != DEFAULT_SETTINGS[key]]
    print(f"\n### Ingestion benchmark ({results['resolution']} H.264 @ {fps:g} fps, {args.content} content, "
          f"{len(paths)} x {duration:g} s; "
          f"{results['device']} {results['gpu'] or ''}; T={spec.frames}, S={spec.seconds:g} s"
          f"{'; ' + ', '.join(changed) if changed else ''})\n")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| decode, PyAV CPU, one video at a time, FFmpeg's thread count (frames/s, all frames of the files) | "
          f"{cell(results['decode_pyav'], 'frames_per_s')} |")
    par_threads = results["decode_pyav_parallel"].get("frame_threads") if isinstance(results["decode_pyav_parallel"], dict) else "-"
    # The decode rows run whole videos, so no more of them at once than there are; extract's end-to-end rows
    # also cut long videos into parts, so their label is the flag.
    at_once = min(workers, len(paths))
    print(f"| decode, PyAV CPU, {at_once} videos at once, {par_threads} frame threads each (frames/s) | "
          f"{cell(results['decode_pyav_parallel'], 'frames_per_s')} |")
    print(f"| decode, PyAV CPU, one video at a time, every frame decoded (before 2026-11-26) (frames/s) | "
          f"{cell(results['decode_pyav_every_frame'], 'frames_per_s')} |")
    skipped = "unsampled non-reference frames" + (" and GOP tails" if args.gop_tails == "skip" else "")
    print(f"| decode ratio, {skipped} skipped / every frame decoded | "
          f"{ratio_cell(results['decode_pyav_skip_over_every_frame'])} |")
    nvdec = results["decode_nvdec"]
    fell_back = nvdec.get("software_fallback_videos", 0) if isinstance(nvdec, dict) else 0
    print(f"| decode, PyAV on NVDEC (--decoder nvdec), {at_once} videos at once (frames/s) | {cell(nvdec, 'frames_per_s')}"
          f"{f' ({fell_back} videos decoded in software: FFmpeg fell back)' if fell_back else ''} |")
    print(f"| decode ratio, NVDEC {at_once} at once / PyAV CPU one at a time | "
          f"{ratio_cell(results['decode_nvdec_over_pyav'])} |")
    print(f"| decode ratio, PyAV {at_once} at once / one at a time | {ratio_cell(results['decode_pyav_parallel_over_one'])} |")
    print(f"| decode, DALI GPU, --dali-api reader, {args.readers} readers, --sampling time (frames/s, all frames of the "
          f"files) | {cell(results['decode_dali_gpu'], 'frames_per_s')} |")
    print(f"| decode, DALI GPU, --dali-api reader, {args.readers} readers, --sampling index (frames/s, all frames of "
          f"the files) | {cell(results['decode_dali_gpu_index_rule'], 'frames_per_s')} |")
    print(f"| decode ratio, DALI GPU (--dali-api reader, --sampling time) / PyAV CPU (frames/s) | "
          f"{ratio_cell(results['decode_dali_over_pyav'])} |")
    print(f"| decode, DALI GPU, --dali-api decoder, {args.readers} pipelines, --sampling time (frames/s, all frames of "
          f"the files) | {cell(results['decode_dali_gpu_decoder_api'], 'frames_per_s')} |")
    print(f"| decode ratio, DALI GPU (--dali-api decoder, --sampling time) / PyAV CPU (frames/s) | "
          f"{ratio_cell(results['decode_dali_decoder_api_over_pyav'])} |")
    print(f"| encoder {results['encoder']}, {results['dtype']} (windows/s) | {cell(results['encoder_fp'], 'windows_per_s')} |")
    dali_api = (f" (DALI: --dali-api {results['end_to_end_dali_api']})"
                if isinstance(e2e, dict) and "dali" in e2e["decoded_by"] else "")
    how = decoded_by_text(e2e["decoded_by"]) + f"; {e2e['failed']} failed" if isinstance(e2e, dict) else "-"
    print(f"| end to end, videos decoded by: {how}{dali_api} (x realtime) | {cell(e2e, 'realtime_factor', '{:.1f}')} |")
    e2e_pyav = results["end_to_end_pyav"]
    print(f"| end to end, --decoder pyav --decode-workers {workers} (x realtime) | "
          f"{cell(e2e_pyav, 'realtime_factor', '{:.1f}')} |")
    e2e_nvdec = results.get("end_to_end_nvdec", NOT_MEASURED)
    by_nvdec = f" ({decoded_by_text(e2e_nvdec['decoded_by'])} videos)" if isinstance(e2e_nvdec, dict) else ""
    print(f"| end to end, --decoder nvdec --decode-workers {workers}{by_nvdec} (x realtime) | "
          f"{cell(e2e_nvdec, 'realtime_factor', '{:.1f}')} |")
    hybrid = results.get("end_to_end_hybrid", NOT_MEASURED)
    split = f" ({decoded_by_text(hybrid['decoded_by'])} videos)" if isinstance(hybrid, dict) else ""
    nvdec_at_once = hybrid["nvdec_workers"] if isinstance(hybrid, dict) else args.nvdec_workers or "default"
    print(f"| end to end, --decoder hybrid --decode-workers {workers} --nvdec-workers {nvdec_at_once}{split} "
          "(x realtime) | "
          f"{cell(hybrid, 'realtime_factor', '{:.1f}')} |")
    e2e_dec = results.get("end_to_end_dali_decoder", NOT_MEASURED)
    how_dec = decoded_by_text(e2e_dec["decoded_by"]) if isinstance(e2e_dec, dict) else "-"
    print(f"| end to end, --decoder dali --dali-api decoder, videos decoded by: {how_dec} (x realtime) | "
          f"{cell(e2e_dec, 'realtime_factor', '{:.1f}')} |")
    for label, _ in variants:
        for key in VARIANT_ROWS:
            row = results.get(f"{key}@{label}")
            if row is None:
                continue
            unit, field = ("x realtime", "realtime_factor") if key.startswith("end_to_end") else ("frames/s", "frames_per_s")
            busy_note = f", {row['cpu_cores_busy']:g} cores busy" if isinstance(row, dict) and "cpu_cores_busy" in row else ""
            print(f"| variant {label}: {key} ({unit}{busy_note}) | {cell(row, field, '{:.1f}')} |")
    busy = [f"{key} {results[key]['cpu_cores_busy']:g}" for key in sorted(STAGE_KEYS)
            if isinstance(results.get(key), dict) and "cpu_cores_busy" in results[key]]
    print(f"| CPU cores busy (process CPU seconds / wall seconds, each stage from its start to its end; "
          f"{os.cpu_count()} CPUs) | {', '.join(busy) or '-'} |")
    print("\n" + json.dumps(results, default=str))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
