"""CPU decoding with PyAV (any codec FFmpeg knows): one sequential pass, windows yielded in order.

Frames are matched by pts against the frames the plan asks for. A frame the decoder never produces
(damaged data) is replaced by the last decoded frame before it, as a player would show it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .probe import VideoError, VideoIndex, pts_to_seconds
from .windows import WindowPlan


def decode_windows_pyav(index: VideoIndex, plan: WindowPlan, threads: int = 0
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (window index, uint8 frames [T, H, W, 3] RGB, seconds [T] of the frames actually decoded)
    for every window of `plan`, in order."""
    import av

    wanted_pts = index.pts[plan.frames]                 # [n, T] pts of each sampled frame
    needed = np.unique(wanted_pts)                      # ascending
    # A window is complete once the largest pts it needs has been assigned.
    window_last = wanted_pts.max(axis=1)
    # Frames still needed by a later window are kept; others are dropped as decoding advances.
    pts0 = int(index.pts[0])
    last_use = {int(p): -1 for p in needed}
    for w in range(len(plan)):
        for p in wanted_pts[w]:
            last_use[int(p)] = w

    got: dict[int, np.ndarray] = {}
    got_pts: dict[int, int] = {}        # wanted pts -> pts of the frame that stands in for it
    next_window, j = 0, 0
    last_frame, last_array = None, None

    def array_of(frame):
        nonlocal last_frame, last_array
        if frame is not last_frame or last_array is None:
            last_frame, last_array = frame, frame.to_ndarray(format="rgb24")
        return last_array

    def flush(upto_pts: float):
        nonlocal next_window
        while next_window < len(plan) and window_last[next_window] <= upto_pts:
            w = next_window
            used = np.asarray([got_pts[int(p)] for p in wanted_pts[w]], dtype=np.int64)
            yield w, np.stack([got[int(p)] for p in wanted_pts[w]]), pts_to_seconds(used, pts0, index.time_base)
            for p in set(int(p) for p in wanted_pts[w]):
                if last_use[p] <= w:
                    got.pop(p, None)
            next_window += 1

    try:
        container = av.open(index.path, mode="r")
    except av.FFmpegError as err:
        raise VideoError(f"cannot open for decoding ({err.strerror or err})") from None
    decoded_any = False
    prev = None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        try:
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    continue
                decoded_any = True
                # Needed frames strictly before this one were never produced: use the previous frame.
                while j < len(needed) and needed[j] < pts:
                    stand_in = prev if prev is not None else frame
                    got[int(needed[j])] = array_of(stand_in)
                    got_pts[int(needed[j])] = stand_in.pts
                    j += 1
                if j < len(needed) and needed[j] == pts:
                    got[int(pts)] = array_of(frame)
                    got_pts[int(pts)] = pts
                    j += 1
                prev = frame
                yield from flush(pts)
                if j == len(needed):
                    break
        except av.FFmpegError as err:
            if not decoded_any:
                raise VideoError(f"decoding failed ({err.strerror or err})") from None
            # Damaged tail: remaining frames repeat the last good one (same as a player).
    if not decoded_any:
        raise VideoError("decoder produced no frames")
    while j < len(needed):
        got[int(needed[j])] = array_of(prev)
        got_pts[int(needed[j])] = prev.pts
        j += 1
    yield from flush(np.inf)
