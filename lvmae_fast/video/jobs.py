"""One video's work item and the events decoders emit for the extraction loop."""
from __future__ import annotations

import dataclasses

import numpy as np

from .probe import VideoError, VideoIndex, probe_video
from .windows import WindowPlan, plan_windows, windows_to_decode


@dataclasses.dataclass(eq=False)  # identity semantics: jobs are keyed by id() and compared by `is`
class VideoJob:
    video_id: str
    path: str
    index: VideoIndex | None = None
    plan: WindowPlan | None = None
    # Windows embedded by an earlier, killed job (video/partial.py): decoders do not produce them.
    skip: np.ndarray | None = None          # bool [n]
    saved_emb: np.ndarray | None = None     # float32 [n, d], rows valid where skip
    decoded_by: str = ""                    # which backend produced its windows (for the job summary)
    resumed_decoder: str = ""               # the decoded_by of the windows in saved_emb (hybrid keeps it)
    # Given NVDEC, FFmpeg decoded it in software on the CPU instead (decode_pyav.HW_FRAME_FORMAT).
    software_fallback: bool = False
    # False: PyAV decodes skip the in-loop deblocking filter (extract --skip-deblocking).
    deblock: bool = True

    def active_windows(self) -> np.ndarray:
        """Indices of the windows to decode, in order."""
        return windows_to_decode(self.num_windows, self.skip)

    @property
    def num_windows(self) -> int:
        return len(self.plan) if self.plan is not None else 0


@dataclasses.dataclass
class WindowSpec:
    """How every video is cut and sampled (the CLI's window options)."""
    seconds: float = 5.0
    frames: int = 8
    rule: str = "time"
    min_last: float = 0.5


@dataclasses.dataclass
class Window:
    """Decoded frames of one window: uint8 [T, H, W, 3] (numpy from PyAV, torch from DALI)."""
    job: VideoJob
    window: int
    frames: object
    times: np.ndarray | None = None   # seconds (since the first frame) of each decoded frame


@dataclasses.dataclass
class Failed:
    job: VideoJob
    reason: str


def prepare_job(job: VideoJob, spec: WindowSpec) -> VideoJob:
    """Probe and plan; raises VideoError (too short included) with the reason to record."""
    job.index = probe_video(job.path)
    job.plan = plan_windows(job.index.times, job.index.duration, spec.seconds, spec.frames, spec.rule,
                            spec.min_last)
    if len(job.plan) == 0:
        raise VideoError(f"too short: {job.index.duration:.3f} s of video, a window needs "
                         f">= {spec.min_last * spec.seconds:g} s (window {spec.seconds:g} s)")
    return job


def unique_frames(plan: WindowPlan) -> np.ndarray:
    return np.unique(plan.frames)
