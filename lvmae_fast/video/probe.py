"""Frame index of a video from its packets (no decoding): what windows and decoders agree on.

The index mirrors the one DALI's experimental video reader builds (frames_decoder_base.cc, BuildIndex):
packets of the best video stream, pts (dts when pts is missing), sorted by pts; frame i is the i-th
entry; time 0 is the first entry's pts. Using the same definition is what lets our frame indices be
handed to DALI verbatim. Packets the demuxer flags discard are left out: an mp4's frames an edit list
cuts (negative pts), which the decoders do not show either (DALI's index counts them; such mp4s go to
its reader, decode_dali.counts_frames_as_the_index). Other negative pts (a webm muxed without
avoid_negative_ts) are frames like any other, shown by every decoder and indexed by DALI.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

# Which frames the index holds and how they are numbered: windows saved by a killed job (video/partial.py)
# are reused only under the same version. 2 (2026-11-27): negative pts kept, only discard-flagged packets
# left out (1 left out every negative pts: a webm's lead-in). 3 (2026-11-28): AVI frames timed by their
# chunk numbers (dts), not the pts FFmpeg's H.264/HEVC parsers derive (wrong around dropped frames).
INDEX_VERSION = 3


class VideoError(Exception):
    """A file that cannot be ingested; the message is the reason recorded in failures.jsonl."""


@dataclasses.dataclass
class VideoIndex:
    path: str
    codec: str
    width: int               # 0 when the demuxer could not tell without decoding (e.g. a cut mpeg-ts)
    height: int
    time_base: Fraction
    pts: np.ndarray          # int64 [n] container pts, sorted (frame i's presentation timestamp)
    times: np.ndarray        # float64 [n] seconds since the first frame
    keyframe: np.ndarray     # bool [n]
    duration: float          # seconds from the first frame's start to the last frame's end
    # AVI stores no presentation timestamps: FFmpeg numbers packets in decode order, and decoded
    # frames (presentation order) carry those numbers shuffled when there are B-frames. Frame k out of
    # the decoder is then frame k of the index (decode_pyav matches by output order, not by pts).
    pts_in_decode_order: bool = False
    # The container seeks by index to a keyframe (decode_pyav can start a decode mid-file exactly).
    seeks_by_index: bool = False
    # bool [n]: keyframes that no later frame decodes past (an H.264 IDR, any HEVC IRAP, a VP8/VP9/AV1
    # keyframe; no leading pictures, i.e. no frame after it in decode order shown before it). Frames in
    # front of one are needed by nothing after it, which lets decode_pyav skip GOP tails. None: unknown.
    clean_keyframe: np.ndarray | None = None
    # The stream indexed (container.streams position): the best video stream, which DALI decodes too.
    stream_index: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])


def indexed_stream(container, index: VideoIndex):
    """The stream of an open container that `index` describes (the best video stream, as DALI's, which
    is not always the first)."""
    return container.streams[index.stream_index]


# Containers that seek by index to a keyframe (mpeg-ts/ps seek by byte position and can land past one).
SEEKABLE_FORMATS = ("mp4", "mov", "matroska", "webm", "flv", "avi")


def pts_to_seconds(pts: np.ndarray, pts0: int, time_base: Fraction) -> np.ndarray:
    # Integer numerator first, one division last: exact for timestamps that are exact in seconds
    # (k/fps in a 1/90000 base stays exact), which keeps frames on window boundaries on the right side.
    return ((pts - pts0) * time_base.numerator).astype(np.float64) / time_base.denominator


def _tag_seconds(value) -> float | None:
    """'HH:MM:SS.fffffffff' (a Matroska DURATION tag) in seconds; None when absent or malformed."""
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)", (value or "").strip())
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _declared_duration(container, stream) -> tuple[float, float | None] | None:
    """(seconds of video the header declares, the time they count from) or None when it does not say.

    A stream duration (mp4/mov, mpeg-ts) counts from the stream's first frame (None). A container
    duration (webm/mkv/flv) counts from timestamp 0, also when the first frame comes later (a start
    delay, a cut from a longer recording that kept its timestamps): the video is measured to its end
    time, not from its first frame. A track's DURATION tag (mkv/webm) is an end time from 0 too."""
    import av

    if stream.duration and stream.duration > 0:
        return float(stream.duration * stream.time_base), None
    # mkv/webm written by FFmpeg (and mkvmerge) tag each track with its own end time, from 0; a
    # finished file has them filled in at the front, so a cut one still says how long its video was.
    tagged = _tag_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if tagged is not None and tagged > 0:
        return tagged, 0.0
    # webm/mkv declare only the whole file's duration: that is the video's only when nothing else
    # is in the file (a longer audio track, or another video track, must not make the video look truncated).
    if (container.duration and container.duration > 0 and len(container.streams.video) == 1
            and all(s.type == "video" for s in container.streams)):
        return container.duration / av.time_base, 0.0
    return None


def not_a_file(path) -> str | None:
    """Why `path` cannot be a video file (missing, a broken link, a folder), None for a file."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return "a folder, not a video file"
    if not path.is_symlink():
        return "file not found"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
    return "broken symbolic link (its target is missing)"


# AV_DISPOSITION_ATTACHED_PIC: a stream holding one cover picture, not moving video.
_ATTACHED_PICTURE = 0x400
# H.264 and HEVC reorder at most 16 frames: a frame shown before one demuxed more than 16 packets
# earlier is a timestamp that went back (recordings joined byte-wise, a reset), not B-frame reordering.
_MAX_REORDER = 16


def _video_stream(container):
    """The video stream to index: the one DALI's readers decode (FFmpeg's av_find_best_stream: a
    default-marked track before others, a cover picture last) when FFmpeg can decode it, else the first
    that it can; the PyAV decoders open the same one by its index. VideoError when there is none."""
    # FFmpeg opens any text file as an "ansi" video (its tty demuxer renders text as frames).
    videos = list(container.streams.video)
    if container.format.name == "tty" or any(s.codec_context is not None and s.codec_context.name == "ansi"
                                             for s in videos):
        raise VideoError("not a video: a text file (FFmpeg would render it as an 'ansi' video)")
    kinds = ", ".join(sorted({s.type for s in container.streams}) or ["none"])
    if not videos:
        raise VideoError(f"no video stream (streams: {kinds})")
    moving = [s for s in videos if not int(s.disposition) & _ATTACHED_PICTURE]
    if not moving:
        raise VideoError(f"no video stream, only an attached cover picture (streams: {kinds})")
    decodable = [s for s in moving if s.codec_context is not None]  # None: a codec FFmpeg has no decoder for
    if not decodable:
        raise VideoError("no decoder for its video codec (FFmpeg does not know the codec of "
                         + ("its video stream)" if len(moving) == 1 else f"any of its {len(moving)} video streams)"))
    best = container.streams.best("video")
    return next((s for s in decodable if best is not None and s.index == best.index), decodable[0])


def _timestamps_go_back(demuxed: list[int], time_base: Fraction) -> str | None:
    """Why the timestamps (pts in demux order) cannot be windowed, None when they can: a second timeline
    (joined recordings, a timestamp reset), i.e. many frames shown before frames demuxed more than
    _MAX_REORDER packets earlier *and* many shown after frames demuxed that far later. Sorting by pts
    would interleave the timelines and the windows would cover the first only. One stray timestamp
    (a glitching muxer, a bit error in an mpeg-ts header) is out of order one way only, however far:
    it is sorted into place and sampled where it says, as before."""
    pts = np.asarray(demuxed, dtype=np.int64)
    lag = _MAX_REORDER + 1
    if len(pts) <= lag:
        return None
    running_max = np.maximum.accumulate(pts)
    behind = np.flatnonzero(pts[lag:] < running_max[:-lag]) + lag   # below a frame demuxed `lag` earlier
    ahead = np.count_nonzero(pts[:-lag] > np.minimum.accumulate(pts[::-1])[::-1][lag:])   # above one `lag` later
    out_of_order = min(len(behind), ahead)
    if out_of_order <= max(_MAX_REORDER, len(pts) // 100):
        return None
    i = int(behind[0])
    at, after = (float(v * time_base) for v in (pts[i], running_max[i - 1]))
    return (f"timestamps go back: a frame timed {at:.2f} s follows frames timed up to {after:.2f} s in the file "
            f"({out_of_order} frames out of order beyond decoder reordering; recordings joined without "
            f"re-timing, or a timestamp reset), which windows by timestamp cannot follow; remux it with "
            f"increasing timestamps")


def probe_video(path) -> VideoIndex:
    """Demux every packet of the video stream; raise VideoError with a readable reason on bad input."""
    import av

    path = str(path)
    unreadable = not_a_file(path)
    if unreadable:
        raise VideoError(unreadable)
    if Path(path).stat().st_size == 0:
        raise VideoError("zero-byte file")
    try:
        container = av.open(path, mode="r")
    except av.FFmpegError as err:
        raise VideoError(f"not a readable media file ({type(err).__name__}: {err.strerror or err})") from None
    with container:
        stream = _video_stream(container)
        stream_index = stream.index  # read while the container is open (a closed one's stream is freed)
        if container.format.name == "mjpeg":  # raw JPEGs back to back: nothing says their rate
            raise VideoError("a raw mjpeg stream, not a container: FFmpeg would time its frames at 25 fps "
                             "whatever their rate; remux it with its frame rate, e.g. "
                             "`ffmpeg -r 10 -i IN -c copy OUT.mkv`")
        codec = stream.codec_context.name
        container_format = container.format.name
        decode_order = "avi" in container.format.name.split(",")
        seeks = bool(set(container.format.name.split(",")) & set(SEEKABLE_FORMATS)) and not decode_order
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = stream.time_base
        declared = _declared_duration(container, stream)
        pts, durations, keys, clean = [], [], [], []
        codec_id = stream.codec_context.codec.canonical_name  # the format's name ("av1"), not the decoder's
        nal_length = _nal_length_size(codec_id, stream.codec_context.extradata)
        key_at = None                         # list position of the last keyframe demuxed
        untimed = 0                           # packets with neither pts nor dts
        try:
            for packet in container.demux(stream):
                if packet.size == 0:          # the demuxer's end-of-stream flush packet
                    continue
                # AVI: the packet numbers (dts) are its timeline. FFmpeg's H.264/HEVC parsers derive a pts from
                # the next packet's number, which after a run of empty chunks (dropped frames) timed the frame
                # before the gap at its end.
                first, second = (packet.dts, packet.pts) if decode_order else (packet.pts, packet.dts)
                p = first if first is not None else second
                untimed += p is None
                if p is None or packet.is_discard:
                    continue
                if packet.is_keyframe:
                    key_at = len(pts)
                    clean.append(_refreshes_decoder(codec_id, bytes(packet), nal_length))
                else:
                    clean.append(False)
                    if key_at is not None and p < pts[key_at]:
                        clean[key_at] = False  # a leading picture: it may predict from before the keyframe
                pts.append(p)
                durations.append(packet.duration or 0)
                keys.append(bool(packet.is_keyframe))
        except av.FFmpegError as err:
            if not pts:
                raise VideoError(f"unreadable video data ({err.strerror or err})") from None
            # A damaged tail: keep what was demuxed (DALI's index stops at the same point); a long
            # one is caught by the truncation check below.
    if not pts and untimed:
        raise VideoError(f"{untimed} frames without timestamps: a raw {codec} stream, not a container; remux it "
                         f"with its frame rate, e.g. `ffmpeg -r 25 -i IN -c copy OUT.mp4`")
    if not pts:
        raise VideoError("video stream has no frames")
    if untimed > max(1, (len(pts) + untimed) // 100):
        # H.264/HEVC in MPEG-PS (.mpg/.vob): one timestamp per PES packet, which FFmpeg's parsers do not
        # fill in for the frames after the first. Those frames could not be placed in time: windows would
        # sample from the few timed ones and the duration would be guessed.
        raise VideoError(f"{untimed} of {len(pts) + untimed} frames have no timestamps ({codec} in "
                         f"{container_format}); remux or re-encode it into mp4/mkv, e.g. "
                         f"`ffmpeg -i IN -c:v libx264 OUT.mp4`")
    if not decode_order:  # AVI's "pts" are packet numbers, in order by construction
        went_back = _timestamps_go_back(pts, time_base)
        if went_back:
            raise VideoError(went_back)
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    pts_arr = np.asarray(pts, dtype=np.int64)[order]
    dur_arr = np.asarray(durations, dtype=np.int64)[order]
    times = pts_to_seconds(pts_arr, int(pts_arr[0]), time_base)
    # Last frame's display duration: its packet duration, else the median frame interval.
    last = int(dur_arr[-1])
    if last <= 0:
        last = int(np.median(np.diff(pts_arr))) if len(pts_arr) > 1 else 0
    duration = float(pts_to_seconds(np.asarray([pts_arr[-1] + last]), int(pts_arr[0]), time_base)[0])
    # A file cut short whose index survives (mp4 with moov at the front, webm/mkv) demuxes its prefix
    # without any error; only the header still knows the full length. Small shortfalls (rounding, a
    # last-frame duration, a few packets lost at the very end) keep the prefix, as before.
    if declared is not None:
        length, since = declared
        readable = duration if since is None else float(
            pts_to_seconds(np.asarray([pts_arr[-1] + last]), 0, time_base)[0]) - since
        if length - readable > max(1.0, 0.05 * length):
            raise VideoError(f"truncated: the header declares {length:.1f} s of video, "
                             f"only {readable:.1f} s is readable")
    return VideoIndex(path=path, codec=codec, width=width, height=height, time_base=time_base,
                      pts=pts_arr, times=times, keyframe=np.asarray(keys, dtype=bool)[order],
                      duration=duration, pts_in_decode_order=decode_order, seeks_by_index=seeks,
                      clean_keyframe=np.asarray(clean, dtype=bool)[order], stream_index=stream_index)


# Codecs whose keyframes reset every reference: nothing decoded after one predicts from before it.
_REFRESHING_KEYFRAMES = frozenset({"vp8", "vp9", "av1"})


def _nal_length_size(codec: str, extradata: bytes | None) -> int | None:
    """Bytes of the length prefix before each NAL unit of an H.264/HEVC packet stored as in mp4/mkv
    (avcC/hvcC extradata, first byte 1); None: Annex B start codes (mpeg-ts, raw streams)."""
    if not extradata or extradata[0] != 1:
        return None
    if codec == "h264" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 21:
        return (extradata[21] & 3) + 1
    return None


def _nal_types(data: bytes, length_size: int | None, hevc: bool) -> set[int]:
    types = set()
    starts = []
    if length_size:
        i = 0
        while i + length_size < len(data):
            n = int.from_bytes(data[i:i + length_size], "big")
            i += length_size
            if n <= 0 or i + n > len(data):
                break  # malformed: what was read so far decides
            starts.append(i)
            i += n
    else:
        i = data.find(b"\x00\x00\x01")
        while i >= 0 and i + 3 < len(data):
            starts.append(i + 3)
            i = data.find(b"\x00\x00\x01", i + 3)
    for i in starts:
        types.add((data[i] >> 1) & 0x3F if hevc else data[i] & 0x1F)
    return types


def _refreshes_decoder(codec: str, data: bytes, length_size: int | None) -> bool:
    """A keyframe packet after which the decoder needs nothing decoded before it: an H.264 IDR slice
    (a non-IDR I picture may be referenced across), an HEVC IRAP (IDR/CRA/BLA: trailing pictures may
    not reference across; leading ones are checked by the caller), or a VP8/VP9/AV1 keyframe."""
    if codec in _REFRESHING_KEYFRAMES:
        return True
    if codec == "h264":
        return 5 in _nal_types(data, length_size, hevc=False)
    if codec == "hevc":
        return any(16 <= t <= 21 for t in _nal_types(data, length_size, hevc=True))
    return False
