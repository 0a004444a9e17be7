"""`--decoder hybrid`: CPU decodes and NVDEC decodes side by side, each video on one of them.

Why: on an H200 host with 16 cores (2026-11-26, camera-like 1080p H.264), PyAV on the CPU decoded
1798 frames/s with 16 videos at once and PyAV on NVDEC 1749-1808 frames/s with 8 or 16 at once: both
saturated, at about the same rate, and end to end each was decode-bound (the encoder had 5x to spare).
The NVDEC engines and the CPU cores are separate hardware, so running both should add their rates.

How: every decode (a video, or a part of a long one) asks `DecoderShare.start` which decoder to use.
A video's first part to start picks NVDEC while fewer than `nvdec_slots` NVDEC decodes are running,
else the CPU; its later parts use the same decoder, so one video's windows come from one decoder
(their pixels differ slightly: NV12 from NVDEC takes another chroma path to RGB than libavcodec's
planar output). The choice follows load, so which videos went where can differ between runs; the
summary's `decoded_by` counts them. A video a killed run had begun stays on the decoder it began on.

Limit: since a long video stays on one decoder, a corpus of a few long videos keeps the other one
idle (their parts all run on the decoder each video's first part took, up to the worker count at once).
"""
from __future__ import annotations

import threading

NVDEC, CPU = "nvdec", "pyav"

# NVDEC decodes at once when the user does not say: on an H200, 8 already saturated its engines
# (1749 frames/s; 16 gave 1808).
DEFAULT_NVDEC_SLOTS = 8


class DecoderShare:
    """Picks NVDEC or the CPU for each decode, sticky per video (keyed by the job object's id)."""

    def __init__(self, nvdec_slots: int = DEFAULT_NVDEC_SLOTS):
        if nvdec_slots < 1:
            raise ValueError(f"nvdec_slots must be >= 1, got {nvdec_slots}")
        self.nvdec_slots = nvdec_slots
        self._lock = threading.Lock()
        self._running = {NVDEC: 0, CPU: 0}
        self._chosen: dict[int, str] = {}    # id(job) -> decoder, for the parts still to come

    def start(self, job, pinned: str = "") -> str:
        """The decoder for a decode of `job` that begins now; call `finish(job)` when it ends.
        pinned: the decoder of windows a killed run saved for this video (video/partial.py), which
        the rest of it keeps."""
        with self._lock:
            choice = self._chosen.get(id(job))
            if choice is None:
                if pinned in (NVDEC, CPU):
                    choice = pinned
                else:
                    choice = NVDEC if self._running[NVDEC] < self.nvdec_slots else CPU
                self._chosen[id(job)] = choice
            self._running[choice] += 1
            return choice

    def finish(self, job) -> None:
        with self._lock:
            self._running[self._chosen[id(job)]] -= 1
            # The choice stays: a later part of the same video may start after this one has finished.
            # (Keys stay unique: the job objects live for the whole extract run.)

    def running(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)
