"""Windows over a video and the T frames embedded for each: pure arithmetic on the frame index.

Windows: [0,S), [S,2S), ... over the video's real duration D (first frame start to last frame end).
Last partial window rule: the trailing remainder r = D - kS is kept as window [kS, D) when
r >= min_last * S (default min_last = 0.5, i.e. at least half a window), otherwise dropped. A video
with no window (D < min_last * S, or D < S when min_last = 1) is "too short".

Frame selection, two rules (both give exact frame indices, which every decoder then decodes):
- "time" (default, correct for variable frame rate): split the window into T equal slices and take
  the frame on screen at each slice's centre, i.e. the last frame with time <= start + (i+0.5)*len/T
  (the first frame if the centre precedes it). Uniform in time whatever the frame spacing.
- "index" (DALI's native `uniform_sample`): the frames whose time lies in [start, end), indices
  a..b-1, sampled at a + round_half_up(i/(T-1) * (b-a-1)), as numpy.linspace(a, b-1, T) rounded the
  way DALI 2.4 does. Uniform in frame count: equals "time" spacing only at constant frame rate.
  A window containing no frame start (a long VFR gap) uses the frame on screen at its start.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SAMPLING_RULES = ("time", "index")
# Frames starting within EPS of a boundary count as starting on it (guards float round-off).
EPS = 1e-6


@dataclasses.dataclass
class WindowPlan:
    times: np.ndarray        # float64 [n, 2]: start, end seconds of each window
    frames: np.ndarray       # int64 [n, T]: frame index (VideoIndex order) of each sampled frame
    ranges: np.ndarray       # int64 [n, 2]: frame range [a, b) of each window ("index" rule input)

    def __len__(self) -> int:
        return int(self.times.shape[0])


def window_bounds(duration: float, seconds: float = 5.0, min_last: float = 0.5) -> np.ndarray:
    """[n, 2] window start/end seconds per the rule in the module docstring."""
    if seconds <= 0:
        raise ValueError("window seconds must be > 0")
    if not 0.0 <= min_last <= 1.0:
        raise ValueError("min_last must be in [0, 1]")
    n_full = int(np.floor(duration / seconds + EPS))
    starts = [k * seconds for k in range(n_full)]
    ends = [(k + 1) * seconds for k in range(n_full)]
    rest = duration - n_full * seconds
    if rest > EPS and rest >= min_last * seconds - EPS and min_last < 1.0:
        starts.append(n_full * seconds)
        ends.append(duration)
    # C order: the store writes this array as-is.
    return np.ascontiguousarray(np.stack([np.asarray(starts, np.float64), np.asarray(ends, np.float64)], axis=1).reshape(-1, 2))


def frame_range(times: np.ndarray, start: float, end: float) -> tuple[int, int]:
    """Indices [a, b) of frames whose start time is in [start, end); a 1-frame range if there are none."""
    a = int(np.searchsorted(times, start - EPS, side="left"))
    b = int(np.searchsorted(times, end - EPS, side="left"))
    if b <= a:  # no frame starts inside: the one on screen at `start`
        a = max(int(np.searchsorted(times, start + EPS, side="right")) - 1, 0)
        b = a + 1
    return a, b


def uniform_index_sample(a: int, b: int, T: int) -> np.ndarray:
    """DALI 2.4 uniform_sample: a + round(i/(T-1) * (b-a-1)), std::round = half away from zero."""
    if T == 1:
        return np.asarray([a], dtype=np.int64)
    t = np.arange(T, dtype=np.float64) / (T - 1)
    return a + np.floor(t * (b - a - 1) + 0.5).astype(np.int64)


def on_screen_at(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index of the frame displayed at each time t (last frame starting at or before t)."""
    idx = np.searchsorted(times, np.asarray(t) + EPS, side="right") - 1
    return np.clip(idx, 0, len(times) - 1).astype(np.int64)


def plan_windows(times: np.ndarray, duration: float, seconds: float = 5.0, frames_per_window: int = 8,
                 rule: str = "time", min_last: float = 0.5) -> WindowPlan:
    """Windows and sampled frame indices for a video whose frame start times are `times` (sorted)."""
    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown frame sampling rule {rule!r}; choose from {SAMPLING_RULES}")
    T = int(frames_per_window)
    if T < 1:
        raise ValueError("frames per window must be >= 1")
    bounds = window_bounds(duration, seconds, min_last)
    n = bounds.shape[0]
    frames = np.zeros((n, T), dtype=np.int64)
    ranges = np.zeros((n, 2), dtype=np.int64)
    for w, (start, end) in enumerate(bounds):
        ranges[w] = frame_range(times, start, end)
        if rule == "time":
            centres = start + (np.arange(T) + 0.5) * (end - start) / T
            frames[w] = on_screen_at(times, centres)
        else:
            frames[w] = uniform_index_sample(int(ranges[w, 0]), int(ranges[w, 1]), T)
    return WindowPlan(times=bounds, frames=frames, ranges=ranges)


def windows_to_decode(num_windows: int, skip: np.ndarray | None) -> np.ndarray:
    """Indices of the windows still to decode, in order: all, or those not marked in `skip` (bool [n],
    windows an earlier, killed job already embedded)."""
    return np.arange(num_windows) if skip is None else np.flatnonzero(~np.asarray(skip, bool))
