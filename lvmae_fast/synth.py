"""Synthetic test videos: real encoded files (H.264 mp4, VP9 webm/mkv) with known timing and content.

Each video is a sequence of scenes; a scene is a solid colour with a scene-specific pattern (a
checkerboard whose cell size changes per scene), so scene changes are visible to any encoder and land
at known times. Frame timestamps are chosen exactly (constant or variable frame rate) and expressed in
the container's time base, so tests can compare decoded timestamps against hand-computed ones.

Also writes the failure corpus (zero-byte, truncated, audio-only, text, too short, cut files whose
index survives, a file with a damaged middle).
"""
from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from .optional import require

# Distinct, saturated colours: consecutive scenes differ strongly in every channel.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]

# codec name (our word) -> (PyAV encoder, default container suffix, pixel format)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "vp8": ("libvpx", ".webm", "yuv420p"),
    "mjpeg": ("mjpeg", ".mkv", "yuvj420p"),
}


@dataclasses.dataclass
class SynthVideo:
    path: Path
    frame_times: np.ndarray      # presentation time of each frame, seconds (as stored, container-rounded)
    duration: float              # last frame time + its display duration
    scene_starts: list[float]    # time each scene begins (first is 0.0)
    codec: str


def check_video_args(duration: float, fps: float, size) -> None:
    """Refuse what would write no frame, loop forever or fail inside numpy/FFmpeg with another message."""
    for name, value in (("duration", duration), ("fps", fps)):
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 and v % 2 == 0 for v in size):
        raise ValueError(f"size must be (width, height), positive even integers (4:2:0 chroma), got {tuple(size)}")


def frame_times_for(duration: float, fps: float, vfr: bool = False, seed: int = 0) -> np.ndarray:
    """Frame start times in [0, duration). CFR: k/fps. VFR: intervals drawn from {0.5, 1, 2}/fps."""
    if not vfr:
        n = int(np.ceil(duration * fps - 1e-9))  # every k with k / fps < duration (floor left 7.4 s out of 7.5)
        return np.arange(n, dtype=np.float64) / fps
    # On a grid of half-frame ticks, summed as integers: float steps drift (7.999999999999997), and a frame
    # meant to start a scene at 8.0 would show the one before.
    rng = np.random.default_rng(seed)
    ticks, n = [], 0
    while n / (2 * fps) < duration - 1e-9:
        ticks.append(n)
        n += int(rng.choice([1, 2, 4]))
    return np.asarray(ticks, dtype=np.float64) / (2 * fps)


def _scene_image(scene: int, width: int, height: int) -> np.ndarray:
    colour = np.asarray(PALETTE[scene % len(PALETTE)], dtype=np.uint8)
    cell = 4 + 4 * (scene % 4)
    yy, xx = np.mgrid[0:height, 0:width]
    checker = ((yy // cell + xx // cell) % 2).astype(bool)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = colour
    img[checker] = colour // 2  # same hue, darker cells: pattern without changing the scene colour
    return img


def write_video(path, duration: float = 6.0, fps: float = 10.0, size: tuple[int, int] = (64, 48),
                codec: str = "h264", scene_starts: list[float] | None = None, vfr: bool = False,
                seed: int = 0, gop: int = 12, audio: bool = False,
                mux_options: dict[str, str] | None = None) -> SynthVideo:
    """Encode a video of `duration` seconds at `fps` (nominal when vfr) and `size` = (width, height).

    `scene_starts` (seconds, first must be 0) default to one scene per 2 seconds. Returns the frame
    times exactly as stored, i.e. rounded to the container's time base. `mux_options` go to the muxer,
    e.g. {"movflags": "faststart"} (mp4: moov atom at the front), {"fflags": "+bitexact"} (no date/UID).
    """
    av = require("av", "video", "writing test videos")

    path = Path(path)
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    check_video_args(duration, fps, size)
    scene_starts = list(scene_starts) if scene_starts is not None else list(np.arange(0.0, duration, 2.0))
    if (not scene_starts or scene_starts[0] != 0.0 or not all(a < b for a, b in zip(scene_starts, scene_starts[1:]))
            or not scene_starts[-1] < duration):   # (a NaN fails every comparison)
        raise ValueError(f"scene_starts must begin with 0.0 and increase, all below the duration ({duration} s), "
                         f"got {scene_starts}")
    times = frame_times_for(duration, fps, vfr=vfr, seed=seed)
    if len(times) == 0:
        raise ValueError(f"duration={duration} s at fps={fps} gives no frame")
    path.parent.mkdir(parents=True, exist_ok=True)

    def scenes_at(t):
        return np.searchsorted(np.asarray(scene_starts), t, side="right") - 1

    stored = _encode(av, path, times, scenes_at(times), fps, size, codec, gop, audio, duration, mux_options)
    # The muxer rounds to its own time base (webm: 1 ms, halves up): a frame 0.2 ms before a scene start
    # (59.94 fps) is stored at the start and must show that scene. Scenes chosen on the stored times, again.
    if not np.array_equal(scenes_at(stored), scenes_at(times)):
        stored = _encode(av, path, times, scenes_at(stored), fps, size, codec, gop, audio, duration, mux_options)
    # The last frame shows for one nominal frame interval: its packet's duration in the file.
    return SynthVideo(path=path, frame_times=stored, duration=float(stored[-1] + 1.0 / fps),
                      scene_starts=[float(x) for x in scene_starts], codec=codec)


def _encode(av, path: Path, times: np.ndarray, scene_of: np.ndarray, fps, size, codec: str, gop: int, audio: bool,
            duration: float, mux_options) -> np.ndarray:
    """Write frame k (scene scene_of[k]) at times[k]; return the frame times as stored, ascending."""
    encoder_name, _, pix_fmt = CODECS[codec]
    width, height = size
    with av.open(str(path), mode="w", options=dict(mux_options or {})) as container:
        stream = container.add_stream(encoder_name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # A fine encoder time base lets VFR timestamps be exact; the muxer may still round (webm: 1 ms).
        stream.codec_context.time_base = Fraction(1, 90000)
        stream.codec_context.gop_size = gop
        if codec == "h264":
            # No B-frames: presentation order == decode order, pts start at 0 (no edit-list shift).
            stream.codec_context.max_b_frames = 0
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        elif codec in ("vp9", "vp8"):
            stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        audio_stream = container.add_stream("aac", rate=16000) if audio else None
        # One converted frame per scene, re-sent with new timestamps (the encoder keeps its own reference).
        scene_frames = [av.VideoFrame.from_ndarray(_scene_image(i, width, height), format="rgb24").reformat(format=pix_fmt)
                        for i in range(int(scene_of.max()) + 1)]
        for t, scene in zip(times, scene_of):
            frame = scene_frames[scene]
            frame.pts = int(round(t * 90000))
            frame.time_base = Fraction(1, 90000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            _write_silence(container, audio_stream, duration)

    # Report what the container stores, read back: its muxer rounds to its own time base (webm: 1 ms, halves
    # up), which a rounding here would have to copy exactly.
    with av.open(str(path)) as written:
        video = written.streams.video[0]
        stored = np.sort(np.asarray([float(p.pts * video.time_base) for p in written.demux(video)
                                     if p.pts is not None], dtype=np.float64))
    if len(stored) != len(times):
        raise RuntimeError(f"{path}: {len(stored)} frames stored, {len(times)} written")
    return stored


def write_distinct_frames(path, frames: int = 300, fps: int = 25, keyint: int = 30, bframes: int = 3,
                          size: tuple[int, int] = (96, 64), encoder: str = "libx264",
                          options: dict[str, str] | None = None, texture: bool = False) -> Path:
    """H.264 (mp4, mkv, mpeg-ts... by suffix) with B-frames and a different picture in every frame, pts
    0, 1, 2, ... in a 1/fps time base. write_video's scenes repeat one picture, which would hide a
    decode that starts or stops one frame off; here every frame differs in colour and in a bar.
    `encoder` + `options`: another FFmpeg encoder and its options instead of x264's (keyint, bframes).
    `texture`: a panning noise texture instead of the colour, so that a frame predicted from a wrong
    reference shows it."""
    av = require("av", "video", "writing test videos")
    path = Path(path)
    width, height = size
    noise = np.random.default_rng(0).integers(0, 256, (height + 40, width + 40, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options if options is not None else {
            "preset": "fast", "x264-params": f"keyint={keyint}:min-keyint={keyint}:bframes={bframes}:scenecut=0"}
        for i in range(frames):
            if texture:
                picture = noise[i % 40:i % 40 + height, (2 * i) % 40:(2 * i) % 40 + width].copy()
            else:
                picture = np.zeros((height, width, 3), np.uint8)
                picture[:, :] = (i * 37 % 256, i * 11 % 256, (i * 3) % 256)
            picture[: 8, : 8 * (i % 12)] = 255
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_camera_like(path, duration: float = 30.0, fps: float = 30.0, size: tuple[int, int] = (1920, 1080),
                      seed: int = 0, keyint: int | None = None, bitrate: int | None = None,
                      open_gop: bool = False) -> Path:
    """H.264 as cameras and web video ship it, for decode benchmarks: High profile tools (CABAC,
    deblocking, 8x8 transforms, B-frames: x264 preset veryfast) at a camera-like bit rate (8 Mbit/s at
    1080p, scaled by pixel count), of textured content that pans every frame and changes scene every
    2 s, with film-grain noise, so that the encoder spends that rate. write_video's flat scenes encode
    (ultrafast, Constrained Baseline, no B-frames) to almost nothing, which decodes several times faster
    than real footage. mp4 by default; pts as the encoder sets them (B-frames shift them by an edit list).
    open_gop: x264's open GOPs, as some broadcast and camera streams: keyframes after the first are
    non-IDR I frames that B-frames shown before them predict across."""
    av = require("av", "video", "writing test videos")
    path = Path(path)
    check_video_args(duration, fps, size)
    width, height = size
    keyint = keyint or int(round(2 * fps))
    bitrate = bitrate or int(8e6 * width * height / (1920 * 1080))
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(frame_times_for(duration, fps))  # every k / fps below the duration, as write_video
    scene_len = max(1, int(round(2 * fps)))
    pan = 4  # pixels per frame, both axes: motion the encoder has to search for
    margin = pan * scene_len

    def scene_texture(k: int) -> np.ndarray:
        # Smooth random texture (upsampled noise) in the scene's colour: detail at several scales.
        coarse = rng.integers(0, 256, ((height + margin) // 16 + 2, (width + margin) // 16 + 2, 3), dtype=np.uint8)
        tex = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height + margin, :width + margin]
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.uint16)
        return ((tex.astype(np.uint16) + colour) // 2).astype(np.uint8)

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bitrate
        stream.options = {"preset": "veryfast", "profile": "high",
                          "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:"
                                         f"vbv-maxrate={bitrate // 1000}:vbv-bufsize={2 * bitrate // 1000}"
                                         + (":open-gop=1" if open_gop else "")}
        texture = None
        for i in range(n):
            if i % scene_len == 0:
                texture = scene_texture(i // scene_len)
            o = pan * (i % scene_len)
            picture = texture[o:o + height, o:o + width].copy()
            picture += rng.integers(0, 8, picture.shape, dtype=np.uint8)  # grain: no two frames alike
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, 1) / stream.codec_context.framerate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _write_silence(container, stream, duration: float) -> None:
    av = require("av", "video", "writing test videos")

    samples_per_frame = 1024
    n_frames = int(np.ceil(duration * stream.rate / samples_per_frame))
    for i in range(n_frames):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples_per_frame), dtype=np.float32),
                                           format="fltp", layout="mono")
        frame.sample_rate = stream.rate
        frame.pts = i * samples_per_frame
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_audio_only(path, duration: float = 2.0) -> Path:
    av = require("av", "video", "writing test videos")

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        _write_silence(container, container.add_stream("aac", rate=16000), duration)
    return path


def write_failure_corpus(folder) -> dict[str, Path]:
    """Files a robust extractor must skip with a reason: name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    out["zero_byte"] = folder / "zero_byte.mp4"
    out["zero_byte"].write_bytes(b"")
    out["not_a_video"] = folder / "notes.mp4"
    out["not_a_video"].write_text("this is a text file, not a video\n" * 20)
    good = write_video(folder / "_whole.mp4", duration=4.0, fps=10, codec="h264").path
    data = good.read_bytes()
    out["truncated"] = folder / "truncated.mp4"
    out["truncated"].write_bytes(data[: len(data) // 3])  # mp4: moov atom at the end is cut off
    os.remove(good)
    out["audio_only"] = write_audio_only(folder / "audio_only.mp4")
    out["too_short"] = write_video(folder / "too_short.mp4", duration=0.2, fps=10, codec="h264").path
    # Cut files whose index survives: the readable prefix demuxes cleanly, the header declares 12 s.
    exact = {"fflags": "+bitexact"}  # no muxing date / random UID: the same bytes on every call
    out["truncated_webm"] = _cut(write_video(folder / "_whole.webm", duration=12.0, fps=10, codec="vp9",
                                             mux_options=exact).path, folder / "truncated_webm.webm", 1 / 3)
    out["truncated_faststart"] = _cut(write_video(folder / "_whole.mp4", duration=12.0, fps=10, codec="h264",
                                                  mux_options={**exact, "movflags": "faststart"}).path,
                                      folder / "truncated_faststart.mp4", 1 / 3)
    # Index intact (moov at the end), 25%..60% of the bytes random: the middle frames do not decode.
    good = write_video(folder / "_whole.mp4", duration=12.0, fps=10, codec="h264", mux_options=exact).path
    data = bytearray(good.read_bytes())
    os.remove(good)
    a, b = len(data) * 25 // 100, len(data) * 60 // 100
    data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    out["damaged_middle"] = folder / "damaged_middle.mp4"
    out["damaged_middle"].write_bytes(bytes(data))
    return out


def _cut(whole: Path, dst: Path, keep: float) -> Path:
    """Write the first `keep` fraction of `whole`'s bytes to `dst`; remove `whole`."""
    data = whole.read_bytes()
    os.remove(whole)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
