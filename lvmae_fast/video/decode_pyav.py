"""CPU decoding with PyAV (any codec FFmpeg knows): one sequential pass, windows yielded in order.

Frames are matched by pts against the frames the plan asks for. A frame the decoder never produces
(damaged data) is replaced by the last decoded frame before it, as a player would show it; when more
than MAX_MISSING of the sampled frames (and more than a couple) are missing, the video is refused as
damaged instead of being embedded from stand-ins. Frames before the first decodable one (a file cut
from a longer recording mid-GOP starts with frames that reference data it no longer has) take the
first decoded frame, with a warning, and do not count as damage.

Windows listed in `skip` (embedded by an earlier, killed job) are not produced. When they form a
prefix, decoding starts at the keyframe before the first needed frame, in containers that seek by
index to a keyframe (mp4/mov, matroska/webm, flv, avi); the seek is kept only if the first frame it
yields is an intact keyframe at or before the first needed frame, else the file is decoded from the
start (mpeg-ts/ps seek by byte position and can land past a keyframe; a damaged keyframe is concealed
from the frames before it).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from typing import Callable, Iterator

import numpy as np

from .probe import SEEKABLE_FORMATS, VideoError, VideoIndex, indexed_stream, pts_to_seconds
from .windows import WindowPlan, windows_to_decode

log = logging.getLogger(__name__)

# The oldest PyAV whose frames come out right: 14-16's to_ndarray converts BT.709 and BT.2020 video with
# BT.601's matrix (a flat BT.709 grey-orange came out 8 levels off in red), and 12-13 lack APIs the probe
# uses (a review on 2026-11-27 ran 12.3 to 18.1).
PYAV_MINIMUM = "17"
PYAV_MINIMUM_WHY = "older versions convert BT.709 colour with BT.601's matrix"
MAX_MISSING = 0.05   # fraction of sampled frames that may be stood in for before a video is refused
# Frames no window samples that are not references (most B-frames of camera and web video) are not
# decoded at all (FFmpeg's skip_frame=NONREF, set per packet): no other frame is predicted from them,
# so the sampled frames come out bit for bit the same, and a decode does up to half the work less.
SKIP_UNNEEDED_NONREF = True
# Nor are the frames of a GOP after the last one a window samples: once every sampled frame up to the
# next clean keyframe (probe.VideoIndex.clean_keyframe: an IDR, which nothing after it predicts across)
# has been sent to the decoder, the packets until that keyframe are dropped (skip_frame=ALL). The
# sampled frames come out bit for bit the same; at T=8 frames per 5 s and 2-s GOPs about 1/7 of the
# frames are never decoded, more with shorter GOPs or longer windows (whole GOPs without a sample).
SKIP_GOP_TAILS = True
# Both skips need a decoder that reads skip_frame per packet: FFmpeg's own for these codecs (each covered
# by the skip tests). Others read it once when opened, e.g. libdav1d, PyAV's AV1 decoder: a per-packet
# NONREF there dropped sampled frames, and every AV1 video was refused as damaged (until 2026-11-27).
# Their videos decode every frame.
PER_PACKET_SKIP_DECODERS = frozenset({"h264", "hevc", "vp8", "vp9"})
# extract --skip-deblocking sets FFmpeg's skip_loop_filter, which its H.264, HEVC and VP8 decoders honour
# (checked by decoding with and without: VP9, AV1 through libdav1d and MPEG-4 part 2 come out the same).
# Without the loop filter 1080p camera-like H.264 decoded 1.18-1.25x as fast on this project's 2-core box
# (bench/extract.py --variant deblocking=skip); the frames differ by the blocking the filter smooths
# (0.75 levels of 255 on average there).
# Frames a decoder may output before one it decoded earlier (H.264/HEVC reorder at most their DPB's 16):
# how long a part holds a window back (decode_windows_pyav).
REORDER_FRAMES = 16


class SharedDamage:
    """What the parts of one long video decoded side by side (extract's parts) share. A part gives the
    frames of one pass only while nothing in it is damaged: the decoder state, the stand-ins and the
    whole-video damage budget of one pass all depend on what came before. So a part that meets damage (a
    frame it must stand in, a frame FFmpeg flags corrupt, a decode error) stops, and the caller decodes
    the rest of the video in one decode from the start of the file, as one pass would (`redo`); the
    parts after it are then superseded (they stop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.redone_by: int | None = None   # the first window of the earliest part that decodes the rest

    def redo(self, part: int) -> None:
        """The part whose first window is `part` decodes the rest of the video."""
        with self._lock:
            if self.redone_by is None or part < self.redone_by:
                self.redone_by = int(part)

    def superseded(self, part: int) -> bool:
        """The part whose first window is `part` is covered by an earlier part's decode of the rest."""
        by = self.redone_by
        return by is not None and by < part


def _missing_budget(needed: int) -> int:
    return max(2, int(MAX_MISSING * needed))


# NVDEC decodes in torch's CUDA context (FFmpeg's current_ctx) instead of one context of their own per
# decode: no switching between up to 16 decode contexts and torch's on the GPU, no context created per
# video. Opt-in (bench/extract.py --nvdec-context shared) until a GPU host shows which is faster.
NVDEC_SHARED_CONTEXT = False


@functools.lru_cache(maxsize=None)
def _libcuda():
    import ctypes

    return ctypes.CDLL("libcuda.so.1")


def _cuda_call(name: str, *args) -> None:
    status = getattr(_libcuda(), name)(*args)
    if status != 0:
        raise OSError(f"{name} failed (CUresult {status})")


@functools.lru_cache(maxsize=None)
def _primary_context(device_index: int) -> int:
    """The device's primary context (torch's), retained once for the life of the process: FFmpeg's
    decoders keep its handle, which a release could otherwise destroy if torch had not retained it yet.
    Its threads are also made to sleep while they wait on the GPU (_block_while_waiting)."""
    import ctypes

    device, context = ctypes.c_int(), ctypes.c_void_p()
    _cuda_call("cuInit", 0)
    _cuda_call("cuDeviceGet", ctypes.byref(device), device_index)
    _cuda_call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
    _block_while_waiting(device)
    return int(context.value)


CU_CTX_SCHED_MASK, CU_CTX_SCHED_BLOCKING_SYNC = 0x07, 0x04


def _block_while_waiting(device) -> None:
    """Make threads that wait on the GPU in the primary context sleep instead of spin. torch brings the
    context up with CUDA's default scheduling, which spins while a wait lasts when a process has fewer
    contexts than CPUs: NVDEC decodes in that context (each waits for every frame it maps) would then
    spin on the cores that CPU decodes need. FFmpeg's contexts of its own are blocking-sync already.
    cuDevicePrimaryCtxSetFlags_v2 changes the flags of an active context; where it fails the decodes
    still run, spinning, with a warning."""
    import ctypes

    flags, active = ctypes.c_uint(), ctypes.c_int()
    try:
        _cuda_call("cuDevicePrimaryCtxGetState", device, ctypes.byref(flags), ctypes.byref(active))
        wanted = (flags.value & ~CU_CTX_SCHED_MASK) | CU_CTX_SCHED_BLOCKING_SYNC
        if flags.value != wanted:
            _cuda_call("cuDevicePrimaryCtxSetFlags_v2", device, ctypes.c_uint(wanted))
    except (OSError, AttributeError) as err:  # AttributeError: a driver without the call
        log.warning("NVDEC decodes in torch's CUDA context will spin while they wait: could not switch the "
                    "context to blocking sync (%s)", err)


def _bind_primary_context(device_index: int) -> None:
    """Make the device's primary context (torch's) current on this thread, through the driver API:
    FFmpeg's current_ctx takes whatever context is current when the decoder opens, and a thread that
    has made no CUDA call has none (torch.cuda.set_device skips the call when the device number already
    matches)."""
    import ctypes

    _cuda_call("cuCtxSetCurrent", ctypes.c_void_p(_primary_context(device_index)))


def nvdec_accel(device_index: int = 0, shared: bool | None = None):
    """PyAV decode on NVDEC through FFmpeg's CUDA hwaccel (a fresh settings object per decode). Frames
    stay on the GPU (is_hw_owned) and only the ones converted, the sampled ones, are downloaded; a
    stream NVDEC cannot decode falls back to FFmpeg's software decoder.

    FFmpeg gets a CUDA context of its own (primary_ctx 0). PyAV's is_hw_owned otherwise asks for the
    device's primary context, which FFmpeg retains only with blocking-sync scheduling: once torch has
    brought that context up (any CUDA tensor, the encoder on the GPU) with its own flags, FFmpeg refuses
    it ("Primary context already active with incompatible flags", ENOTSUP = "[Errno 95] Operation not
    supported"), which is how every NVDEC decode failed in `lvmae extract` on an H200 (2026-11-26). Had
    FFmpeg come first instead, it would have switched torch's context to blocking sync. `shared`
    (default NVDEC_SHARED_CONTEXT): FFmpeg adopts torch's primary context instead (current_ctx), made
    current on this thread first; no flags are checked that way."""
    from av.codec.hwaccel import HWAccel

    options = {"primary_ctx": "0"}
    if NVDEC_SHARED_CONTEXT if shared is None else shared:  # called on the thread that opens the decoder
        _bind_primary_context(device_index)
        options["current_ctx"] = "1"
    return HWAccel("cuda", device=str(device_index), allow_software_fallback=True, is_hw_owned=True,
                   options=options)


@contextlib.contextmanager
def _ffmpeg_log():
    """FFmpeg's warnings and errors while the block runs, all threads (a hwaccel is set up on a frame
    thread), as a callable giving them in one line: why a fallback happened ("Cannot load
    libnvcuvid.so.1", "Failed setup for format cuda") is only ever said there, and PyAV keeps FFmpeg's
    log off by default. The log level is global: meant for a check once per job, not around decodes."""
    import av.logging

    before = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)
    try:
        with av.logging.Capture(local=False) as logs:
            yield lambda: "; ".join(dict.fromkeys(f"[{name}] {text.strip()}" for _, name, text in logs))
    finally:
        av.logging.set_level(before)


def nvdec_problem(device_index: int = 0) -> str | None:
    """Why NVDEC decode through PyAV cannot run here (None: it decoded a test clip on the GPU): the CUDA
    device or the driver's decode library missing, or FFmpeg falling back to software. Checked once per
    job, so that a host without NVDEC gets one message instead of a failure per video."""
    import io

    import av

    clip = io.BytesIO()
    try:
        with av.open(clip, "w", format="mp4") as out:  # 2 frames of H.264, written here: nothing to ship
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for i in range(2):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 60 * i, np.uint8), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        clip.seek(0)
        with _ffmpeg_log() as said, av.open(clip, "r", hwaccel=nvdec_accel(device_index)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            # is_hwaccel only says the settings were taken; the frames say who decoded them.
            software = not stream.codec_context.is_hwaccel or any(f.format.name != HW_FRAME_FORMAT for f in frames)
        if software:
            return "FFmpeg fell back to its software decoder" + (f" (FFmpeg said: {said()})" if said() else "")
        if len(frames) != 2:
            return f"the test clip decoded to {len(frames)} frames, not 2"
    except (av.FFmpegError, OSError, ValueError, TypeError) as err:  # TypeError: a PyAV without is_hw_owned
        return f"{type(err).__name__}: {err}"
    return None


def _open(path: str, settings=None):
    """The container, for a decode on NVDEC where `settings` (PyAV HWAccel) are given."""
    import av

    try:
        return av.open(path, mode="r") if settings is None else av.open(path, mode="r", hwaccel=settings)
    except av.FFmpegError as err:
        raise VideoError(f"cannot open for decoding ({err.strerror or err})") from None


# The pixel format of a frame NVDEC decoded, left on the GPU (is_hw_owned). Given NVDEC settings, PyAV
# decodes in software, silently, where NVDEC cannot: a codec without a CUDA hwaccel (PyAV then drops the
# settings), or, with allow_software_fallback, a stream or session NVDEC refuses (`is_hwaccel` still says
# True there: it tells only that the settings were taken). The frames then come out in yuv420p & co.
HW_FRAME_FORMAT = "cuda"


_rotated_told: collections.OrderedDict[str, None] = collections.OrderedDict()  # paths warned of (the last 4096)
_rotated_lock = threading.Lock()


def _tell_rotated(path: str, degrees: int) -> None:
    """Warn once per video (its parts decode apart) that its display rotation is not applied."""
    with _rotated_lock:
        if path in _rotated_told:
            return
        _rotated_told[path] = None
        if len(_rotated_told) > 4096:
            _rotated_told.popitem(last=False)
    log.warning("%s: its player shows it rotated by %d degrees (display matrix), its frames are embedded "
                "as stored, unrotated, as DALI decodes them; to embed what viewers see, re-encode it "
                "upright first (the ffmpeg tool applies the rotation when it re-encodes)", path, degrees)


def _log_software(path: str) -> None:
    log.warning("%s: NVDEC did not decode this video; FFmpeg's software decoder did, on the CPU", path)


def _decoded(container, stream, keep: set[int] | None, tails: dict[int, int] | None = None,
             errors: list[str] | None = None, on_software: Callable[[], None] | None = None) -> Iterator:
    """container.decode(stream), with the packets of frames outside `keep` (pts) decoded only when other
    frames refer to them (skip_frame is read per packet, frame threads included). `tails` (_tail_counts):
    after the last needed packet before the next clean keyframe, nothing is decoded until that keyframe
    (a segment without needed frames is skipped whole, its keyframe included). `errors`: a packet the
    decoder refuses (VP9, VP8 and MJPEG raise for a damaged packet where H.264 conceals) is noted there
    and decoding goes on, as players and the ffmpeg tool do; None: its error is raised. `on_software` (a
    decode given NVDEC settings): called at its first frame that is not a GPU frame (FFmpeg's software
    decoder made it)."""
    import av

    context = stream.codec_context
    left = None  # needed packets of this segment not yet sent; None until the first clean keyframe
    for packet in container.demux(stream):
        if keep is not None and packet.is_discard:
            # An edit list's lead-in to the next shown section (decoded, never shown, not in the index): its
            # pts may equal a needed frame's, so it must not count as that frame (nor as a tail's keyframe).
            context.skip_frame = "ALL" if left == 0 else "NONREF"
        elif keep is not None:
            pts = packet.pts
            if tails is not None and pts in tails:
                left = tails[pts]
            if pts is None:  # the end-of-stream flush packet among them: every buffered frame comes out
                context.skip_frame = "DEFAULT"
            elif left == 0:
                context.skip_frame = "ALL"
            elif pts in keep:
                context.skip_frame = "DEFAULT"
                left = None if left is None else left - 1
            else:
                context.skip_frame = "NONREF"
        try:
            frames = packet.decode()
        except av.FFmpegError as err:
            if errors is None:
                raise
            errors.append(err.strerror or str(err))
            continue
        if on_software is not None and frames and frames[0].format.name != HW_FRAME_FORMAT:
            on_software()
            on_software = None   # once is enough
        yield from frames


def _tail_counts(index: VideoIndex, keep: set[int] | None) -> dict[int, int] | None:
    """For each clean keyframe (by pts): how many needed packets lie between it and the next clean
    keyframe (SKIP_GOP_TAILS), counted as _decoded counts them: every indexed packet whose pts is needed (B-frames
    around an edit list's cut can give two shown packets one pts). None: no tail is skipped (unknown
    keyframes, or every frame wanted)."""
    if keep is None or not SKIP_GOP_TAILS or index.clean_keyframe is None:
        return None
    clean = index.pts[index.clean_keyframe]              # ascending
    if len(clean) == 0:
        return None
    needed = index.pts[np.isin(index.pts, np.fromiter(keep, dtype=np.int64, count=len(keep)))]  # ascending
    first = np.searchsorted(needed, clean, side="left")
    return dict(zip(clean.tolist(), (np.append(first[1:], len(needed)) - first).tolist()))


def _frames(index: VideoIndex, threads: int, seek_to: int | None, keep: set[int] | None = None,
            hwaccel=None, errors: list[str] | None = None, on_software: Callable[[], None] | None = None,
            deblock: bool = True) -> Iterator:
    """Decoded frames of the video stream, from `seek_to` (a keyframe's pts) when the container can
    seek there exactly, else from the start. `keep`: the pts the caller needs; other non-reference
    frames, and GOP tails after the last needed frame, are skipped (SKIP_UNNEEDED_NONREF,
    SKIP_GOP_TAILS). `hwaccel`: a callable giving PyAV HWAccel settings (nvdec_accel), None = software
    decode. `errors`: as _decoded's (a seek that is given up leaves none there); `on_software`: called
    at the first frame FFmpeg's software decoder made though NVDEC settings were given (default: a
    warning is logged). `deblock`: False skips the in-loop deblocking filter (H.264, HEVC, VP8)."""
    import av

    tails = _tail_counts(index, keep)

    def opened():
        """(container, what _decoded calls at a software frame: None where no NVDEC settings were given)."""
        settings = None if hwaccel is None else hwaccel()   # fresh per open: PyAV binds them to one decoder
        software = None if settings is None else on_software or functools.partial(_log_software, index.path)
        return _open(index.path, settings), software

    if seek_to is not None:
        container, software = opened()
        with container:
            names = set(container.format.name.split(","))
            if names & set(SEEKABLE_FORMATS):
                stream = _video_stream(container, index, threads, deblock)
                noted = None if errors is None else len(errors)
                try:  # a seek FFmpeg refuses (a damaged index) falls back to the decode from the start too
                    container.seek(int(seek_to), stream=stream, backward=True, any_frame=False)
                    decoded = _decoded(container, stream, keep, tails, errors, software)
                    first = next(decoded, None)
                except av.FFmpegError:
                    first = None
                # A keyframe FFmpeg flags corrupt was concealed from the frames before it, which a decode
                # that starts there does not have: its pictures would differ from one pass's.
                if (first is not None and first.pts is not None and first.pts <= seek_to and first.key_frame
                        and not first.is_corrupt):
                    yield first
                    yield from decoded
                    return
                log.info("%s: seek to pts %d landed elsewhere; decoding from the start", index.path, seek_to)
                if errors is not None:
                    del errors[noted:]
    container, software = opened()
    with container:
        yield from _decoded(container, _video_stream(container, index, threads, deblock), keep, tails, errors,
                            software)


def _video_stream(container, index: VideoIndex, threads: int, deblock: bool = True):
    stream = indexed_stream(container, index)
    stream.thread_type = "AUTO"
    if threads:
        stream.thread_count = threads
    if not deblock:  # read when the decoder opens, at the first packet
        stream.codec_context.options = {"skip_loop_filter": "all"}
    return stream


def decode_windows_pyav(index: VideoIndex, plan: WindowPlan, threads: int = 0, skip: np.ndarray | None = None,
                        damage: SharedDamage | None = None, redo: int | None = None, through: int | None = None,
                        hwaccel=None, one_pass_skip: np.ndarray | None = None,
                        on_software: Callable[[], None] | None = None,
                        deblock: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (window index, uint8 frames [T, H, W, 3] RGB, seconds [T] of the frames actually decoded)
    for every window of `plan` not marked in `skip`, in order. `damage`: this decode is one part of the
    video (SharedDamage): it stops once an earlier part has handed the rest of the video to one decode,
    and any damage it meets (a frame to stand in, a frame FFmpeg flags corrupt, a decode error) raises
    VideoError; the caller then decodes the rest of the video with `redo` (the part's first window):
    from the start of the file (the decoder state of one pass), stand-ins counted against the budget as
    in one pass. `through` (a part's): the pts of the next part's first frame; one pass decodes what
    lies between the two parts too, so the part decodes on to there (a decode error there is damage).
    `hwaccel`: decode on NVDEC (nvdec_accel), frames matched and stood in for exactly as in software;
    `on_software`: called if FFmpeg decodes the video in software instead (default: a warning is logged).
    `one_pass_skip` (a redo's): the windows one pass over the video would skip; the redo then decodes
    (and skips: non-reference frames, GOP tails) exactly the frames that pass would, those of the windows
    already delivered included, so that it meets the same damage. `deblock`: False skips the in-loop
    deblocking filter where the decoder allows it (H.264, HEVC, VP8; software decodes only)."""
    import av

    if hwaccel is not None and not deblock:
        raise ValueError("NVDEC always deblocks: skipping the deblocking filter is for software decodes only")
    active = windows_to_decode(len(plan), skip)
    if len(active) == 0:
        return
    wanted_pts = index.pts[plan.frames[active]]         # [n_active, T] pts of each sampled frame
    needed = np.unique(wanted_pts)                      # ascending
    # The damage budget is the whole video's: sized on the frames left to decode, a video resumed after a
    # kill or finished after a DALI failure would get a smaller one than a fresh PyAV run (same file,
    # another verdict).
    sampled = len(np.unique(index.pts[plan.frames]))
    strict = damage is not None and redo is None   # a part: any damage hands the rest to a redo
    part = int(active[0]) if redo is None else int(redo)   # the part's first window
    budget = 0 if strict else _missing_budget(sampled)
    # A window is complete once the largest pts it needs has been assigned.
    window_last = wanted_pts.max(axis=1)
    # Frames still needed by a later window are kept; others are dropped as decoding advances.
    pts0 = int(index.pts[0])
    last_use = {int(p): -1 for p in needed}
    for k in range(len(active)):
        for p in wanted_pts[k]:
            last_use[int(p)] = k

    got: dict[int, np.ndarray] = {}
    got_pts: dict[int, int] = {}        # wanted pts -> pts of the frame that stands in for it
    next_k, j, missing, leading = 0, 0, 0, 0
    last_frame, last_array = None, None

    # (width, height) every frame is scaled to: the stream's, as probed, so that a decode starting midway (a part,
    # a resume) scales like one pass over a video whose resolution changes; the first decoded frame's where
    # the demuxer could not tell.
    size: tuple[int, int] | None = (index.width, index.height) if index.width > 0 and index.height > 0 else None

    def array_of(frame):
        nonlocal last_frame, last_array, size
        if frame is not last_frame or last_array is None:
            if last_frame is None and getattr(frame, "rotation", 0):   # the first frame this decode converts
                _tell_rotated(index.path, frame.rotation)
            if size is None:
                size = (frame.width, frame.height)
            # A stream that changes resolution midway (joined recordings, adaptive streams) is scaled
            # to one size, so every window stacks to one shape.
            last_frame, last_array = frame, frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
        return last_array

    def stand_in(frame, frame_pts: int, counts_as_damage: bool):
        nonlocal j, missing
        if counts_as_damage:
            missing += 1
            if missing > budget:
                at = pts_to_seconds(np.asarray([needed[j]]), pts0, index.time_base)[0]
                raise VideoError(f"damaged video data: more than {budget} of the {sampled} sampled frames "
                                 f"could not be decoded (number {budget + 1} at {at:.2f} s)")
        got[int(needed[j])] = array_of(frame)
        got_pts[int(needed[j])] = frame_pts
        j += 1

    def flush(upto_pts: float):
        nonlocal next_k
        while next_k < len(active) and window_last[next_k] <= upto_pts:
            k = next_k
            used = np.asarray([got_pts[int(p)] for p in wanted_pts[k]], dtype=np.int64)
            yield int(active[k]), np.stack([got[int(p)] for p in wanted_pts[k]]), pts_to_seconds(used, pts0, index.time_base)
            for p in set(int(p) for p in wanted_pts[k]):
                if last_use[p] <= k:
                    got.pop(p, None)
            next_k += 1

    # Resuming past a prefix of embedded windows: start at the last keyframe at or before the first
    # frame still needed (a keyframe's own pts is an exact seek target).
    keys = index.pts[index.keyframe & (index.pts <= needed[0])]
    seek_to = int(keys.max()) if len(keys) and keys.max() > index.pts[0] else None
    if index.pts_in_decode_order or redo is not None:
        seek_to = None  # frames are matched by output position, which only a decode from the start knows
    prev, prev_pts, position = None, None, 0
    # Frames matched by output position (no pts) must all come out; otherwise only needed ones must.
    decoded_for = needed if one_pass_skip is None else np.unique(
        index.pts[plan.frames[windows_to_decode(len(plan), one_pass_skip)]])
    keep = (None if index.pts_in_decode_order or not SKIP_UNNEEDED_NONREF or index.codec not in PER_PACKET_SKIP_DECODERS
            else {int(p) for p in decoded_for})
    if keep is not None and strict and through is not None:
        # The next part's first sampled frame ends this part's decode: it must come out (one pass decodes
        # it too), else skipped GOP tails would run this decode on to the file's end.
        keep.add(int(through))
    # A part (strict) hands a window on only once REORDER_FRAMES more frames have come out undamaged, and
    # decodes that many past its end: a damaged reference decoded before a frame but shown after it
    # (B-frames, open GOPs) is flagged corrupt only when it comes out, and a window holding a frame
    # predicted from it must go to the one-pass redo with the rest (its concealed pixels differ by start).
    lag = REORDER_FRAMES if strict else 0
    held = collections.deque(maxlen=lag + 1)  # pts of the last lag + 1 frames out: windows up to the oldest go
    settled = 0  # frames out since every needed frame (and `through`) came out
    # Packets the decoder refused (one pass goes on after them; a part hands the video to a redo). Frames
    # matched by output position (AVI) cannot go on: a packet without a frame would shift every later one,
    # so there the first refusal ends the decode (the frames after it are stood in, as a damaged tail).
    errors: list[str] | None = None if strict or index.pts_in_decode_order else []
    try:
        for frame in _frames(index, threads, seek_to, keep, hwaccel=hwaccel, errors=errors, on_software=on_software,
                             deblock=deblock):
            if damage is not None and damage.superseded(part):
                return  # an earlier part decodes the rest of the video, these windows included
            if strict and frame.is_corrupt:  # concealed: its pixels (and the frames after) may not be one pass's
                raise VideoError("corrupt frame")
            if index.pts_in_decode_order:
                if position >= index.num_frames:
                    break
                pts, position = int(index.pts[position]), position + 1
            else:
                pts = frame.pts if frame.pts is not None else frame.dts
            if pts is None:
                continue
            # Needed frames strictly before this one were never produced: the previous frame stands
            # in (damage), or, before the first decodable frame, this one (a cut file's lead-in).
            while j < len(needed) and needed[j] < pts:
                if prev is None:
                    leading += 1
                    stand_in(frame, pts, counts_as_damage=False)
                else:
                    stand_in(prev, prev_pts, counts_as_damage=True)
            if j < len(needed) and needed[j] == pts:
                got[int(pts)] = array_of(frame)
                got_pts[int(pts)] = pts
                j += 1
            prev, prev_pts = frame, pts
            held.append(pts)
            if len(held) == held.maxlen:
                yield from flush(held[0])
            if j == len(needed) and (not strict or through is None or pts >= through):
                settled += 1
                if settled > lag:
                    break
    except av.FFmpegError as err:  # a packet's decode error where `errors` is None, else the demuxer's
        if prev is None or strict:
            raise VideoError(f"decoding failed ({err.strerror or err})") from None
        # Damaged tail: remaining frames repeat the last good one (same as a player), within budget.
    if prev is None:
        raise VideoError(f"decoding failed ({errors[0]})" if errors else "decoder produced no frames")
    while j < len(needed):
        stand_in(prev, prev_pts, counts_as_damage=True)
    if missing or leading:
        log.warning("%s: %d of %d sampled frames could not be decoded (%d before the first decodable frame); "
                    "the nearest decoded frame stands in", index.path, missing + leading, len(needed), leading)
    if errors:
        log.warning("%s: the decoder refused %d packets (first: %s); decoding went on after them", index.path,
                    len(errors), errors[0])
    yield from flush(np.inf)
