"""DALI decoding (GPU: NVDEC, frames stay on the GPU; CPU: VP8/VP9/MJPEG only) of planned windows.

Uses DALI's current reader, fn.experimental.readers.video (variable-frame-rate safe), fed a file_list
with exact frame ranges (file_list_format="frames"):
- rule "index": one line per window `path label a b`, sequence_length=T, uniform_sample=True; DALI
  picks round_half_up(linspace(a, b-1, T)), which windows.uniform_index_sample reproduces;
- rule "time": one line per distinct sampled frame `path label f f+1`, sequence_length=1 (DALI cannot
  take arbitrary indices in one sample). Lines are in frame order, and DALI keeps one decoder per file
  and decodes forward without seeking inside a GOP, so this decodes what the per-window form decodes.
Labels are our slot ids, so every decoded sample maps back to (video, window/frame) even if DALI
skips a file it cannot open (it does so with only a warning).

Throughput: videos are split over several readers (one pipeline each: NVDEC decodes sessions in
parallel), each pipeline prefetches (DALI runs ahead asynchronously), so the next batches decode
while the encoder works on this one. Videos are processed in chunks (pipelines rebuilt per chunk).
A batch DALI fails on (damaged data) hands the video it was decoding to PyAV, for the windows not
delivered yet, and the reader restarts after that video: the others keep decoding with DALI.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np

from .jobs import Failed, VideoJob, Window, WindowSpec

log = logging.getLogger(__name__)

DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg", "libvpx", "libvpx-vp9"}


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
    """One reader: its file_list, the label -> (job, item) map, and progress through its epoch."""

    def __init__(self, jobs: list[VideoJob], rule: str, folder: str, k: int):
        self.jobs, self.rule = jobs, rule
        self.slots: list[tuple[VideoJob, int]] = []   # label -> (job, window or frame index)
        lines = []
        for job in jobs:
            path = os.path.abspath(job.path)
            if any(c.isspace() for c in path):
                # file_list lines are whitespace-separated: point DALI at a link with a plain name.
                suffix = os.path.splitext(path)[1]
                link = os.path.join(folder, f"r{k}-{len(lines)}{'' if any(c.isspace() for c in suffix) else suffix}")
                os.symlink(path, link)
                path = link
            active = job.active_windows()  # windows a killed job already embedded are not decoded again
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
        self.seen = 0
        self.epoch = 0
        self.pipe = None
        self.last_label: int | None = None  # label of the last sample taken from this reader

    def after_failure(self, done_jobs: set[int]) -> tuple[VideoJob | None, list[VideoJob]]:
        """DALI failed on a batch: (the job it was most likely decoding, the jobs after it).

        Samples come in file_list order, so nothing after the job of the last sample taken has been
        delivered; the failing file is that job if it is unfinished, else the next one. Only it goes to
        PyAV: the reader is rebuilt for the jobs after it (if the guess was wrong, the rebuilt reader
        fails again and hands over the next job; every failure takes one job out)."""
        start = 0
        if self.last_label is not None:
            owner = self.slots[self.last_label][0]
            start = next(i for i, j in enumerate(self.jobs) if j is owner)
            if id(owner) in done_jobs:
                start += 1
        if start >= len(self.jobs):
            return None, []
        return self.jobs[start], self.jobs[start + 1:]


def _build_pipe(file_list: str, seq_len: int, device: str, batch_size: int, device_id, threads: int):
    from nvidia.dali import fn, pipeline_def

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
                        threads: int = 2) -> Iterator[Window | Failed | VideoJob]:
    """Yield Window events (torch uint8 [T,H,W,3]) and Failed events; a VideoJob event means "decode
    this one elsewhere" (DALI cannot: codec unsupported on CPU, or DALI errored on its chunk)."""
    chunk, size = [], 0
    for job in jobs:
        if isinstance(job, Failed):
            yield job
            continue
        if device == "cpu" and job.index.codec not in DALI_CPU_CODECS:
            yield job  # DALI's CPU decoder has no H.264/HEVC/AV1: PyAV takes it
            continue
        chunk.append(job)
        size += len(job.active_windows())
        if size >= chunk_windows:
            yield from _decode_chunk(chunk, spec, device, device_id, readers, batch_size, threads)
            chunk, size = [], 0
    if chunk:
        yield from _decode_chunk(chunk, spec, device, device_id, readers, batch_size, threads)


def _decode_chunk(jobs, spec, device, device_id, readers, batch_size, threads):
    rule, T = spec.rule, spec.frames
    seq_len = T if rule == "index" else 1
    with tempfile.TemporaryDirectory(prefix="lvmae_dali_") as folder:
        shards = [_Shard(s, rule, folder, k) for k, s in enumerate(split_over_readers(jobs, readers))]
        # rule "time": frames wait here until their window is complete; windows complete in order.
        cache: dict[int, dict[int, object]] = {id(j): {} for j in jobs}
        todo_windows = {id(j): j.active_windows() for j in jobs}
        next_window = {id(j): 0 for j in jobs}       # position in todo_windows[id(job)]
        done_jobs: set[int] = set()
        delivered: dict[int, list[int]] = {id(j): [] for j in jobs}  # windows already yielded, per job
        broken: list[VideoJob] = []

        def build(shard: _Shard, k: int) -> bool:
            try:
                shard.pipe = _build_pipe(shard.file_list, seq_len, device, batch_size,
                                         device_id if device == "gpu" else None, threads)
                shard.total = shard.pipe.epoch_size("reader")
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
                    video, label, stamps = shard.pipe.run()
                except Exception as err:  # noqa: BLE001
                    # One damaged file must not send the rest of its reader to PyAV: that file goes
                    # (only its windows not delivered yet), the reader restarts after it.
                    culprit, rest = shard.after_failure(done_jobs)
                    log.warning("DALI failed on a batch (%s); %s goes to PyAV%s", err,
                                culprit.path if culprit is not None else "no video",
                                f", the reader restarts for the {len(rest)} videos after it" if rest else "")
                    if culprit is not None:
                        broken.append(culprit)
                    shard.pipe = None
                    active.remove(shard)
                    if rest:
                        retry = _Shard(rest, rule, folder, readers_made)
                        if build(retry, readers_made):
                            active.append(retry)
                        readers_made += 1
                    continue
                labels = _host_array(label).reshape(-1)
                stamps = _host_array(stamps).reshape(len(labels), -1)  # seconds since the first frame
                for i in range(len(labels)):
                    if shard.seen >= shard.total:
                        break  # the rest of the batch wraps around into the next epoch
                    shard.seen += 1
                    shard.last_label = int(labels[i])
                    job, item = shard.slots[int(labels[i])]
                    if id(job) in done_jobs:
                        continue
                    frames = copies.copy(video[i]) if copies is not None else _from_host(video[i])
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
