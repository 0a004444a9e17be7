"""`lvmae extract`: long videos -> S-second windows -> T frames each -> frozen encoder -> embedding store.

Python API for the demo and scripts::

    from lvmae_fast.extract import extract_videos
    summary = extract_videos("videos/", "runs/store", encoder="tiny")   # -> dict (done/skipped/failed...)

Robustness contract: a file that cannot be ingested (zero-byte, not media, truncated beyond repair,
audio-only, too short for one window, ...) is written to STORE/failures.jsonl as one JSON object
{"path", "video_id", "reason"} and skipped; the job still finishes (exit 0). Videos are committed to
the store only when all their windows are embedded (commit after each encoder batch that completes
one); the windows of unfinished videos are saved beside the store after every batch
(video/partial.py). A killed run therefore loses at most the encoder batch in flight, and re-running
resumes: ids already in the store are not redone, and an unfinished video continues from its saved
windows. failures.jsonl lists the failures of the latest run. A video with more than 5% of its sampled
frames undecodable is refused as damaged (decode_pyav.MAX_MISSING); two files with one video id: the
second is a failure of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .atomic import append_whole, write_error
from .devices import resolve_device
from .store import MIN_SEGMENT_SECONDS, segment_seconds_ok
from .train_config import in_torch_seed_range
from .video.decode_dali import DALI_APIS, DEFAULT_DALI_API
from .video.decode_pyav import PYAV_MINIMUM, PYAV_MINIMUM_WHY
from .video.jobs import Failed, VideoJob, Window, WindowSpec, prepare_job
from .video.hybrid import DEFAULT_NVDEC_SLOTS, DecoderShare
from .video.ordered import default_decode_workers, in_background, ordered_parallel
from .video.partial import PartialVideos
from .video.probe import INDEX_VERSION, VideoError

log = logging.getLogger("lvmae_fast.extract")

FAILURES_NAME = "failures.jsonl"
DECODERS = ("auto", "dali", "pyav", "nvdec", "hybrid")
PYAV_BACKENDS = ("pyav", "nvdec", "hybrid")  # the decoders run by PyAV decode workers
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


# ----------------------------------------------------------------------------------------------- setup
def resolve_dtype(precision: str, device):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "auto":  # fp16 on GPU (tensor cores), fp32 on CPU (fp16/bf16 matmuls crawl there)
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def cuda_index(device) -> int:
    """The CUDA device number `device` means (`cuda` alone: the current one), for NVDEC decodes."""
    import torch

    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def resolve_decoder(decoder: str, device) -> str:
    from .optional import require
    from .video.decode_dali import dali_available

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}")
    if decoder == "auto":
        # PyAV everywhere until another path measures faster: on an H200 host with 16 cores (2026-11-26,
        # bench/extract.py, camera-like 1080p H.264) PyAV decoding 16 videos at once ran end to end at
        # 61.6-62.9x realtime, PyAV on NVDEC at 58x, DALI's decoder API at 24.5x and its reader at 21.1x
        # (hybrid, 2026-11-27: 47.3x against 57.3x for PyAV alone). The others stay one flag away.
        decoder = "pyav"
    if decoder == "dali" and not dali_available():
        raise ValueError("--decoder dali: nvidia-dali is not installed (pip install 'lvmae_fast[dali]')")
    # Every backend probes timestamps with PyAV (and the CPU path decodes with it): check once, up front,
    # rather than failing every video of the job with the same import error.
    require("av", "video", "video extraction", minimum=PYAV_MINIMUM, why=PYAV_MINIMUM_WHY)
    if decoder in ("nvdec", "hybrid"):
        check_nvdec(decoder, device)
    return decoder


def check_nvdec(decoder: str, device) -> None:
    """--decoder nvdec/hybrid need a CUDA device, an FFmpeg with the CUDA hwaccel, and NVDEC really
    decoding (a test clip): each missing piece is one error before the job, not a failure per video."""
    if device.type != "cuda":
        raise ValueError(f"--decoder {decoder} decodes on the GPU's NVDEC: it needs --device cuda (got {device})")
    try:
        from av.codec.hwaccel import hwdevices_available
    except ImportError:
        raise ValueError(f"--decoder {decoder} needs a PyAV with hardware decoding (av.codec.hwaccel): "
                         "pip install -U av") from None

    if "cuda" not in hwdevices_available():
        raise ValueError(f"--decoder {decoder}: the FFmpeg inside PyAV has no CUDA hwaccel here (hwdevices: "
                         f"{', '.join(hwdevices_available()) or 'none'}); use --decoder pyav or dali")
    from .video.decode_pyav import nvdec_problem

    problem = nvdec_problem(cuda_index(device))
    if problem:
        raise ValueError(f"--decoder {decoder}: NVDEC decode does not work on {device} ({problem}); "
                         "use --decoder pyav or dali")


def expand_inputs(inputs) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """INPUT(s) -> ([(video_id, path)], clashes [(video_id, path, reason)]); also accepts ready
    (video_id, path) pairs. A second file with an id already taken is a clash: reported as a failure
    of that file, so one naming accident does not stop a long job."""
    from .video.inputs import VIDEO_SUFFIXES, list_videos
    from .video.probe import not_a_file

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items, clashes, seen = [], [], {}   # seen: video id -> its position in items
    for item in inputs:
        if isinstance(item, str) and not item.strip():  # Path("") is the current folder: every video below it
            raise ValueError("an input is an empty string (an unset shell variable?); give a folder, glob, "
                             "video file or list of videos")
        pairs = [tuple(item)] if isinstance(item, (tuple, list)) else list_videos(item)
        for vid, path in pairs:
            vid, path = str(vid), str(path)
            if vid in seen:
                first = items[seen[vid]][1]
                if os.path.realpath(first) == os.path.realpath(path):  # one file listed twice is one input
                    continue
                missing = not_a_file(first)
                if missing and not not_a_file(path):
                    # A stale list entry does not take the id from a file that exists.
                    items[seen[vid]] = (vid, path)
                    clashes.append((vid, first, missing))
                else:
                    clashes.append((vid, path, f"video id {vid!r} is already used by {first}: rename one of "
                                               "the files, or list them in a CSV with a video_id column"))
                continue
            seen[vid] = len(items)
            items.append((vid, path))
    if not items:
        # Nothing to do is almost always a wrong path or pattern: say so instead of "0 done".
        raise ValueError(f"no videos found in {', '.join(map(str, inputs))} "
                         f"(folders are searched recursively for {', '.join(sorted(VIDEO_SUFFIXES))}; "
                         "a .txt/.csv list needs one path per line, '#' lines being comments)")
    return items, clashes


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def settle_ids_with_the_store(items: list[tuple[str, str]], clashes: list[tuple[str, str, str]],
                              sources: dict[str, str]) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Id clashes against what the store holds (expand_inputs settles them by listing order alone):
    - two inputs with one id, the stored one listed second: the stored file keeps its id (skipped as
      stored) and the other is the failure, as when both were new;
    - an input whose id the store holds from another file that still exists and differs in size: a
      failure naming the stored file (it was skipped as stored, with a log warning only). A copy of the
      stored file (same size: a staged or rsynced dataset) stays the same video, skipped; the store keeps
      no more of its source than the path, so a file replaced in place is skipped too."""
    items, clashes = list(items), list(clashes)
    position = {vid: k for k, (vid, _) in enumerate(items)}
    for c, (vid, path, _) in enumerate(clashes):
        source = sources.get(vid)
        if source and vid in position and _same_file(source, path):
            other = items[position[vid]][1]
            items[position[vid]] = (vid, path)
            clashes[c] = (vid, other, f"video id {vid!r} is already used by {path} (in the store): rename one of "
                                      "the files, or list them in a CSV with a video_id column")
    kept = []
    for vid, path in items:
        source = sources.get(vid, "")
        try:
            other = (source and Path(source).is_file() and Path(path).is_file() and not _same_file(source, path)
                     and os.path.getsize(source) != os.path.getsize(path))
        except OSError:
            other = False
        if other:
            clashes.append((vid, path, f"video id {vid!r} is in the store already, from {source}, a file of another "
                                       "size: rename one of them, or list them in a CSV with a video_id column"))
        else:
            kept.append((vid, path))
    return kept, clashes


def recorded_fingerprint(out: Path, weights) -> str:
    """The checkpoint's fingerprint as this store records it: the current kind, or the kind a store
    written before 2026-11-27 holds when it is this checkpoint's (so that job resumes)."""
    from .store import load_index
    from .video.encoders import FINGERPRINT_VERSION, legacy_weights_fingerprint, weights_fingerprint

    held = None
    if (Path(out) / "index.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            held = (load_index(out).get("settings") or {}).get("weights")
    if isinstance(held, str) and not held.startswith(FINGERPRINT_VERSION) and held == legacy_weights_fingerprint(weights):
        return held
    return weights_fingerprint(weights)


# -------------------------------------------------------------------------------------------- producers
def prepared(jobs: Iterable[VideoJob], spec: WindowSpec, partials: PartialVideos | None = None
             ) -> Iterator[VideoJob | Failed]:
    """Probe and plan each job; with `partials`, attach the windows a killed job already embedded."""
    for job in jobs:
        try:
            job = prepare_job(job, spec)
        except VideoError as err:
            yield Failed(job, str(err))
            continue
        except Exception as err:  # noqa: BLE001 - one odd file must not end the job
            yield Failed(job, f"probe error: {type(err).__name__}: {err}")
            continue
        if partials is not None:
            try:
                saved = partials.load(job.video_id, job.path, job.num_windows)
            except Exception as err:  # noqa: BLE001 - unreadable progress: start the video over
                log.warning("cannot read saved progress of %s (%s); starting it over", job.video_id, err)
                partials.drop(job.video_id)
                saved = None
            if saved is not None:
                job.saved_emb, job.skip = saved
                job.resumed_decoder = partials.saved_decoder(job.video_id)
                log.info("resuming %s: %d of %d windows already embedded", job.video_id, int(job.skip.sum()),
                         job.num_windows)
        yield job


def pyav_events(job: VideoJob, threads: int = 0, skip: np.ndarray | None = None, damage=None, hwaccel=None,
                on_software=None) -> Iterator[Window | Failed]:
    """A prepared video's windows decoded by PyAV: all but `skip` (default: the job's own, the windows a
    killed job embedded). `threads`: frame threads (0 = FFmpeg's choice); `damage`: a SharedDamage when
    other parts of the video are decoded elsewhere; `hwaccel`: NVDEC settings (decode_pyav.nvdec_accel);
    `on_software`: called if FFmpeg decodes in software instead (decode_windows_pyav)."""
    from .video.decode_pyav import decode_windows_pyav

    try:
        for w, frames, times in decode_windows_pyav(job.index, job.plan, threads=threads,
                                                    skip=job.skip if skip is None else skip, damage=damage,
                                                    hwaccel=hwaccel, on_software=on_software, deblock=job.deblock):
            yield Window(job, w, frames, times)
    except VideoError as err:
        yield Failed(job, str(err))
    except Exception as err:  # noqa: BLE001
        yield Failed(job, f"decode error: {type(err).__name__}: {err}")


def stood_in(win: Window) -> bool:
    """A frame of this window is not the one the plan samples: the decoder stood in for it (damaged
    data, or a cut file's lead-in), which video/partial.py must know of a saved window."""
    if win.times is None:
        return False
    planned = win.job.index.times[win.job.plan.frames[win.window]]
    return not np.allclose(np.asarray(win.times, np.float64), planned, rtol=0.0, atol=1e-9)


@dataclasses.dataclass(eq=False)
class DecodePart:
    """Consecutive windows of one video for one PyAV decode (None: all the job's windows)."""
    job: VideoJob
    windows: np.ndarray | None = None
    damage: object = None   # SharedDamage of the video's parts


# Near the end of the input, videos are cut into parts of at least this many windows, and of at least
# TAIL_GOPS_PER_PART keyframe intervals: a part decodes from the keyframe before its first frame, so a
# part of g GOPs decodes up to 1/g more than it delivers.
TAIL_MIN_WINDOWS = 2
TAIL_GOPS_PER_PART = 4


def tail_part_windows(index, num_windows: int, to_decode: int, videos_left: int, decodes_at_once: int,
                      part_windows: int) -> int:
    """Windows per part for a video of `num_windows` windows, `to_decode` of them left to decode (fewer
    when resumed), with `videos_left` - 1 videos after it. While at least `decodes_at_once` videos are
    left, `part_windows`. Fewer: about decodes_at_once / videos_left parts per video, so the last
    videos keep every decode busy (32 equal videos on 24 decodes would otherwise run a second wave of
    8 decodes beside 16 idle ones), but no part shorter than TAIL_MIN_WINDOWS windows or
    TAIL_GOPS_PER_PART keyframe intervals."""
    if videos_left >= decodes_at_once or to_decode < 2:
        return part_windows
    parts = -(-decodes_at_once // videos_left)
    return min(part_windows, max(shortest_tail_part(index, num_windows), -(-to_decode // parts)))


def shortest_tail_part(index, num_windows: int) -> int:
    """TAIL_MIN_WINDOWS windows or TAIL_GOPS_PER_PART keyframe intervals, whichever is longer."""
    gop_frames = index.num_frames / max(1, int(index.keyframe.sum()))
    frames_per_window = index.num_frames / max(1, num_windows)
    return max(TAIL_MIN_WINDOWS, math.ceil(TAIL_GOPS_PER_PART * gop_frames / frames_per_window))


def pyav_parts(jobs, spec: WindowSpec, partials=None, part_windows: int = 32,
               decodes_at_once: int = 1) -> Iterator[DecodePart | Failed]:
    """Probe the videos (ahead, in a thread) and cut each one that is longer than `part_windows` windows
    into parts of near-equal length, at most that many, so several workers share a long video (in-order consumption would
    otherwise leave them waiting on its one decode); the last videos are cut finer to keep
    `decodes_at_once` decodes busy (tail_part_windows). A part starts at the keyframe before its first
    frame, so only containers that seek by index are cut (in others every part would decode from the
    start of the file)."""
    from .video.decode_pyav import SharedDamage

    jobs = list(jobs)
    # prepared() yields one item per job, in order: the position says how many videos are left.
    items = in_background(lambda: prepared(jobs, spec, partials), maxsize=16)  # an index is ~17 B a frame
    for position, item in enumerate(items):
        if isinstance(item, Failed):
            yield item
            continue
        active = item.active_windows()
        size = tail_part_windows(item.index, item.num_windows, len(active), len(jobs) - position, decodes_at_once,
                                 part_windows)
        if len(active) <= size or not item.index.seeks_by_index:
            yield DecodePart(item)
            continue
        # Parts of near-equal length, at most `size`: a leftover part (21 windows in parts of 5 left 1) would
        # decode up to a GOP more than it delivers. Cut for the tail, none shorter than its floor either.
        floor = shortest_tail_part(item.index, item.num_windows) if size < part_windows else 1
        count = max(-(-len(active) // part_windows), min(-(-len(active) // size), len(active) // floor))
        damage = SharedDamage()
        for windows in np.array_split(active, count):
            yield DecodePart(item, windows, damage)


def decode_part(part: DecodePart | Failed, threads: int = 0, hwaccel=None, on_software=None
                ) -> Iterator[Window | Failed]:
    """One part's windows. A part that meets damage (a frame to stand in or flagged corrupt, a decode
    error): its windows from there on and all the video's windows after them come from one decode of the
    rest of the video from the start of the file, as one pass gives them (decoder state, stand-ins,
    damage budget, failure); the later parts are superseded, and what they delivered before they knew
    is dropped in extract's loop (windows already delivered). `hwaccel`, `on_software`: as pyav_events'."""
    if isinstance(part, Failed):
        yield part
        return
    job = part.job
    if part.windows is None:
        yield from pyav_events(job, threads, hwaccel=hwaccel, on_software=on_software)
        return
    from .video.decode_pyav import decode_windows_pyav

    index = job.index  # read once: extract releases it when the video is stored
    if index is None:
        return  # stored already: an earlier part's decode of the rest delivered these windows too
    damage, first = part.damage, int(part.windows[0])
    start = first   # the first window not delivered yet
    skip = np.ones(job.num_windows, bool)
    skip[part.windows] = False
    later = job.active_windows()
    later = later[later > part.windows[-1]]   # the next part starts at later[0]
    through = int(index.pts[job.plan.frames[later[0]]].min()) if len(later) else None
    try:
        for w, frames, times in decode_windows_pyav(index, job.plan, threads=threads, skip=skip,
                                                    damage=damage, through=through, hwaccel=hwaccel,
                                                    on_software=on_software, deblock=job.deblock):
            yield Window(job, w, frames, times)
            start = w + 1
        return
    except Exception as err:  # noqa: BLE001 - damage (or any error) here: the one decode of the rest decides
        log.info("%s: the part from window %d met damage (%s); decoding the rest from the start", job.path,
                 first, err)
    if damage.superseded(first):
        return  # an earlier part already decodes the rest
    damage.redo(first)
    one_pass = np.zeros(job.num_windows, bool) if job.skip is None else job.skip   # what one pass skips
    rest = one_pass.copy()
    rest[:start] = True
    try:
        for w, frames, times in decode_windows_pyav(index, job.plan, threads=threads, skip=rest,
                                                    damage=damage, redo=first, hwaccel=hwaccel,
                                                    one_pass_skip=one_pass, on_software=on_software,
                                                    deblock=job.deblock):
            yield Window(job, w, frames, times)
    except VideoError as err:  # as pyav_events reports it
        yield Failed(job, str(err))
    except Exception as err:  # noqa: BLE001
        yield Failed(job, f"decode error: {type(err).__name__}: {err}")


# Frame threads per PyAV decode instead of pyav_threads()'s count (None: that count). For measurements
# (bench/extract.py --frame-threads); a store's damaged videos depend on it, so extract has no flag.
FRAME_THREADS: int | None = None


# Nice value added to the threads of CPU decodes (PyAV in software; FFmpeg's frame threads inherit it),
# each run in a thread of its own: when the cores are all decoding, the threads that feed the GPU (NVDEC
# decodes of --decoder hybrid, the encoder's loop) still run as soon as they can. 0 = off. Opt-in
# (bench/extract.py --cpu-decode-nice N) until a GPU host shows that it helps: on an H200 (2026-11-27)
# hybrid, 16 CPU + 8 NVDEC decodes on 16 cores, ran slower (47.3x realtime) than PyAV alone (57.3x).
CPU_DECODE_NICE = 0

# torch's GPU work of extract off the legacy default stream: each decode thread uploads and preprocesses
# its windows on a CUDA stream of its own (and waits for them there), the encoder runs on another. On the
# default stream every upload from pageable memory waits for the encoder batch queued before it (a
# decode thread stalls meanwhile), and so do the NVDEC decodes' per-frame copies when they share torch's
# context (decode_pyav.NVDEC_SHARED_CONTEXT: FFmpeg copies on that context's default stream). Opt-in
# (bench/extract.py --side-streams) until a GPU host shows it faster; the embeddings are the same.
SIDE_STREAMS = False


def pyav_threads() -> int:
    """Frame threads per decode: the CPUs shared out among 8 decodes (fewer on hosts with fewer CPUs),
    whatever --decode-workers is. FFmpeg conceals damaged data differently with another thread count, so
    a count that followed --decode-workers would make the store of a damaged video depend on it. (8 was
    the default worker count until 2026-11-26; kept so stores stay what they were.) FRAME_THREADS
    overrides it."""
    if FRAME_THREADS:
        return FRAME_THREADS
    from .video.ordered import usable_cpus

    cpus = usable_cpus()
    return max(1, cpus // max(1, min(8, cpus)))


def dali_producer(jobs, spec, device, readers, batch_size, partials=None, dali_api: str = DEFAULT_DALI_API):
    from .video.decode_dali import decode_windows_dali

    dali_device = "gpu" if device.type == "cuda" else "cpu"
    device_id = (device.index or 0) if device.type == "cuda" else None
    # Probing (a demux of every file) runs ahead in a thread while DALI decodes the previous chunk.
    probed = in_background(lambda: prepared(jobs, spec, partials), maxsize=256)
    for event in decode_windows_dali(probed, spec, device=dali_device, device_id=device_id, readers=readers,
                                     batch_size=max(1, batch_size), dali_api=dali_api):
        if isinstance(event, VideoJob):  # DALI could not take it: PyAV decodes it (any codec)
            event.decoded_by = "pyav (fallback)"
            yield from pyav_events(event, pyav_threads())  # the count --decoder pyav uses: the same concealment
        else:
            if isinstance(event, Window):
                event.job.decoded_by = "dali"
            yield event


class GpuStreams:
    """extract's CUDA streams when SIDE_STREAMS is on: one per preprocessing thread, one for the encoder."""

    def __init__(self, device):
        import torch

        self.device = device
        self.encoder = torch.cuda.Stream(device)
        self._local = threading.local()

    @contextlib.contextmanager
    def preprocessing(self):
        """Run the block on this thread's stream and wait for it there: the window's tensor is complete when
        it reaches the encoder's stream (a decode thread, not the encoder, waits)."""
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after what this thread queued before (DALI's copies)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    @contextlib.contextmanager
    def encoding(self, windows):
        """Run the block on the encoder's stream; the windows' tensors, made on other streams, are marked
        used by it (the allocator then keeps their memory until the encoder's work on them is done)."""
        import torch

        for win in windows:
            win.frames.record_stream(self.encoder)
        with torch.cuda.stream(self.encoder):
            yield


# --------------------------------------------------------------------------------------------- the loop
class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            # disable=None: no bar when stderr is not a terminal (a CI log or `2>log` got a frame glued to
            # every log line); the log lines say the same.
            self.bar = tqdm(total=total, initial=initial, unit="video", dynamic_ncols=True, desc="extract",
                            disable=None)
        self.start = time.perf_counter()
        self.windows = 0
        self.video_seconds = 0.0

    def update(self, videos: int = 0, windows: int = 0, video_seconds: float = 0.0, current: str = ""):
        """`current`: how far the video in flight is (an hours-long one holds the video count still)."""
        self.windows += windows
        self.video_seconds += video_seconds
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            if videos:
                self.bar.update(videos)
            # Refreshed after every encoder batch, not only when a video completes: an hours-long
            # video would otherwise show nothing until its end.
            self.bar.set_postfix_str(f"{self.windows} windows, {self.windows / elapsed:.1f} win/s, "
                                     f"{self.video_seconds / elapsed:.1f} video-s/s"
                                     + (f", {current}" if current else ""), refresh=windows > 0)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def extract_videos(inputs, out_store, encoder: str = "tiny", weights=None, seconds: float = 5.0,
                   frames: int = 8, sampling: str = "time", min_last: float = 0.5, decoder: str = "auto",
                   batch_size: int = 32, device: str = "auto", precision: str = "auto", readers: int = 4,
                   seed: int = 0, progress: bool = False, decode_workers: int = 0, dali_api: str = DEFAULT_DALI_API,
                   nvdec_workers: int = 0, skip_deblocking: bool = False) -> dict:
    """Extract window embeddings of every input video into the store at `out_store`; return a summary.

    inputs: a folder, glob, video file, .txt/.csv list, or a list of those / of (video_id, path) pairs.
    See `lvmae extract --help` for the meaning of each option.
    """
    import torch

    from .store import StoreWriter
    from .video.encoders import build_encoder
    from .video.preprocess import frames_to_input

    if not segment_seconds_ok(seconds):  # inf would reach the store's settings
        raise ValueError(f"window seconds must be a finite number >= {MIN_SEGMENT_SECONDS:g}, got {seconds}")
    if frames < 1 or batch_size < 1:
        raise ValueError("frames per window and batch size must be >= 1")
    if decode_workers < 0:
        raise ValueError(f"--decode-workers must be >= 0 (0 = one per CPU, at most 16), got {decode_workers}")
    if nvdec_workers < 0:
        raise ValueError(f"--nvdec-workers must be >= 0 (0 = {DEFAULT_NVDEC_SLOTS}), got {nvdec_workers}")
    if readers < 1:  # 0 DALI pipelines would decode nothing; checked for any decoder, as the other counts
        raise ValueError(f"--readers (DALI pipelines) must be >= 1, got {readers}")
    workers = decode_workers or default_decode_workers()
    nvdec_slots = nvdec_workers or DEFAULT_NVDEC_SLOTS
    if dali_api not in DALI_APIS:
        raise ValueError(f"--dali-api must be one of {', '.join(DALI_APIS)}, got {dali_api!r}")
    if not 0.0 <= min_last <= 1.0:  # checked here, not per video: a bad value must not reach the store's settings
        raise ValueError(f"--min-last must be in [0, 1] (a fraction of a window), got {min_last}")
    if not in_torch_seed_range(seed):
        raise ValueError(f"--seed must be in [-2^63, 2^64), got {seed}")
    spec = WindowSpec(seconds=float(seconds), frames=int(frames), rule=sampling, min_last=float(min_last))
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    backend = resolve_decoder(decoder, dev)  # first: a missing PyAV is named even when the input is wrong too
    if skip_deblocking and backend != "pyav":
        raise ValueError(f"--skip-deblocking applies to PyAV's software decodes (--decoder pyav or auto), not "
                         f"--decoder {backend}: NVDEC always deblocks, and a store's windows must come from one "
                         "kind of decode")
    items, clashes = expand_inputs(inputs)
    # An encoder object is accepted too (benchmarks, notebooks); the store records its name.
    given_model = isinstance(encoder, torch.nn.Module)
    model = encoder if given_model else build_encoder(encoder, weights=weights, seed=seed)
    encoder = model.name
    model.check_frames(spec.frames)
    model = model.to(device=dev, dtype=dtype)

    out = Path(out_store)
    started = time.perf_counter()
    counts = {"done": 0, "skipped": 0, "failed": 0}
    # Everything that decides what a window's embedding is: a resumed job must match it.
    resample = getattr(model, "resample", "bilinear")  # the encoder's resize filter (video/preprocess.py)
    resize, style = getattr(model, "resize", None), getattr(model, "preprocess_style", "transformers")
    settings = {"window_seconds": spec.seconds, "frames": spec.frames, "sampling": spec.rule, "min_last": spec.min_last,
                "resample": resample}
    # Recorded only where they differ from the defaults, so stores written before they existed resume.
    if resize is not None and resize != model.image_size:
        settings["resize"] = list(resize) if isinstance(resize, tuple) else int(resize)
    if style != "transformers":
        settings["preprocess_style"] = style
    if skip_deblocking:
        settings["deblocking"] = "skipped"
    if weights and not given_model:
        settings["weights"] = recorded_fingerprint(out, weights)  # another checkpoint under the same encoder name
    elif not given_model:
        settings["seed"] = int(seed)  # random weights (tiny, or a model built from its config): the seed makes them
    with StoreWriter(out, dim=model.dim, encoder=encoder, segment_seconds=spec.seconds, settings=settings) as writer:
        # This run's failures (re-runs retry failed files). Unbuffered: a failed write (disk full) is
        # reported where it happens, and close() has nothing left to fail on.
        failures = open(out / FAILURES_NAME, "wb", buffering=0)
        # Saved windows resume only under the same decoder, device and precision: their pixels and
        # rounding differ, and one video's windows should come from one of them.
        partials = PartialVideos(out, model.dim, settings={**settings, "encoder": encoder, "seed": seed,
                                                           "decoder": f"{backend}/{dev.type}",
                                                           "precision": str(dtype).replace("torch.", ""),
                                                           "frame_index": INDEX_VERSION})
        partials.remove_committed(writer.contains)
        items, clashes = settle_ids_with_the_store(items, clashes, writer.sources())
        todo = []
        for vid, path in items:
            if writer.contains(vid):
                counts["skipped"] += 1
            else:
                todo.append(VideoJob(video_id=vid, path=path, deblock=not skip_deblocking))
        bar = _Progress(len(items) + len(clashes), counts["skipped"], progress)
        decoded_by: Counter[str] = Counter()  # videos stored, by the decoder that produced them
        log.info("extract: %d videos (%d already in %s), encoder %s (d=%d) on %s %s, decoder %s%s",
                 len(items), counts["skipped"], out, encoder, model.dim, dev, str(dtype).replace("torch.", ""),
                 backend, f" ({workers} videos at once)" if backend in ("pyav", "nvdec") else
                 f" ({workers} decodes at once: new videos on NVDEC while fewer than {nvdec_slots} NVDEC decodes "
                 "run, else on the CPU; a long video's parts stay on its first part's decoder)" if backend == "hybrid"
                 else "")

        state: dict[int, dict] = {}          # id(job) -> {"emb": [n, d], "filled": bool[n], "failed": bool}
        batch: list[Window] = []

        def fail(job: VideoJob, reason: str):
            st = state.get(id(job))
            if st is not None and (st.get("failed") or st.get("done")):
                return
            state[id(job)] = {"failed": True}
            counts["failed"] += 1
            partials.drop(job.video_id, job.path)  # saved windows of this file, which cannot be finished
            log.warning("skip %s: %s", job.path, reason)
            line = (json.dumps({"path": job.path, "video_id": job.video_id, "reason": reason}) + "\n").encode()
            try:
                append_whole(failures, line)  # no torn line
            except OSError as err:
                raise write_error(f"could not write to {out / FAILURES_NAME} (recording that {job.path} failed: "
                                  f"{reason})", err) from err
            bar.update(videos=1)

        streams = GpuStreams(dev) if SIDE_STREAMS and dev.type == "cuda" else None

        def encode(windows: list[Window]):
            # Frames arrive already preprocessed (to_input): [T, 3, size, size] each, one shape.
            with torch.inference_mode(), (streams.encoding(windows) if streams else contextlib.nullcontext()):
                emb = model.encode_video(torch.stack([win.frames for win in windows])).float().cpu().numpy()
            if emb.shape[1:] != (model.dim,):  # e.g. an exported tower whose json states another dim
                raise ValueError(f"encoder {encoder!r} gave embeddings of shape {list(emb.shape[1:])} per window, "
                                 f"but declares dim {model.dim}: fix its config")
            completed, touched = [], {}
            for win, e in zip(windows, emb):
                st = state.get(id(win.job))
                if st is None or st.get("failed") or st.get("done"):
                    continue
                st["emb"][win.window] = e
                st["filled"][win.window] = True
                st["stood_in"][win.window] = stood_in(win)
                touched.setdefault(id(win.job), (win.job, []))[1].append(win.window)
                if st["filled"].all():
                    job = win.job
                    try:
                        writer.add(job.video_id, st["emb"], source_path=os.path.realpath(job.path),
                                   window_times=job.plan.times)
                    except ValueError as err:  # e.g. NaN/Inf from the encoder: this video only
                        fail(job, f"embedding rejected: {err}")
                        continue
                    st["done"] = True
                    st.pop("emb")
                    # The job object stays (state is keyed by its id), its frame index need not: ~2 MB per hour
                    # of 30 fps video, held for the whole job (10 GB over 5000 hours). Decodes still running
                    # hold their own reference; a part of it that starts later finds None and stops
                    # (decode_part: an earlier part's redo delivered its windows).
                    job.index = None
                    counts["done"] += 1
                    decoded_by[NVDEC_FALLBACK if job.software_fallback else job.decoded_by or backend] += 1
                    completed.append(job)
                    bar.update(videos=1)
            current = ""
            last = state.get(id(windows[-1].job)) if windows else None
            if last is not None and "filled" in last and not last.get("done"):
                current = f"{windows[-1].job.video_id}: {int(last['filled'].sum())}/{len(last['filled'])} windows"
            bar.update(windows=len(windows), video_seconds=float(sum(
                win.job.plan.times[win.window, 1] - win.job.plan.times[win.window, 0] for win in windows)),
                current=current)
            if completed:
                writer.commit()  # only complete videos are ever committed
                for job in completed:
                    partials.drop(job.video_id)
            # Unfinished videos keep this batch's windows beside the store: a kill loses only the batch
            # in flight, however many batches a long video spans (video/partial.py).
            for job, done_windows in touched.values():
                st = state[id(job)]
                if not st.get("done") and not st.get("failed"):
                    partials.save(job.video_id, job.path, job.num_windows, np.asarray(done_windows),
                                  st["emb"][done_windows], decoded_by=job.decoded_by,
                                  stood_in=st["stood_in"][done_windows])

        # The jobs stay referenced for the whole run: `state` is keyed by id(job), and a freed job's id
        # would be reused by the next one, whose failure would then look recorded already.
        clash_jobs = [(VideoJob(video_id=vid, path=path), reason) for vid, path, reason in clashes]
        for job, reason in clash_jobs:
            fail(job, reason)

        def to_input(source):
            """Each window's frames -> encoder input as it arrives, so queues and batches hold
            [T, 3, size, size] inputs, not full-resolution frames (at 1080p, 50 MB a window in uint8)."""
            for event in source:
                if isinstance(event, Window):
                    # not held across the yield: the consumer's thread state
                    with torch.inference_mode(), (streams.preprocessing() if streams else contextlib.nullcontext()):
                        raw = torch.as_tensor(event.frames)[None].to(dev, non_blocking=True)
                        event.frames = frames_to_input(raw, model.image_size, model.mean, model.std, dtype,
                                                       resample, resize, style)[0]
                yield event

        if backend in PYAV_BACKENDS:
            # nvdec: the same decodes on the GPU's NVDEC engines (one session per decode), frames matched,
            # skipped and stood in for by the same code; hybrid: both at once, each video on one
            # (video/hybrid.py).
            hwaccel = None
            if backend in ("nvdec", "hybrid"):
                from .video.decode_pyav import nvdec_accel

                index = cuda_index(dev)
                hwaccel = lambda: nvdec_accel(index)  # noqa: E731 - settings built per decode
            # Decode and preprocess in `workers` threads (several videos, or parts of a long one, at once),
            # overlapping the encoder. Windows still arrive in input order, so batches and the store are
            # those of one worker. A worker can run ahead by its whole part (the queue holds it), which is
            # what lets the others work while the consumer drains the part in front.
            threads = pyav_threads()
            part_windows = max(8, batch_size)

            def delivered_once(decoded):
                # A part that met damage delivers the rest of its video (decode_part); the windows the
                # parts after it had delivered before they stopped come again: dropped here.
                last: dict[int, int] = {}
                try:
                    for event in decoded:
                        if isinstance(event, Window):
                            if event.window <= last.get(id(event.job), -1):
                                continue
                            last[id(event.job)] = event.window
                        yield event
                finally:
                    decoded.close()  # stops the decode threads now

            share = DecoderShare(nvdec_slots) if backend == "hybrid" else None

            def decode(part):
                if not isinstance(part, DecodePart):  # a probe failure: nothing to decode
                    yield from decode_part(part)
                    return
                job = part.job
                # The decoder of this part (hybrid: chosen as it starts); the summary counts videos by it.
                job.decoded_by = share.start(job, pinned=job.resumed_decoder) if share else backend
                on_nvdec = job.decoded_by == "nvdec"
                windows = lambda: to_input(decode_part(part, threads, hwaccel if on_nvdec else None,  # noqa: E731
                                                       lambda: software_fallback(job)))
                try:
                    if CPU_DECODE_NICE and not on_nvdec:
                        yield from in_background(windows, maxsize=part_windows + 1, nice=CPU_DECODE_NICE)
                    else:
                        yield from windows()
                finally:
                    if share:
                        share.finish(job)

            decodes_at_once = workers + (nvdec_slots if share else 0)
            events = delivered_once(ordered_parallel(pyav_parts(todo, spec, partials, part_windows, decodes_at_once),
                                                     decode, workers=decodes_at_once, depth=part_windows + 1))
        else:
            events = to_input(dali_producer(todo, spec, dev, readers, batch_size, partials, dali_api))
        try:
            for event in events:
                if isinstance(event, Failed):
                    fail(event.job, event.reason)
                    continue
                st = state.get(id(event.job))
                if st is None:
                    job, n = event.job, event.job.num_windows
                    if job.skip is not None:  # windows a killed job embedded (video/partial.py)
                        st = state[id(job)] = {"emb": job.saved_emb, "filled": job.skip.copy()}
                    else:
                        st = state[id(job)] = {"emb": np.zeros((n, model.dim), np.float32),
                                               "filled": np.zeros(n, bool)}
                    st["stood_in"] = np.zeros(n, bool)
                if st.get("failed") or st.get("done"):
                    continue
                batch.append(event)
                if len(batch) >= batch_size:
                    encode(batch)
                    batch = []
            if batch:
                encode(batch)
            # A job whose decoder stopped without an error or all its windows is a failure too.
            for job in todo:
                st = state.get(id(job))
                if st is None:
                    fail(job, "decoder returned no windows")
                elif not st.get("failed") and not st.get("done"):
                    fail(job, "decoder returned only some windows")
            # Per-batch commits left about one small shard per batch: merge them now that the job is done
            # (not in `finally`: an interrupted job keeps its commits and exits promptly).
            writer.compact()
        finally:
            getattr(events, "close", lambda: None)()  # stop the decode thread / DALI pipelines now
            bar.close()
            failures.close()

    wall = time.perf_counter() - started
    summary = {**counts, "total": len(items) + len(clashes), "windows": bar.windows,
               "video_seconds": round(bar.video_seconds, 3), "wall_seconds": round(wall, 3),
               "realtime_factor": round(bar.video_seconds / max(wall, 1e-9), 2),
               "store": str(out), "failures": str(out / FAILURES_NAME), "encoder": encoder, "decoder": backend,
               "decoded_by": dict(decoded_by), "device": str(dev),
               "decode_workers": workers if backend in PYAV_BACKENDS else None,
               "nvdec_workers": nvdec_slots if backend == "hybrid" else None}
    log.info("extract finished: %d done, %d skipped (already in store), %d failed (see %s); %d windows "
             "encoded, %.1f video-s in %.1f s (%.1fx realtime)", counts["done"], counts["skipped"], counts["failed"],
             summary["failures"], bar.windows, bar.video_seconds, wall, summary["realtime_factor"])
    return summary


# ------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="embed long videos window by window into an embedding store",
        description="Cut each video into S-second windows [0,S), [S,2S), ... (a trailing partial window is kept "
                    "when it covers >= --min-last of a window), decode T frames per window, embed them with a "
                    "frozen encoder and write one row per window to STORE. Unreadable files are listed in "
                    "STORE/failures.jsonl and skipped; re-running resumes.")
    p.add_argument("input", help="folder (recursive; hidden files and folders left out), glob (quote it), video "
                                 "file, or a UTF-8 list of videos: .txt, one path per line ('#' lines are comments), or "
                                 ".csv with a 'path' column and an optional 'video_id' column, or headerless with paths in its "
                                 "first column; relative paths "
                                 "resolve against the list's folder")
    p.add_argument("--encoder", required=True, help="tiny | clip-mean | xclip | languagebind | internvideo2")
    p.add_argument("--weights", default=None, help="local checkpoint dir (never downloaded); tiny needs none")
    p.add_argument("--out", required=True, help="embedding store directory (created or resumed)")
    p.add_argument("--seconds", type=float, default=5.0, help="window length S in seconds (default 5; 10/15 ok)")
    p.add_argument("--frames", type=int, default=8, help="frames per window T (default 8)")
    p.add_argument("--sampling", choices=("time", "index"), default="time",
                   help="time: T frames at equal time steps (VFR-correct, default); index: DALI-style linspace "
                        "over the window's frame indices")
    p.add_argument("--min-last", type=float, default=0.5,
                   help="keep the trailing partial window if it is at least this fraction of S (default 0.5; "
                        "1 drops it)")
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="auto = pyav (several videos at once; on an H200 host with 16 cores, 1080p camera-like "
                        "H.264: 61.6-62.9x realtime end to end with 16 at once, against 24.5x for DALI's decoder API "
                        "and 21.1x for its reader); nvdec = the same PyAV decodes on the GPU's NVDEC through FFmpeg's "
                        "CUDA hwaccel (--device cuda; 43-58x there, rates that may have been FFmpeg's silent software "
                        "fallback, which extract now checks for); hybrid = both at once, each video on NVDEC while "
                        "fewer than --nvdec-workers NVDEC decodes run, else on the CPU (47.3x there, against 57.3x "
                        "for pyav in the same run); "
                        "dali = NVDEC on GPU (needs nvidia-dali), DALI CPU on --device cpu (VP8/VP9/MJPEG; other "
                        "codecs fall back to PyAV)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per encoder batch (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto = fp16 on GPU, fp32 on CPU")
    # None: not given (run() refuses them with another decoder, where they would be silently ignored).
    p.add_argument("--readers", type=int, default=None,
                   help="--decoder dali: parallel DALI pipelines (NVDEC sessions), default 4")
    p.add_argument("--dali-api", choices=DALI_APIS, default=None,
                   help="with --decoder dali: reader = fn.experimental.readers.video, one sample per sampled frame "
                        "(default; measured on an H200); decoder = in-memory fn.decoders.video, one sample per "
                        "video or run of windows (long videos and mp4s cut by an edit list still go to the reader). "
                        "On an H200, camera-like 1080p H.264: decoder 24.5x realtime end to end, reader 21.1x; "
                        "decoder's frames are checked against the reader's on DALI CPU (VP9) only")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="PyAV decodes run at once: videos, or parts of a long one (0 = one per CPU, at most 16); "
                        "windows still reach the encoder in input order, so the store is the same for any value")
    p.add_argument("--nvdec-workers", type=int, default=0,
                   help=f"--decoder hybrid: a new video goes to NVDEC while fewer than this many NVDEC decodes run, "
                        f"else to the CPU (0 = {DEFAULT_NVDEC_SLOTS}, which saturated an H200's NVDEC engines); the "
                        "parts of a long video stay on its first part's decoder, so either side may run up to "
                        "--decode-workers + --nvdec-workers decodes at once")
    p.add_argument("--skip-deblocking", action="store_true",
                   help="PyAV decodes skip the in-loop deblocking filter of H.264, HEVC and VP8 (other codecs decode "
                        "as usual): 1.18-1.25x the decode rate on 1080p camera-like H.264 (a 2-core CPU box), frames "
                        "that differ by the blocking it smooths (0.75 levels of 255 on average there). Off by "
                        "default; recorded in the store, whose later runs must use the same setting")
    p.add_argument("--seed", type=int, default=0, help="init seed of the tiny encoder")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (none either when stderr is not a terminal: logs get plain lines)")
    p.set_defaults(func=run)


# The summary's `decoded_by` name of a video NVDEC was given but FFmpeg's software decoder decoded.
NVDEC_FALLBACK = "pyav (nvdec fallback)"


def software_fallback(job: VideoJob) -> None:
    """Given NVDEC, FFmpeg decoded (a part of) this video in software, on the CPU: said once per video, and
    counted apart in the summary, so that an NVDEC run's speed is not read as NVDEC's."""
    if not job.software_fallback:
        job.software_fallback = True
        log.warning("%s: NVDEC did not decode this video (FFmpeg's software decoder did, on the CPU); counted "
                    "as %r in the summary", job.path, NVDEC_FALLBACK)


def decoded_by_text(counts: dict) -> str:
    """A summary's `decoded_by` as printed: 'dali 2, pyav (fallback) 1'."""
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


def run(args) -> int:
    if args.nvdec_workers > 0 and args.decoder != "hybrid":  # else silently ignored: say so
        raise ValueError(f"--nvdec-workers applies to --decoder hybrid only (got --decoder {args.decoder}; "
                         "--decoder nvdec runs --decode-workers decodes on NVDEC)")
    dali_flags = [flag for flag, value in (("--readers", args.readers), ("--dali-api", args.dali_api))
                  if value is not None]
    if dali_flags and args.decoder != "dali":  # auto never picks DALI (resolve_decoder)
        raise ValueError(f"{' and '.join(dali_flags)} appl{'y' if len(dali_flags) > 1 else 'ies'} to --decoder dali "
                         f"only (got --decoder {args.decoder}); PyAV's decodes at once are --decode-workers")
    summary = extract_videos(args.input, args.out, encoder=args.encoder, weights=args.weights, seconds=args.seconds,
                             frames=args.frames, sampling=args.sampling, min_last=args.min_last,
                             decoder=args.decoder, batch_size=args.batch_size, device=args.device,
                             precision=args.precision, readers=4 if args.readers is None else args.readers,
                             seed=args.seed, progress=not args.no_progress, decode_workers=args.decode_workers,
                             dali_api=args.dali_api or DEFAULT_DALI_API, nvdec_workers=args.nvdec_workers,
                             skip_deblocking=args.skip_deblocking)
    by = decoded_by_text(summary["decoded_by"])
    print(f"extract: {summary['done']} done, {summary['skipped']} skipped (already in store), "
          f"{summary['failed']} failed (see {summary['failures']}); {summary['windows']} windows, "
          f"{summary['realtime_factor']}x realtime{f'; decoded by {by}' if by else ''}")
    if summary["failed"] and not summary["done"] and not summary["skipped"]:
        # Still exit 0 (the job finished; the interface promises it), but a script should not read it as work done.
        print(f"extract: warning: every input failed, nothing is in {args.out} from this run (reasons in "
              f"{summary['failures']}; relative paths in a list file resolve against the list's folder)",
              file=sys.stderr)
    return 0
