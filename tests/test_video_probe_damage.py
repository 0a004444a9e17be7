"""probe_video on cut files whose index survives: a long shortfall is refused, normal files are not."""
import re
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("av")

from lvmae_fast import synth
from lvmae_fast.video.probe import VideoError, probe_video


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth.write_failure_corpus(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", ["truncated_webm", "truncated_faststart"])
def test_cut_file_with_intact_index_is_truncated(corpus, name):
    with pytest.raises(VideoError) as err:
        probe_video(corpus[name])
    msg = str(err.value)
    assert msg.startswith("truncated"), msg
    m = re.search(r"declares ([\d.]+) s of video, only ([\d.]+) s is readable", msg)
    assert m, msg
    declared, readable = float(m.group(1)), float(m.group(2))
    assert declared == 12.0 and 0 < readable < 6.0


def test_failure_corpus_is_deterministic(corpus, tmp_path):
    again = synth.write_failure_corpus(tmp_path)
    assert sorted(again) == sorted(corpus)
    for name in ("truncated_webm", "truncated_faststart", "damaged_middle"):
        assert again[name].read_bytes() == corpus[name].read_bytes(), name


def test_damaged_middle_still_demuxes(corpus):
    # Its index is intact: probe keeps all 12 s; the undecodable middle is the decoder's business.
    index = probe_video(corpus["damaged_middle"])
    assert index.num_frames == 120 and index.duration == pytest.approx(12.0)


@pytest.mark.parametrize("name,kwargs", [
    ("h264.mp4", dict(duration=6.0, fps=10, codec="h264")),
    ("h264_ntsc.mp4", dict(duration=5.0, fps=29.97, codec="h264")),
    ("h264_faststart.mp4", dict(duration=12.0, fps=10, codec="h264", mux_options={"movflags": "faststart"})),
    ("short.mp4", dict(duration=0.2, fps=10, codec="h264")),
    ("vp9.webm", dict(duration=3.4, fps=8, codec="vp9")),
    ("vp9_long.webm", dict(duration=12.0, fps=30, codec="vp9")),
    ("vp9.mkv", dict(duration=3.0, fps=10, codec="vp9")),
    ("vfr.webm", dict(duration=3.0, fps=10, codec="vp9", vfr=True, seed=1)),
    ("vfr.mp4", dict(duration=2.0, fps=25, codec="h264", vfr=True, seed=1)),
    ("audio.mp4", dict(duration=3.0, fps=10, codec="h264", audio=True)),
    ("audio_vfr.mkv", dict(duration=2.0, fps=25, codec="vp9", vfr=True, seed=1, audio=True)),
])
def test_normal_files_are_not_truncated(tmp_path, name, kwargs):
    video = synth.write_video(tmp_path / name, **kwargs)
    index = probe_video(video.path)
    assert index.num_frames == len(video.frame_times)
    one_frame = 1.0 / kwargs["fps"]
    # VFR: synth's last interval is drawn before the end; the container's last frame duration may differ.
    assert abs(index.duration - video.duration) <= one_frame + 1e-6, (index.duration, video.duration)


def test_small_shortfall_keeps_the_prefix(tmp_path):
    # 30 s: the limit is max(1 s, 5%) = 1.5 s; the last 2% of the bytes hold about 1.1 s.
    whole = synth.write_video(tmp_path / "whole.mp4", duration=30.0, fps=10, codec="h264",
                              mux_options={"movflags": "faststart"}).path
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.98)])
    index = probe_video(cut)
    assert 28.5 < index.duration < 30.0      # a few frames lost: kept, as before
    assert np.all(np.diff(index.times) > 0)


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_video_starting_late_in_its_container_is_not_truncated(tmp_path, suffix, codec):
    """webm/mkv declare the container's length from timestamp 0; a video whose first frame is at
    1.4 s (a start delay, or a cut that kept its timestamps) must be measured to its end time."""
    import av

    path = tmp_path / f"late{suffix}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(100):  # 10 s of video from 1.4 s to 11.4 s
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 1400 + 100 * i, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as c:
        assert c.duration / av.time_base > 11.0  # the header's length counts from 0
    index = probe_video(path)
    assert abs(index.duration - 10.0) < 0.11


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_cut_mkv_with_audio_is_truncated(tmp_path, codec):
    """The container's length is the audio's too, so it cannot judge the video: the per-track
    DURATION tag FFmpeg writes at the front of mkv/webm still does after a cut."""
    whole = synth.write_video(tmp_path / "whole.mkv", duration=12.0, fps=10, codec=codec, audio=True).path
    assert probe_video(whole).duration == pytest.approx(12.0)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match=r"truncated: the header declares 12\.0 s of video"):
        probe_video(cut)


def _write(path, tracks, frames=30, fmt=None, value=10):
    """A file of `tracks` in order: 'h264', 'mpeg2' or 'mjpeg' (10 fps, `frames` frames of grey `value`), 'cover'
    (one mjpeg picture, attached-picture disposition) or 'audio' (aac silence); `fmt`: the muxer."""
    import av

    with av.open(str(path), "w", format=fmt) as out:
        streams = []
        for kind in tracks:
            if kind == "audio":
                streams.append(out.add_stream("aac", rate=16000))
                continue
            encoder = {"h264": "libx264", "mpeg2": "mpeg2video"}.get(kind, "mjpeg")
            s = out.add_stream(encoder, rate=1 if kind == "cover" else 10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p" if encoder == "mjpeg" else "yuv420p"
            if kind == "cover":
                s.disposition = av.stream.Disposition.attached_pic
            streams.append(s)
        for kind, s in zip(tracks, streams):
            if kind == "audio":
                chunks = [av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                          for _ in range(10)]
            else:
                chunks = [av.VideoFrame.from_ndarray(np.full((48, 64, 3), value, np.uint8), format="rgb24")
                          for _ in range(1 if kind == "cover" else frames)]
            for k, chunk in enumerate(chunks):
                chunk.pts = k * 1024 if kind == "audio" else k
                if kind == "audio":
                    chunk.sample_rate = 16000
                for p in s.encode(chunk):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
    return path


@pytest.mark.parametrize("codec,suffix,reason", [
    # An elementary stream (a DVR's .h264 export) has no timestamps: it was refused as "video stream has
    # no frames" although it decodes.
    ("h264", "h264", r"^30 frames without timestamps: a raw h264 stream, not a container; remux"),
    # Raw JPEGs back to back carry no rate: FFmpeg times them at 25 fps (3 s at 10 fps came out as 1.2 s).
    ("mjpeg", "avi", r"^a raw mjpeg stream, not a container: .* remux it with its frame rate"),
])
def test_a_raw_stream_is_refused_with_how_to_remux_it(tmp_path, codec, suffix, reason):
    with pytest.raises(VideoError, match=reason):
        probe_video(_write(tmp_path / f"cam.{suffix}", [codec], fmt=codec))


def test_recordings_joined_without_re_timing_are_refused(tmp_path):
    """Two mpeg-ts recordings joined byte-wise (`cat a.ts b.ts`), both timed from 0: sorted by pts they
    interleave, and the windows covered the first 12 s of the 24 s only, silently."""
    first = _write(tmp_path / "a.ts", ["h264"], frames=120, value=40)
    assert probe_video(first).duration == pytest.approx(12.0)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + _write(tmp_path / "b.ts", ["h264"], frames=120, value=200).read_bytes())
    with pytest.raises(VideoError, match=r"timestamps go back: .*\(\d+ frames out of order beyond decoder reordering; recordings joined"):
        probe_video(joined)


def test_a_video_of_b_frames_reordered_by_the_most_h264_allows_is_not_refused(tmp_path):
    """The timestamps check allows what decoders reorder: x264 with 16 B-frames (its most) and b-pyramid."""
    import av

    path = tmp_path / "b16.mp4"
    texture = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25, options={"bf": "16", "x264-params": "b-adapt=0:b-pyramid=normal"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k in range(200):   # a pan: B-frames pay off, x264 keeps all 16
            f = av.VideoFrame.from_ndarray(np.roll(texture, k, axis=1), format="rgb24")
            f.pts = k
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with av.open(str(path)) as c:  # the file reorders that far: a frame shown before one demuxed 16 packets earlier
        demuxed = np.array([p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None])
    assert (demuxed[16:] < np.maximum.accumulate(demuxed)[:-16]).any()
    assert probe_video(path).num_frames == 200


def test_cover_pictures_and_unknown_codecs_get_a_reason(tmp_path):
    """An audio file with a cover picture was refused with "a raw mjpeg stream, not a container; remux
    it..." and a video track FFmpeg has no decoder for with an AttributeError; a cover picture or an
    unknown track beside a real video leaves that video to be indexed."""
    with pytest.raises(VideoError, match=r"^no video stream, only an attached cover picture \(streams: audio, video\)$"):
        probe_video(_write(tmp_path / "song.mp4", ["audio", "cover"]))
    index = probe_video(_write(tmp_path / "clip.mp4", ["audio", "cover", "h264"]))
    assert (index.codec, index.num_frames) == ("h264", 30)   # the mp4 muxer moves cover pictures last

    plain = _write(tmp_path / "plain.mp4", ["h264"]).read_bytes()
    unknown = tmp_path / "unknown.mp4"
    unknown.write_bytes(plain.replace(b"avc1", b"zzzz"))   # the sample entry's codec tag
    with pytest.raises(VideoError, match=r"^no decoder for its video codec \(FFmpeg does not know the codec of its video stream\)$"):
        probe_video(unknown)
    two = _write(tmp_path / "two.mkv", ["h264", "h264"]).read_bytes()
    first_unknown = tmp_path / "first_unknown.mkv"
    first_unknown.write_bytes(two.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/ZZZ", 1))
    index = probe_video(first_unknown)
    assert (index.stream_index, index.codec, index.num_frames) == (1, "h264", 30)


def test_a_few_stray_timestamps_are_sorted_into_place_not_refused():
    """One frame of a long recording stamped far back or far ahead (a glitching muxer; the late one is
    also tested as a file below) is not a second timeline: sorted into place, harmless. A second
    timeline is many frames out of order both ways, however short."""
    from lvmae_fast.video.probe import _timestamps_go_back

    base = Fraction(1, 10)
    for stray in (0, 299, 10_000):   # one frame far too early, or too late (every later frame is below it)
        glitch = list(range(300))
        glitch[150] = stray
        assert _timestamps_go_back(glitch, base) is None, stray
    # Past the reorder window every frame of a second timeline counts: 10 (under 16 frames, 1 s) pass,
    # 40 do not.
    assert _timestamps_go_back(list(range(300)) + list(range(10)), base) is None
    said = _timestamps_go_back(list(range(300)) + list(range(40)), base)
    assert said.startswith("timestamps go back: a frame timed 0.00 s follows frames timed up to 29.90 s "
                           "in the file (40 frames out of order"), said


@pytest.mark.parametrize("fmt,suffix", [("matroska", "mkv"), ("mpegts", "ts")])
def test_one_frame_stamped_seconds_late_is_sorted_into_place(tmp_path, fmt, suffix):
    """A review's file: packet 300 of 600 stamped 10 s late. Every frame after it is then timed below
    it, which the first form of the check counted as a second timeline and refused the whole video."""
    import av

    src = _write(tmp_path / "src.mkv", ["h264"], frames=600)
    out = tmp_path / f"stray.{suffix}"
    with av.open(str(src)) as i, av.open(str(out), "w", format=fmt) as o:
        stream = i.streams.video[0]
        copy = o.add_stream_from_template(stream)
        for k, packet in enumerate(p for p in i.demux(stream) if p.size):
            if k == 300:
                packet.pts += int(10 / stream.time_base)
            packet.stream = copy
            o.mux(packet)
    index = probe_video(out)
    assert index.num_frames == 600 and index.duration == pytest.approx(60.0, abs=0.2)


def test_h264_in_mpeg_ps_with_untimed_frames_is_refused(tmp_path):
    """MPEG-PS stamps one time per PES packet and FFmpeg's H.264 parser fills in none for the frames
    after the first: 6 of 200 frames were indexed, the windows sampled from those and the duration was
    guessed, silently. MPEG-2 in the same muxer is timed by its parser and still indexed whole."""
    import av

    h264 = _write(tmp_path / "cam.mpg", ["h264"], frames=200, fmt="mpeg")

    with av.open(str(h264)) as c:
        untimed = sum(p.pts is None and p.dts is None for p in c.demux(c.streams.video[0]) if p.size)
    assert untimed > 100  # the muxer still leaves most frames untimed (else this test checks nothing)
    with pytest.raises(VideoError, match=rf"^{untimed} of 200 frames have no timestamps \(h264 in mpeg\); remux or re-encode"):
        probe_video(h264)
    mpeg2 = _write(tmp_path / "dvd.mpg", ["mpeg2"], frames=50, fmt="mpeg")
    assert probe_video(mpeg2).num_frames == 50
