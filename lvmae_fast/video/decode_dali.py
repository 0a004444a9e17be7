"""DALI decoding (GPU: NVDEC, frames stay on the GPU; CPU: VP8/VP9/MJPEG only) of planned windows.

Two ways to drive DALI (`dali_api`); both decode the frame indices of the plan (probe.py's index:
presentation order) and give the same windows:

"decoder": DALI's in-memory decoder, fn.decoders.video (device "mixed" on GPU, "cpu" on
CPU), fed by fn.external_source: one sample = one video's file bytes and the sorted distinct frame
indices of a run of its windows (a part: at most PART_WINDOWS windows and one encoder batch), so all
the frames of a window come out of one sample, with no per-frame seek. Frame times come from the
probe's index (the decoder outputs none). DALI 2.4 builds no frame index for in-memory data, so this
decoder cannot seek: a sample decodes its file from the first frame up to the last frame it asks for
(measured on CPU: time linear in the frame index; a repeated index decodes the file again). A video
cut into P parts is thus decoded about (P+1)/2 times; a long one that would cost more than
MAX_DECODE_PASSES decodes goes to the reader API below, which seeks by its index. Without an index,
this API's frame k is the k-th frame the decoder outputs from the start of the file: frame k of the
probe's index as long as the stream has no packet the index leaves out (an edit list's discarded frames; a container that
declares another frame count goes to the reader API too) and every packet decodes to one frame (a
stream whose decoder drops frames would shift the later ones; pad_mode="none" at least makes a file
shorter than planned an error, not black frames).

"reader" (default, the one measured on a GPU): DALI's current reader, fn.experimental.readers.video (variable-frame-rate safe), fed a
file_list with exact frame ranges (file_list_format="frames"):
- rule "index": one line per window `path label a b`, sequence_length=T, uniform_sample=True; DALI
  picks round_half_up(linspace(a, b-1, T)), which windows.uniform_index_sample reproduces;
- rule "time": one line per distinct sampled frame `path label f f+1`, sequence_length=1 (DALI cannot
  take arbitrary indices in one sample). Lines are in frame order, and DALI keeps one decoder per file
  and decodes forward without seeking inside a GOP, so this decodes what the per-window form decodes.
Labels are our slot ids, so every decoded sample maps back to (video, window/frame) even if DALI
skips a file it cannot open (it does so with only a warning). Frame times are DALI's.

Throughput (both): videos are split over several pipelines ("readers"; NVDEC decodes sessions in
parallel, and the decoder API also decodes the samples of a batch side by side), each pipeline
prefetches (DALI runs ahead asynchronously), so the next batches decode while the encoder works on
this one. Videos are processed in chunks (pipelines rebuilt per chunk). A batch DALI fails on (damaged
data) names no file: the video it was most likely decoding is decoded alone next (its windows not
delivered yet) and the pipeline restarts after it; only a video DALI fails on alone goes to PyAV, so a
wrong guess costs a pipeline, not a good video's decode by PyAV.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np

from .jobs import Failed, VideoJob, Window, WindowSpec
from .probe import indexed_stream

log = logging.getLogger(__name__)

DALI_APIS = ("decoder", "reader")
# The reader is the default: it is the API measured on a GPU (H200, 2026-11-26: correct, 1032 frames/s of
# 1080p H.264 over 4 readers); the decoder API has run on DALI's CPU backend only.
DEFAULT_DALI_API = "reader"
DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg", "libvpx", "libvpx-vp9"}
# What fn.decoders.video's mixed backend opens (FramesDecoderGpu's list, PyAV's decoder names). MJPEG is
# in the docs' list for both backends but not in that one: PyAV decodes it rather than a whole batch
# failing on it (a failed batch can send a good video of it to PyAV too).
DALI_GPU_CODECS = {"h264", "hevc", "vp8", "vp9", "libvpx", "libvpx-vp9", "av1", "libdav1d", "libaom-av1",
                   "mpeg4"}
# Decoder API: windows per sample at most. A sample's frames are one output tensor (T frames a window:
# 32 windows of 8 1080p frames = 1.6 GB), so this bounds GPU memory per sample; a part is also kept
# within one encoder batch (batches hold at most batch_size windows, as the reader's "index" batches).
PART_WINDOWS = 32
# Decoder API: a video whose parts would decode more than this many times its frames (each part decodes
# from the file's first frame) goes to the reader API, which seeks. 2 passes = up to 3 equal parts.
MAX_DECODE_PASSES = 2.0


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def split_over_readers(jobs: list[VideoJob], readers: int) -> list[list[VideoJob]]:
    """Whole videos per reader (each reader walks its files forward), balanced by window count."""
    shards = [[] for _ in range(max(1, min(readers, len(jobs))))]
    load = [0] * len(shards)
    for job in sorted(jobs, key=lambda j: -j.num_windows):
        k = int(np.argmin(load))
        shards[k].append(job)
        load[k] += job.num_windows
    order = {id(j): i for i, j in enumerate(jobs)}
    for shard in shards:  # restore input order inside a shard: commits come out in a stable order
        shard.sort(key=lambda j: order[id(j)])
    return [s for s in shards if s]


class _Shard:
    """One pipeline: its videos, the label -> (job, ...) map of its samples, progress through its epoch.
    `left(job)`: the windows it decodes of each (default: those no killed job embedded)."""

    def __init__(self, jobs: list[VideoJob], left=VideoJob.active_windows):
        self.jobs = jobs
        self.left = left
        self.slots: list[tuple] = []   # label -> (job, what the sample holds of it)
        self.seen = 0   # samples taken from the pipeline
        self.total = 0  # samples in its epoch
        self.pipe = None
        self.last_label: int | None = None  # label of the last sample taken from this pipeline

    def after_failure(self, done_jobs: set[int]) -> tuple[VideoJob | None, list[VideoJob]]:
        """DALI failed on a batch: (the job it was most likely decoding, the jobs after it).

        Samples come in job order, so nothing after the job of the last sample taken has been
        delivered; the failing file is that job if it is unfinished, else the next one. A guess: DALI
        prefetches, and a pipeline that fails before its first sample says nothing (_decode_chunk
        decodes the guess alone to find out)."""
        start = 0
        if self.last_label is not None:
            owner = self.slots[self.last_label][0]
            start = next(i for i, j in enumerate(self.jobs) if j is owner)
            if id(owner) in done_jobs:
                start += 1
        if start >= len(self.jobs):
            return None, []
        return self.jobs[start], self.jobs[start + 1:]


class _ReaderShard(_Shard):
    """Reader API: one reader's file_list; a slot is (job, window or frame index)."""

    def __init__(self, jobs: list[VideoJob], rule: str, folder: str, k: int, left=VideoJob.active_windows):
        super().__init__(jobs, left)
        self.rule = rule
        lines = []
        for job in jobs:
            path = os.path.abspath(job.path)
            if any(c.isspace() for c in path):
                # file_list lines are whitespace-separated: point DALI at a link with a plain name.
                suffix = os.path.splitext(path)[1]
                link = os.path.join(folder, f"r{k}-{len(lines)}{'' if any(c.isspace() for c in suffix) else suffix}")
                os.symlink(path, link)
                path = link
            active = left(job)  # not those a killed job already embedded (nor, retried, those delivered)
            if rule == "index":
                for w in active:
                    a, b = job.plan.ranges[w]
                    lines.append(f"{path} {len(self.slots)} {int(a)} {int(b)}")
                    self.slots.append((job, int(w)))
            else:
                for f in np.unique(job.plan.frames[active]):
                    lines.append(f"{path} {len(self.slots)} {int(f)} {int(f) + 1}")
                    self.slots.append((job, int(f)))
        self.file_list = os.path.join(folder, f"reader{k}.txt")
        with open(self.file_list, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.source = self.file_list

    def epoch_size(self) -> int:
        return self.pipe.epoch_size("reader")


def video_parts(job: VideoJob, part_windows: int, left=VideoJob.active_windows) -> list[np.ndarray]:
    """The job's windows still to decode (`left`), in runs of at most `part_windows` (one sample each)."""
    active = left(job)  # windows a killed job already embedded are not decoded again
    return [active[s:s + part_windows] for s in range(0, len(active), part_windows)]


def suits_decoder_api(job: VideoJob, part_windows: int) -> bool:
    """The in-memory decoder cannot seek (module docstring): each part decodes its file from the first
    frame to its last needed frame. True when that stays within MAX_DECODE_PASSES times the video."""
    decoded = sum(int(job.plan.frames[part].max()) + 1 for part in video_parts(job, part_windows))
    return decoded <= MAX_DECODE_PASSES * max(job.index.num_frames, 1)


def reader_times_hold(job: VideoJob) -> bool:
    """False for a stream whose first frame is before time 0 (a webm muxed without avoid_negative_ts):
    DALI 2.4's reader gives the right frames there but not their timestamps (0.1/0.3/0.6/0.8 s for frames
    at 0.2/0.7/1.2/1.7 s from the first), which would mark every window stood in. PyAV takes such videos."""
    return int(job.index.pts[0]) >= 0


def counts_frames_as_the_index(job: VideoJob) -> bool:
    """False when the container declares another frame count than the probe's index (mp4/mov declare
    one; matroska, mpeg-ts do not). Without an index, the decoder numbers every frame it outputs, also
    those of packets the index leaves out (flagged discard: frames an edit list cuts, as in an mp4 cut
    without re-encoding, which NVDEC decodes and shows): every later frame would be shifted. The reader
    API builds the index's numbering, so such a video goes there."""
    import av

    try:
        with av.open(job.path) as container:
            declared = indexed_stream(container, job.index).frames
    except Exception:  # noqa: BLE001 - unreadable now: DALI fails on it too and hands it to PyAV
        return True
    return declared <= 0 or declared == job.index.num_frames


class _DecoderShard(_Shard):
    """Decoder API: one pipeline's samples (a part of a video each; a slot is (job, windows [k],
    distinct frame indices [f] sorted)), packed in order into batches of at most `batch_size` windows,
    and the external_source callback that feeds them (`source`)."""

    def __init__(self, jobs: list[VideoJob], batch_size: int, part_windows: int, left=VideoJob.active_windows):
        super().__init__(jobs, left)
        for job in jobs:
            for part in video_parts(job, part_windows, left):
                # Distinct and sorted: DALI sorts them anyway, and decodes the file again for a repeat.
                self.slots.append((job, part, np.unique(job.plan.frames[part])))
        self.batches: list[list[int]] = []
        size = batch_size
        for label, (_, part, _) in enumerate(self.slots):
            if size + len(part) > batch_size:
                self.batches.append([])
                size = 0
            self.batches[-1].append(label)
            size += len(part)
        self.total = len(self.slots)
        self._next = iter(self.batches)
        self._bytes: tuple[VideoJob | None, np.ndarray | None] = (None, None)
        self.source = self.feed

    def epoch_size(self) -> int:
        return self.total

    def feed(self):
        """external_source callback: the next batch as (file bytes, frame indices, labels) per sample;
        StopIteration ends the epoch. DALI calls it ahead (prefetch), in the thread that calls run()."""
        labels = next(self._next)
        encoded, frames = [], []
        for label in labels:
            job, _, unique = self.slots[label]
            if self._bytes[0] is not job:  # the parts of a video are consecutive: read each file once
                self._bytes = (job, _file_bytes(job.path))
            encoded.append(self._bytes[1])
            frames.append(unique.astype(np.int32))
        return encoded, frames, [np.asarray([label], np.int32) for label in labels]


def _file_bytes(path: str) -> np.ndarray:
    """The file's bytes; empty when unreadable. The callback runs while DALI prefetches, i.e. inside the
    run() of an earlier batch: an exception here would be blamed on the wrong video. An empty sample
    makes DALI fail on the batch it belongs to instead, which hands the video to PyAV (its error is
    reported there)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        log.warning("cannot read %s for DALI (%s)", path, err)
        return np.zeros(0, np.uint8)


def _build_pipe(source, seq_len: int, device: str, batch_size: int, device_id, threads: int):
    """A reader pipeline (`source`: its file_list path) or a decoder one (`source`: a _DecoderShard's
    feed). One builder for both APIs, so a failure injected here reaches either."""
    from nvidia.dali import fn, pipeline_def

    if not isinstance(source, str):
        return _build_decoder_pipe(source, device, batch_size, device_id, threads)
    file_list = source

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def pipe():
        video, label, times = fn.experimental.readers.video(
            device=device, file_list=file_list, file_list_format="frames", file_list_include_end=False,
            sequence_length=seq_len, uniform_sample=True, random_shuffle=False, enable_timestamps=True,
            name="reader")
        return video, label, times

    p = pipe()
    p.build()
    return p


def _build_decoder_pipe(feed, device: str, batch_size: int, device_id, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def pipe():
        encoded, frames, label = fn.external_source(source=feed, num_outputs=3, batch=True,
                                                    dtype=[types.UINT8, types.INT32, types.INT32])
        # pad_mode "none": a frame the file does not have is an error (the video goes to PyAV), not a
        # black frame in the store.
        video = fn.decoders.video(encoded, frames=frames, device="mixed" if device == "gpu" else "cpu",
                                  pad_mode="none")
        return video, label

    p = pipe()
    p.build()
    return p


def _host_array(tensor_list) -> np.ndarray:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return np.asarray(tensor_list.as_array())


class _GpuCopies:
    """Device-to-device copies of DALI's output samples into torch tensors, on a stream of their own.

    DALI recycles a pipeline's output buffers at its next run(), in its own stream order, which knows
    nothing of a copy still queued on torch's stream: `before_next_run` waits (on the host) for the
    copies alone, not for the encoder work queued since; torch's stream waits for them on the device."""

    def __init__(self):
        import torch
        self.stream = torch.cuda.Stream()

    def copy(self, sample):
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(sample.shape()), dtype=torch.uint8, device="cuda")
        feed_ndarray(sample, out, cuda_stream=self.stream)
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def before_next_run(self):
        self.stream.synchronize()


def _from_host(sample):
    import torch
    return torch.from_numpy(np.array(sample))


def decode_windows_dali(jobs: Iterable[VideoJob], spec: WindowSpec, device: str = "gpu", device_id=0,
                        readers: int = 4, batch_size: int = 32, chunk_windows: int = 8192,
                        threads: int = 2, dali_api: str = DEFAULT_DALI_API) -> Iterator[Window | Failed | VideoJob]:
    """Yield Window events (torch uint8 [T,H,W,3]) and Failed events; a VideoJob event means "decode
    this one elsewhere" (DALI cannot: codec unsupported, or DALI errored on its chunk). `dali_api`:
    "decoder" or "reader" (module docstring); `readers`: pipelines side by side, for either."""
    if dali_api not in DALI_APIS:
        raise ValueError(f"dali_api must be one of {DALI_APIS}, got {dali_api!r}")
    chunk, size = [], 0
    for job in jobs:
        if isinstance(job, Failed):
            yield job
            continue
        if device == "cpu" and job.index.codec not in DALI_CPU_CODECS:
            yield job  # DALI's CPU decoder has no H.264/HEVC/AV1: PyAV takes it
            continue
        if dali_api == "decoder" and device == "gpu" and job.index.codec not in DALI_GPU_CODECS:
            yield job  # fn.decoders.video would fail the whole batch on it
            continue
        chunk.append(job)
        size += len(job.active_windows())
        if size >= chunk_windows:
            yield from _decode_chunk_with(dali_api, chunk, spec, device, device_id, readers, batch_size, threads)
            chunk, size = [], 0
    if chunk:
        yield from _decode_chunk_with(dali_api, chunk, spec, device, device_id, readers, batch_size, threads)


def _decode_chunk_with(dali_api, jobs, spec, device, device_id, readers, batch_size, threads):
    if dali_api == "reader":
        yield from _decode_with_reader(jobs, spec, device, device_id, readers, batch_size, threads)
        return
    part_windows = max(1, min(PART_WINDOWS, batch_size))
    fits = [suits_decoder_api(j, part_windows) and counts_frames_as_the_index(j) for j in jobs]
    in_memory = [j for j, ok in zip(jobs, fits) if ok]
    to_reader = [j for j, ok in zip(jobs, fits) if not ok]
    if to_reader:
        log.info("DALI: %d videos go to the reader API (long ones, which the in-memory decoder would decode "
                 "once per part, or ones whose container counts frames the index leaves out)", len(to_reader))
    if in_memory:
        yield from _decode_chunk(in_memory, spec, device, device_id, readers, batch_size, threads,
                                 part_windows=part_windows)
    if to_reader:
        yield from _decode_with_reader(to_reader, spec, device, device_id, readers, batch_size, threads)


def _decode_with_reader(jobs, spec, device, device_id, readers, batch_size, threads):
    """The reader API for `jobs`, but for those whose frame times it misreports (reader_times_hold):
    PyAV takes those."""
    yield from (j for j in jobs if not reader_times_hold(j))
    timed = [j for j in jobs if reader_times_hold(j)]
    if timed:
        yield from _decode_chunk(timed, spec, device, device_id, readers, batch_size, threads)


def _decode_chunk(jobs, spec, device, device_id, readers, batch_size, threads, part_windows: int | None = None):
    """Decode `jobs` with the reader API, or with the decoder API in parts of `part_windows` windows."""
    rule, T = spec.rule, spec.frames
    seq_len = T if rule == "index" else 1
    with tempfile.TemporaryDirectory(prefix="lvmae_dali_") as folder:
        # rule "time", reader API: frames wait here until their window is complete; windows complete in order.
        cache: dict[int, dict[int, object]] = {id(j): {} for j in jobs}
        todo_windows = {id(j): j.active_windows() for j in jobs}
        next_window = {id(j): 0 for j in jobs}       # position in todo_windows[id(job)]
        done_jobs: set[int] = set()
        delivered: dict[int, list[int]] = {id(j): [] for j in jobs}  # windows already yielded, per job
        broken: list[VideoJob] = []

        def left(job: VideoJob) -> np.ndarray:
            """Windows of `job` to decode: a retried video's delivered ones are not decoded again."""
            todo = todo_windows[id(job)]
            return todo[~np.isin(todo, delivered[id(job)])] if delivered[id(job)] else todo

        def make_shard(group: list[VideoJob], k: int) -> _Shard:
            if part_windows is not None:
                return _DecoderShard(group, batch_size, part_windows, left)
            return _ReaderShard(group, rule, folder, k, left)

        shards = [make_shard(s, k) for k, s in enumerate(split_over_readers(jobs, readers))]

        def build(shard: _Shard, k: int) -> bool:
            try:
                shard.pipe = _build_pipe(shard.source, seq_len, device, batch_size,
                                         device_id if device == "gpu" else None, threads)
                shard.total = shard.epoch_size()
                return True
            except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError subclasses freely
                log.warning("DALI could not open reader %d (%s); its videos go to PyAV", k, err)
                broken.extend(shard.jobs)
                shard.pipe = None
                return False

        active = [s for k, s in enumerate(shards) if build(s, k)]
        readers_made = len(shards)
        copies = _GpuCopies() if device == "gpu" and active else None
        while active:
            for shard in list(active):
                try:
                    if copies is not None:
                        copies.before_next_run()  # the last run's outputs are copied out before DALI reuses them
                    outputs = shard.pipe.run()
                except Exception as err:  # noqa: BLE001
                    # One damaged file must not send the rest of its pipeline to PyAV, nor a good one go
                    # there on a guess: the likely file decodes alone (its windows not delivered yet),
                    # the pipeline restarts after it, and only a file DALI fails on alone goes to PyAV.
                    suspect, rest = shard.after_failure(done_jobs)
                    shard.pipe = None
                    active.remove(shard)
                    if suspect is not None and len(shard.jobs) == 1:
                        log.warning("DALI failed on %s alone (%s); it goes to PyAV", suspect.path, err)
                        broken.append(suspect)
                        continue
                    log.warning("DALI failed on a batch (%s); %s%s", err,
                                f"{suspect.path} decodes alone next" if suspect is not None else "no video left",
                                f", the pipeline restarts for the {len(rest)} videos after it" if rest else "")
                    for group in ([suspect] if suspect is not None else [], rest):
                        if group:
                            retry = make_shard(group, readers_made)
                            if build(retry, readers_made):
                                active.append(retry)
                            readers_made += 1
                    continue
                video, label = outputs[0], outputs[1]
                labels = _host_array(label).reshape(-1)
                if part_windows is None:
                    stamps = _host_array(outputs[2]).reshape(len(labels), -1)  # seconds since the first frame
                for i in range(len(labels)):
                    if shard.seen >= shard.total:
                        break  # the rest of the batch wraps around into the next epoch
                    shard.seen += 1
                    shard.last_label = int(labels[i])
                    job, item = shard.slots[int(labels[i])][:2]
                    if id(job) in done_jobs:
                        continue
                    frames = copies.copy(video[i]) if copies is not None else _from_host(video[i])
                    if part_windows is not None:  # decoder API: a part's windows, all complete
                        for window in _part_windows(job, item, shard.slots[int(labels[i])][2], frames):
                            yield window
                            delivered[id(job)].append(window.window)
                        if item[-1] == todo_windows[id(job)][-1]:
                            done_jobs.add(id(job))
                        continue
                    if rule == "index":
                        yield Window(job, item, frames, stamps[i].astype(np.float64))
                        delivered[id(job)].append(item)
                        if item == todo_windows[id(job)][-1]:
                            done_jobs.add(id(job))
                        continue
                    cache[id(job)][item] = (frames[0], float(stamps[i, 0]))
                    for window in _complete_windows(job, todo_windows[id(job)], cache[id(job)], next_window, done_jobs):
                        yield window
                        delivered[id(job)].append(window.window)
                if shard.seen >= shard.total:
                    active.remove(shard)
            # a reader that never produced a window for a job (DALI skipped its file) -> PyAV
        for shard in shards:
            shard.pipe = None
        broken_ids = {id(j) for j in broken}
        leftovers = [j for j in jobs if id(j) not in done_jobs and id(j) not in broken_ids]
        for job in broken + leftovers:
            if delivered[id(job)]:  # PyAV decodes only what DALI did not deliver
                skip = np.zeros(job.num_windows, bool) if job.skip is None else job.skip.copy()
                skip[delivered[id(job)]] = True
                job.skip = skip
            yield job


def _part_windows(job: VideoJob, windows: np.ndarray, unique: np.ndarray, frames) -> Iterator[Window]:
    """Decoder API: the windows of one sample, whose `frames` are those of `unique` (sorted frame
    indices), in order. Times are the probe's: the frames are the index's frames."""
    import torch

    for w in windows:
        wanted = job.plan.frames[w]
        pick = torch.as_tensor(np.searchsorted(unique, wanted), device=frames.device)
        yield Window(job, int(w), frames[pick], job.index.times[wanted])


def _complete_windows(job, active, frames_by_index, next_window, done_jobs):
    """Yield the windows (of `active`, in order) whose frames have all arrived."""
    import torch

    frames = job.plan.frames
    k = next_window[id(job)]
    while k < len(active) and all(int(f) in frames_by_index for f in frames[active[k]]):
        w = int(active[k])
        picked = [frames_by_index[int(f)] for f in frames[w]]
        yield Window(job, w, torch.stack([p[0] for p in picked]), np.asarray([p[1] for p in picked]))
        k += 1
        # Frames before the next window's first frame are not needed again (frames are sorted).
        if k < len(active):
            keep_from = int(frames[active[k]].min())
            for f in [f for f in frames_by_index if f < keep_from]:
                del frames_by_index[f]
    next_window[id(job)] = k
    if k == len(active):
        done_jobs.add(id(job))
        frames_by_index.clear()
