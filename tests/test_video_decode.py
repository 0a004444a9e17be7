"""Probe + decoders on real encoded files (synth): timestamps vs hand-computed, content vs scenes,
PyAV vs DALI-CPU agreement on VP9, through both DALI APIs (the DALI GPU path shares this
timestamp-selection code). tests/test_dali_decoder.py checks the decoder API frame by frame."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from lvmae_fast import synth
from lvmae_fast.video.decode_pyav import decode_windows_pyav
from lvmae_fast.video.jobs import VideoJob, Window, WindowSpec, prepare_job
from lvmae_fast.video.probe import probe_video
from lvmae_fast.video.windows import plan_windows


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264_cfr": synth.write_video(d / "cfr.mp4", duration=12.0, fps=10, codec="h264",
                                      scene_starts=[0.0, 2.5, 5.0, 7.5, 10.0]),
        "vp9_cfr": synth.write_video(d / "cfr.webm", duration=12.0, fps=10, codec="vp9",
                                     scene_starts=[0.0, 2.5, 5.0, 7.5, 10.0]),
        "vp9_vfr": synth.write_video(d / "vfr.webm", duration=12.0, fps=12, codec="vp9", vfr=True, seed=3,
                                     scene_starts=[0.0, 2.5, 5.0, 7.5, 10.0]),
        "h264_vfr": synth.write_video(d / "vfr.mp4", duration=12.0, fps=12, codec="h264", vfr=True, seed=3),
    }


@pytest.mark.parametrize("name", ["h264_cfr", "vp9_cfr", "vp9_vfr", "h264_vfr"])
def test_probe_matches_written_timestamps(videos, name):
    v = videos[name]
    index = probe_video(v.path)
    np.testing.assert_allclose(index.times, v.frame_times, atol=1e-9)
    assert (index.width, index.height) == (64, 48)


def _expected_times(v, seconds, T, rule):
    plan = plan_windows(v.frame_times, 12.0, seconds, T, rule)  # reference from the written timestamps
    return v.frame_times[plan.frames]


def _pyav_times(path, spec):
    job = prepare_job(VideoJob("x", str(path)), spec)
    out = list(decode_windows_pyav(job.index, job.plan))
    assert [w for w, _, _ in out] == list(range(len(job.plan)))
    return job, out


def test_pyav_times_cfr_hand_computed(videos):
    spec = WindowSpec(seconds=5.0, frames=8, rule="time")
    job, out = _pyav_times(videos["h264_cfr"].path, spec)
    hand = np.array([[3, 9, 15, 21, 28, 34, 40, 46], [53, 59, 65, 71, 78, 84, 90, 96]]) / 10.0
    np.testing.assert_allclose(np.stack([t for _, _, t in out]), hand, atol=1e-9)
    assert out[0][1].shape == (8, 48, 64, 3) and out[0][1].dtype == np.uint8


@pytest.mark.parametrize("name", ["h264_cfr", "vp9_vfr"])
def test_pyav_frames_show_the_scene_at_their_time(videos, name):
    v = videos[name]
    _, out = _pyav_times(v.path, WindowSpec(seconds=2.0, frames=4, rule="time"))
    for _, frames, times in out:
        for frame, t in zip(frames, times):
            scene = int(np.searchsorted(v.scene_starts, t, side="right") - 1)
            reference = synth._scene_image(scene, 64, 48).reshape(-1, 3).mean(0)
            assert np.abs(frame.reshape(-1, 3).mean(0) - reference).max() < 12, (t, scene)


@pytest.mark.parametrize("fps, codec, suffix", [(10, "vp9", "webm"), (8, "vp9", "webm"), (25, "h264", "mp4")])
def test_vfr_test_videos_are_what_the_generator_says(tmp_path, fps, codec, suffix):
    """Every frame of a VFR synth video: its stored time is the returned one (webm rounds half-milliseconds
    up, which np.round's half-to-even did not copy: 0.562 returned for 0.563 stored at fps 8), and it shows
    the scene of that time (float-summed times drifted below a scene start, 7.999999999999997: the frame
    at 8.0 showed the scene before, for 77 of 100 seeds at fps 10)."""
    av = pytest.importorskip("av")
    for seed in range(4):
        v = synth.write_video(tmp_path / f"v{seed}.{suffix}", duration=12.0, fps=fps, codec=codec, vfr=True,
                              seed=seed, size=(32, 24))
        with av.open(str(v.path)) as c:
            decoded = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
        np.testing.assert_array_equal([t for t, _ in decoded], v.frame_times)
        for t, img in decoded:
            scene = int(np.searchsorted(v.scene_starts, t, side="right") - 1)
            reference = synth._scene_image(scene, 32, 24).reshape(-1, 3).mean(0)
            assert np.abs(img.reshape(-1, 3).mean(0) - reference).max() < 12, (seed, t, scene)
        with av.open(str(v.path)) as c:  # the last frame shows one nominal interval, as its packet says
            assert v.duration == pytest.approx(c.duration / 1e6, abs=1e-3), seed


def test_the_generator_keeps_its_promises_at_odd_rates_and_durations(tmp_path):
    """CFR frames start at every k / fps below the duration (7.5 s at 5 fps left 7.4 s out: `lvmae demo
    --duration 7.5` then failed); a frame the webm muxer rounds up onto a scene start shows that scene
    (59.94 fps: frame 1 at 16.683 ms is stored at 17 ms)."""
    av = pytest.importorskip("av")
    v = synth.write_video(tmp_path / "d.mp4", duration=7.5, fps=5)
    np.testing.assert_allclose(v.frame_times, np.arange(38) / 5)
    assert v.duration == pytest.approx(7.6)
    v = synth.write_video(tmp_path / "r.webm", duration=0.1, fps=60000 / 1001, codec="vp9", scene_starts=[0.0, 0.017],
                          size=(32, 24))
    assert v.frame_times[1] == pytest.approx(0.017)
    with av.open(str(v.path)) as c:
        shown = [f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for f in c.decode(video=0)]
    for k, img in enumerate(shown):
        scene = int(np.searchsorted(v.scene_starts, v.frame_times[k], side="right") - 1)
        assert np.abs(img - synth._scene_image(scene, 32, 24).reshape(-1, 3).mean(0)).max() < 12, (k, scene)


@pytest.mark.parametrize("api", ["decoder", "reader"])
@pytest.mark.parametrize("rule", ["time", "index"])
@pytest.mark.parametrize("name", ["vp9_cfr", "vp9_vfr"])
def test_pyav_and_dali_cpu_select_the_same_frames(videos, name, rule, api):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video.decode_dali import decode_windows_dali

    v = videos[name]
    spec = WindowSpec(seconds=5.0, frames=8, rule=rule)
    job, out = _pyav_times(v.path, spec)
    pyav_times = np.stack([t for _, _, t in out])
    np.testing.assert_allclose(pyav_times, _expected_times(v, 5.0, 8, rule), atol=1e-6)
    events = list(decode_windows_dali([job], spec, device="cpu", readers=2, batch_size=3, dali_api=api))
    windows = [e for e in events if isinstance(e, Window)]
    assert [w.window for w in windows] == list(range(len(job.plan))), events
    dali_times = np.stack([w.times for w in windows])
    np.testing.assert_allclose(dali_times, pyav_times, atol=1e-6)
    for w, (_, frames, _) in zip(windows, out):
        assert tuple(w.frames.shape) == frames.shape
        # Same frames, different YUV->RGB/chroma code: per-frame mean colours agree (scenes differ by >50).
        dali_mean = w.frames.numpy().reshape(8, -1, 3).mean(1)
        assert np.abs(dali_mean - frames.reshape(8, -1, 3).mean(1)).max() < 4


@pytest.mark.parametrize("api", ["decoder", "reader"])
def test_dali_cpu_hands_h264_back(videos, api):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video.decode_dali import decode_windows_dali

    job = prepare_job(VideoJob("x", str(videos["h264_cfr"].path)), WindowSpec())
    events = list(decode_windows_dali([job], WindowSpec(), device="cpu", dali_api=api))
    assert events == [job]  # DALI's CPU decoder has no H.264: the caller decodes it with PyAV


@pytest.mark.parametrize("api", ["decoder", "reader"])
def test_dali_decodes_paths_with_spaces(videos, tmp_path, api):
    # file_list lines are whitespace-separated: a path with a space must not end the whole job.
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    import shutil

    from lvmae_fast.video.decode_dali import decode_windows_dali

    spaced = tmp_path / "my videos" / "clip one.webm"
    spaced.parent.mkdir()
    shutil.copy(videos["vp9_cfr"].path, spaced)
    spec = WindowSpec(seconds=5.0, frames=4, rule="time")
    job = prepare_job(VideoJob("x", str(spaced)), spec)
    events = list(decode_windows_dali([job], spec, device="cpu", readers=1, batch_size=4, dali_api=api))
    assert [e.window for e in events if isinstance(e, Window)] == [0, 1], events  # DALI, not handed back
    # window 0: centres 0.625 + 1.25 i s at 10 fps -> frames 6, 18, 31, 43
    np.testing.assert_allclose(events[0].times, [0.6, 1.8, 3.1, 4.3], atol=1e-6)


def _numbered_video(path, n, size=(64, 48), fmt=None, first=0, ticks=None, **options):
    """Frame i is flat grey level 4*i: the decoded pixels say which frame came out. `first`: pts of the
    first frame in 1/10 s (a second part of a joined recording continues the first's clock); `ticks`:
    each frame's own pts in 1/10 s instead (gaps)."""
    from fractions import Fraction

    import av

    w, h = size
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qp": "0", **options}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = (first + i if ticks is None else ticks[i]), Fraction(1, 10)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_an_h264_avi_with_dropped_frames_times_each_frame_by_its_chunk(tmp_path):
    """An AVI gap (a camera's dropped frames: empty chunks) after frame 19: FFmpeg's H.264 parser gave
    frame 19 the pts of the next chunk (the end of the gap), so the index timed it 60 s late and every
    window in the gap took frame 18. The chunk numbers time it: each window shows the frame on screen."""
    ticks = list(range(20)) + list(range(620, 660))   # 1/10 s: frames 0-19, a 60 s gap, frames 20-59
    path = _numbered_video(tmp_path / "gap.avi", len(ticks), ticks=ticks, bf="0")
    index = probe_video(path)
    np.testing.assert_allclose(index.times, np.asarray(ticks) / 10, atol=1e-9)
    plan = plan_windows(index.times, index.duration, 5.0, 4)
    true_times = np.asarray(ticks) / 10
    for w, frames, _ in decode_windows_pyav(index, plan):
        start, end = plan.times[w]
        centres = start + (np.arange(4) + 0.5) * (end - start) / 4
        on_screen = np.searchsorted(true_times, centres + 1e-9, side="right") - 1
        shown = np.round(frames.reshape(4, -1).mean(1) / 4).astype(int)
        assert shown.tolist() == on_screen.tolist(), w


def test_avi_with_b_frames_decodes_the_planned_frames(tmp_path):
    """AVI has no presentation timestamps: with B-frames the decoded frames' pts are shuffled decode
    numbers. Frames must be matched by output order (frame k of the decoder = frame k of the index)."""
    path = _numbered_video(tmp_path / "b.avi", 60, bf="2", g="12")
    index = probe_video(path)
    assert index.pts_in_decode_order
    plan = plan_windows(index.times, index.duration, 5.0, 8)
    for skip in (None, np.array([True] + [False] * (len(plan) - 1))):  # a resumed job: first window embedded
        for w, frames, _ in decode_windows_pyav(index, plan, skip=skip):
            shown = np.round(frames.reshape(8, -1).mean(1) / 4).astype(int)
            assert shown.tolist() == plan.frames[w].tolist()


def test_resolution_change_midstream_is_scaled_to_the_first(tmp_path):
    a = _numbered_video(tmp_path / "a.ts", 30, fmt="mpegts")
    b = _numbered_video(tmp_path / "b.ts", 30, size=(96, 64), fmt="mpegts", first=30)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    index = probe_video(joined)
    assert index.num_frames == 60
    plan = plan_windows(index.times, index.duration, 1.0, 2)
    windows = list(decode_windows_pyav(index, plan))
    assert len(windows) == 6 and {frames.shape for _, frames, _ in windows} == {(2, 48, 64, 3)}


def test_preprocessing_in_chunks_equals_one_pass():
    """frames_to_input converts CHUNK_FRAMES frames at a time (bounded float32 memory at 1080p): the
    result must equal a one-pass reference written here (resize shorter side, centre crop, normalise)."""
    import torch
    import torch.nn.functional as F

    from lvmae_fast.video import preprocess

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 7, 40, 60, 3), generator=g, dtype=torch.uint8)  # 21 frames > 8 per chunk
    mean, std, size = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), 16
    x = frames.reshape(21, 40, 60, 3).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False, antialias=True)[:, :, :, 4:20]
    want = ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).reshape(3, 7, 3, 16, 16)
    got = preprocess.frames_to_input(frames, size, mean, std)
    assert preprocess.CHUNK_FRAMES < 21 and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("api", ["decoder", "reader"])
@pytest.mark.parametrize("rule", ["time", "index"])
def test_dali_error_in_one_video_keeps_the_rest_of_its_reader_on_dali(tmp_path, rule, api):
    """A file DALI fails on mid-decode goes to PyAV; the videos after it in the same reader do not (the
    reader restarts after it) and still decode with DALI, to the same frames as PyAV."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video.decode_dali import decode_windows_dali

    spec = WindowSpec(seconds=1.0, frames=4, rule=rule)
    paths = [synth.write_video(tmp_path / f"{k}.webm", duration=3.0, fps=10, codec="vp9", seed=k).path
             for k in range(3)]
    stub = synth.write_video(tmp_path / "stub.webm", duration=0.3, fps=10, codec="vp9").path
    jobs = [prepare_job(VideoJob(str(k), str(p)), spec) for k, p in enumerate(paths)]
    jobs[1].path = str(stub)  # replaced after probing: DALI fails on frames the 3-frame file lacks
    events = list(decode_windows_dali(jobs, spec, device="cpu", readers=1, batch_size=2, dali_api=api))
    handed_back = [e for e in events if isinstance(e, VideoJob)]
    assert jobs[1] in handed_back and jobs[2] not in handed_back
    last = [e for e in events if isinstance(e, Window) and e.job is jobs[2]]
    assert [w.window for w in last] == [0, 1, 2]
    reference = list(decode_windows_pyav(jobs[2].index, jobs[2].plan))
    for w, (_, _, times) in zip(last, reference):
        np.testing.assert_allclose(w.times, times, atol=1e-6)
    # The first video: DALI's windows + PyAV's (only those DALI did not deliver) = all of them.
    first = [e.window for e in events if isinstance(e, Window) and e.job is jobs[0]]
    rest = [] if jobs[0] not in handed_back else list(np.flatnonzero(~jobs[0].skip))
    assert sorted(first + rest) == [0, 1, 2]


def test_damage_budget_is_the_whole_videos_when_windows_are_skipped(tmp_path):
    """A video finished after a kill or a DALI failure (some windows skipped) got a budget sized on the
    frames left to decode: the same damaged file could get another verdict than a fresh run."""
    from lvmae_fast.video.probe import VideoError

    path = synth.write_failure_corpus(tmp_path)["damaged_middle"]
    job = prepare_job(VideoJob("d", str(path)), WindowSpec(seconds=1.0))
    messages = []
    for skip in (None, np.arange(job.num_windows) < 2):  # the first two windows (before the damage) done
        with pytest.raises(VideoError) as err:
            for _ in decode_windows_pyav(job.index, job.plan, skip=skip):
                pass
        messages.append(str(err.value).split(" (number")[0])
    assert messages[0] == messages[1] and "sampled frames" in messages[0], messages


def test_camera_like_h264_has_b_frames_and_decodes_the_planned_frames(tmp_path):
    """The ingestion benchmark's default videos: High-profile H.264 with B-frames in mp4 (pts reordered,
    shifted by an edit list), grain in every frame. Windows must hold exactly the frames an independent
    full decode shows at the planned positions (presentation order), at the written frame rate."""
    import av
    from av.video.frame import PictureType

    path = synth.write_camera_like(tmp_path / "c.mp4", duration=4.0, fps=10, size=(96, 64), seed=1)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        profile = stream.codec_context.profile
        decoded = [(f.pts, f.pict_type, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    assert profile == "High" and any(kind == PictureType.B for _, kind, _ in decoded)
    reference = [picture for _, _, picture in sorted(decoded, key=lambda d: d[0])]
    assert len(reference) == 40
    assert all(not np.array_equal(a, b) for a, b in zip(reference, reference[1:]))  # no two frames alike
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=1.0, frames=4))
    np.testing.assert_allclose(job.index.times, np.arange(40) / 10, atol=1e-6)
    for threads in (1, 3):  # frame threads read skip_frame per packet too
        windows = list(decode_windows_pyav(job.index, job.plan, threads=threads))
        assert [w for w, _, _ in windows] == list(range(4))
        for w, frames, _ in windows:
            assert np.array_equal(frames, np.stack([reference[k] for k in job.plan.frames[w]]))


def test_unsampled_non_reference_frames_are_not_decoded(tmp_path):
    """The B-frames nothing refers to and no window samples are skipped (skip_frame NONREF per packet):
    every sampled frame still comes out, references too, and fewer frames are decoded in all."""
    from lvmae_fast.video import decode_pyav

    path = synth.write_camera_like(tmp_path / "c.mp4", duration=6.0, fps=10, size=(96, 64), seed=2)
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=1.0, frames=2))
    keep = {int(p) for p in job.index.pts[np.unique(job.plan.frames)]}
    every = [f.pts for f in decode_pyav._frames(job.index, 0, None)]
    some = [f.pts for f in decode_pyav._frames(job.index, 0, None, keep)]
    assert len(every) == 60 and keep <= set(some) and len(some) < len(every)
    assert set(some) - keep  # reference frames nobody samples are decoded still


def test_nal_unit_types_of_length_prefixed_and_annex_b_packets():
    """Hand-built packets: the NAL types an IDR check reads, for both H.264 storage forms and HEVC."""
    from lvmae_fast.video.probe import _nal_types, _refreshes_decoder

    avcc = b"\x00\x00\x00\x03\x06\x05\xff" + b"\x00\x00\x00\x02\x65\x88"   # SEI, IDR slice
    assert _nal_types(avcc, 4, hevc=False) == {6, 5} and _refreshes_decoder("h264", avcc, 4)
    non_idr = b"\x00\x00\x00\x02\x41\x9a"                                   # non-IDR slice
    assert not _refreshes_decoder("h264", non_idr, 4)
    annex_b = b"\x00\x00\x00\x01\x67\x64\x00\x00\x01\x68\xee\x00\x00\x01\x65\x88"  # SPS, PPS, IDR
    assert _nal_types(annex_b, None, hevc=False) == {7, 8, 5}
    assert _nal_types(b"\x00\x00\x00\x09\x65", 4, hevc=False) == set()  # length past the end: nothing read
    cra, trail = bytes([21 << 1, 1]), bytes([1 << 1, 1])
    assert _refreshes_decoder("hevc", b"\x00\x02" + cra, 2) and not _refreshes_decoder("hevc", b"\x00\x02" + trail, 2)
    assert _refreshes_decoder("vp9", b"", None) and not _refreshes_decoder("mpeg4", b"\x00\x00\x01\xb6", None)


def _skips(tails: bool, nonref: bool = True):
    """decode_pyav's frame skips set for a block: GOP tails, and non-reference frames."""
    from unittest import mock

    from lvmae_fast.video import decode_pyav

    return mock.patch.multiple(decode_pyav, SKIP_GOP_TAILS=tails, SKIP_UNNEEDED_NONREF=nonref)


def _decoded_pts(index, keep, tails: bool):
    from lvmae_fast.video import decode_pyav

    with _skips(tails):
        return [f.pts for f in decode_pyav._frames(index, 0, None, keep)]


def _windows(job, tails: bool, nonref: bool = True):
    with _skips(tails, nonref):
        return list(decode_windows_pyav(job.index, job.plan))


@pytest.mark.parametrize("suffix,open_gop", [(".mp4", False), (".ts", False), (".mp4", True)])
def test_gop_tails_are_skipped_behind_clean_keyframes_only(tmp_path, suffix, open_gop):
    """1-s GOPs, one sampled frame per second: behind every IDR (mp4's length-prefixed NAL units and
    mpeg-ts's start codes alike) the frames after the sampled one are never decoded, and every window
    is bit for bit the one a decode of every GOP gives. Open GOPs' later keyframes are non-IDR I frames
    that B-frames before them predict across: only the first is clean."""
    path = synth.write_camera_like(tmp_path / f"c{suffix}", duration=6.0, fps=10, size=(96, 64), seed=4,
                                   keyint=10, open_gop=open_gop)
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=2.0, frames=2))
    index = job.index
    assert index.keyframe.sum() == 6
    if open_gop:
        assert index.clean_keyframe.tolist() == [True] + [False] * 59
    else:
        assert np.array_equal(index.clean_keyframe, index.keyframe)
    with_tails, every_gop = _windows(job, tails=True), _windows(job, tails=False)
    assert [w for w, _, _ in with_tails] == [w for w, _, _ in every_gop] == [0, 1, 2]
    for (_, a, ta), (_, b, tb) in zip(with_tails, every_gop):
        assert np.array_equal(a, b) and np.array_equal(ta, tb)
    keep = {int(p) for p in index.pts[np.unique(job.plan.frames)]}
    fewer, more = _decoded_pts(index, keep, True), _decoded_pts(index, keep, False)
    # The rule, from the file's decode order: of the frames decoded without tail skipping, exactly those
    # that come in decode order before the last sampled frame between two clean keyframes are decoded.
    import av

    with av.open(str(path)) as container:
        order = [pk.pts for pk in container.demux(container.streams.video[0]) if pk.size]
    position = {pts: i for i, pts in enumerate(order)}
    clean = np.sort(index.pts[index.clean_keyframe])
    segment = {pts: int(np.searchsorted(clean, pts, side="right")) for pts in order}
    last_sampled = {}
    for pts in keep:
        last_sampled[segment[pts]] = max(last_sampled.get(segment[pts], -1), position[pts])
    assert set(fewer) == {pts for pts in more if position[pts] <= last_sampled.get(segment[pts], -1)}
    assert keep <= set(fewer) and len(fewer) < len(more)


def test_a_gop_without_sampled_frames_is_skipped_whole(tmp_path):
    """0.5-s GOPs, one sampled frame per 3-s window: the GOPs with no sampled frame are not decoded at
    all, keyframes included; the two windows are the ones a decode of every GOP gives."""
    path = synth.write_camera_like(tmp_path / "c.mp4", duration=6.0, fps=10, size=(96, 64), seed=5, keyint=5)
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=3.0, frames=1))
    keep = {int(p) for p in job.index.pts[np.unique(job.plan.frames)]}
    assert len(keep) == 2 and job.index.keyframe.sum() == 12
    fewer = _decoded_pts(job.index, keep, True)
    assert keep <= set(fewer) and len(fewer) <= 2 * 5  # at most the two sampled frames' GOPs
    for (_, a, _), (_, b, _) in zip(_windows(job, True), _windows(job, False), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name,suffix,encoder,options,all_clean", [
    ("hevc closed GOPs", ".mp4", "libx265",
     {"x265-params": "keyint=10:min-keyint=10:scenecut=0:open-gop=0:bframes=3:log-level=error"}, True),
    ("hevc open GOPs", ".mp4", "libx265",
     {"x265-params": "keyint=10:min-keyint=10:scenecut=0:open-gop=1:bframes=3:log-level=error"}, False),
    ("av1", ".mp4", "libsvtav1", {"svtav1-params": "keyint=10:scd=0"}, True),
    ("vp9", ".webm", "libvpx-vp9", {"g": "10", "keyint_min": "10", "deadline": "realtime", "cpu-used": "8"}, True),
    ("vp8", ".webm", "libvpx", {"g": "10", "keyint_min": "10", "deadline": "realtime", "cpu-used": "8"}, True),
])
def test_frame_skipping_keeps_the_windows_of_other_codecs(tmp_path, name, suffix, encoder, options, all_clean):
    """HEVC (closed GOPs: IDR, all clean; open GOPs: CRA keyframes with leading pictures, not clean),
    AV1, VP9 and VP8: windows with unneeded frames skipped (non-reference ones, GOP tails) are bit for bit
    those of a decode of every frame. AV1's decoder (libdav1d) reads skip_frame only when opened: per
    packet it dropped sampled frames and refused the video as damaged, so AV1 decodes every frame."""
    import av

    if encoder not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {encoder}")
    path = synth.write_distinct_frames(tmp_path / f"v{suffix}", frames=60, fps=10, encoder=encoder,
                                       options=options, texture=True)
    job = prepare_job(VideoJob("v", str(path)), WindowSpec(seconds=2.0, frames=2))
    index = job.index
    assert index.keyframe.sum() >= 2 and not (index.clean_keyframe & ~index.keyframe).any()
    assert np.array_equal(index.clean_keyframe, index.keyframe) == all_clean, index.clean_keyframe.nonzero()
    with_tails, every_frame = _windows(job, tails=True), _windows(job, tails=False, nonref=False)
    assert [w for w, _, _ in with_tails] == [w for w, _, _ in every_frame] == list(range(job.num_windows))
    for (_, a, _), (_, b, _) in zip(with_tails, every_frame):
        assert np.array_equal(a, b), name


def _write_two_video_tracks(path):
    """Matroska with two VP9 tracks: track 0 (not default) flat grey at 5 fps, track 1 (default) grey 4*i at
    10 fps, frame i at i/10 s. FFmpeg's best video stream (DALI's) is track 1."""
    av = pytest.importorskip("av")
    from fractions import Fraction

    from av.stream import Disposition

    with av.open(str(path), "w", format="matroska") as c:
        streams = []
        for rate in (5, 10):
            s = c.add_stream("libvpx-vp9", rate=rate)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            s.codec_context.time_base = Fraction(1, 1000)
            s.options = {"lossless": "1", "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
            streams.append(s)
        streams[0].disposition, streams[1].disposition = Disposition(0), Disposition.default
        events = [(k / 5, 0, 252) for k in range(30)] + [(k / 10, 1, 4 * k) for k in range(60)]
        for t, which, grey in sorted(events):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), grey, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            for p in streams[which].encode(frame):
                c.mux(p)
        for s in streams:
            for p in s.encode():
                c.mux(p)
    return path


@pytest.mark.parametrize("decoder", ["pyav", "dali-reader", "dali-decoder"])
def test_every_decoder_reads_the_best_video_stream(tmp_path, decoder):
    """With two video tracks, the probe and PyAV took the first and DALI the best (the default-marked one):
    DALI's windows held the other track's frames, and PyAV's fallback switched tracks mid-video."""
    video = _write_two_video_tracks(tmp_path / "two.mkv")
    spec = WindowSpec(seconds=2.0, frames=4, rule="time")
    job, out = _pyav_times(video, spec)
    assert job.index.num_frames == 60 and job.index.stream_index == 1
    if decoder == "pyav":
        windows = [(frames, times) for _, frames, times in out]
    else:
        pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
        from lvmae_fast.video.decode_dali import decode_windows_dali

        events = decode_windows_dali([job], spec, device="cpu", readers=1, batch_size=2,
                                     dali_api=decoder.split("-")[1])
        windows = [(np.asarray(e.frames), e.times) for e in events if isinstance(e, Window)]
    assert len(windows) == 3
    for frames, times in windows:
        grey = frames.reshape(len(frames), -1).mean(1)
        np.testing.assert_allclose(grey, 4 * np.round(np.asarray(times) * 10), atol=3)  # track 1's frame at t


@pytest.mark.parametrize("kwargs, message", [
    (dict(scene_starts=[0.0, 4.0, 2.0]), r"scene_starts must begin with 0.0 and increase, .*got \[0.0, 4.0, 2.0\]"),
    (dict(scene_starts=[1.0]), "scene_starts must begin with 0.0"),
    # (below: the metadata listed a scene the file does not have, or NaN)
    (dict(scene_starts=[0.0, float("nan")]), r"scene_starts must .* all below the duration \(6.0 s\)"),
    (dict(scene_starts=[0.0, 10.0]), r"scene_starts must .* all below the duration \(6.0 s\)"),
    (dict(duration=0.0, fps=10, scene_starts=[0.0]), "duration must be a finite number > 0, got 0.0"),  # was a TypeError after writing
    (dict(duration=float("nan")), "duration must be a finite number > 0, got nan"),   # numpy's arange error
    (dict(fps=float("inf")), "fps must be a finite number > 0, got inf"),             # OverflowError
    (dict(size=(63, 48)), r"size must be \(width, height\), positive even integers"),
    (dict(size=(0, 0)), r"size must be \(width, height\), positive even integers"),  # IndexError
    (dict(size=(-2, 4)), r"size must be \(width, height\), positive even integers"),  # OverflowError
])
def test_the_generator_refuses_what_it_cannot_write(tmp_path, kwargs, message):
    pytest.importorskip("av")
    with pytest.raises(ValueError, match=message):
        synth.write_video(tmp_path / "v.mp4", **kwargs)
    if "size" in kwargs or "scene_starts" in kwargs:
        return
    with pytest.raises(ValueError, match=message):  # it returned a path and wrote no file
        synth.write_camera_like(tmp_path / "c.mp4", size=(64, 48), **kwargs)
    assert not (tmp_path / "c.mp4").exists()


def _vp9_numbered(path, n, gop):
    """Frame i flat grey 2*i at i/10 s, lossless VP9 in webm, a keyframe every `gop` frames."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"lossless": "1", "deadline": "realtime", "lag-in-frames": "0", "g": str(gop)}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 2 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _remux_damaged(src, dst, drop=(), garble=()):
    """A copy of `src`'s video packets without the packets numbered in `drop` (a file cut mid-GOP) and
    with those in `garble` overwritten by 0xff bytes of the same size (damaged data)."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        st = i.streams.video[0]
        out = o.add_stream_from_template(st)
        for k, p in enumerate(x for x in i.demux(st) if x.size):
            if k in drop:
                continue
            if k in garble:
                bad = av.Packet(b"\xff" * p.size)
                bad.pts, bad.dts, bad.time_base, bad.is_keyframe = p.pts, p.dts, p.time_base, p.is_keyframe
                p = bad
            p.stream = out
            o.mux(p)
    return dst


def _naive_windows(path, plan, index):
    """Independent reference: decode packet by packet in one thread, skipping packets the decoder refuses;
    each planned frame is the decoded frame of its pts (the first, where FFmpeg outputs two with one pts: B-frames
    around an edit list's cuts), else the last one decoded before it (damage), else (before the first decodable
    frame) the first one decoded."""
    import av

    decoded = {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "SLICE", 1
        for packet in c.demux(s):
            try:
                for f in packet.decode():
                    if f.pts not in decoded:
                        decoded[f.pts] = f.to_ndarray(format="rgb24")
            except av.FFmpegError:
                pass
    have = np.array(sorted(decoded))
    out = []
    for w in range(len(plan)):
        frames = []
        for p in index.pts[plan.frames[w]]:
            before = have[have <= p]
            frames.append(decoded[int(before[-1] if len(before) else have[0])])
        out.append(np.stack(frames))
    return out


@pytest.mark.parametrize("case", ["cut_mid_gop", "one_bad_packet"])
def test_packets_the_decoder_refuses_are_damage_not_the_end(tmp_path, case):
    """VP9 (also VP8, MJPEG) raises for a damaged packet where H.264 conceals; that error ended the decode:
    a webm cut mid-GOP (its lead-in packets undecodable) was refused as "decoding failed", and one bad
    packet made every later sampled frame a stand-in, refusing the video. Decoding goes on after such a
    packet, as players do: the frames are the naive packet-by-packet decode's."""
    whole = _vp9_numbered(tmp_path / "whole.webm", 120, gop=24)
    damage = {"cut_mid_gop": dict(drop=set(range(5))), "one_bad_packet": dict(garble={70})}[case]
    path = _remux_damaged(whole, tmp_path / f"{case}.webm", **damage)
    index = probe_video(path)
    plan = plan_windows(index.times, index.duration, 2.0, 4)
    want = _naive_windows(path, plan, index)
    got = list(decode_windows_pyav(index, plan, threads=1))
    assert [w for w, _, _ in got] == list(range(len(plan)))
    for w, frames, _ in got:
        np.testing.assert_array_equal(frames, want[w], err_msg=f"window {w}")


def test_negative_timestamps_of_a_webm_are_frames_every_decoder_shows(tmp_path):
    """A webm muxed without avoid_negative_ts starts before 0: its first second is frames the decoders
    show (DALI indexes them), not an edit list's cut (an mp4 flags those discard). The probe dropped them:
    PyAV's windows started a second later than DALI's, and the first second was never embedded."""
    from fractions import Fraction

    import av

    ms = Fraction(1, 1000)
    path = tmp_path / "neg.webm"
    with av.open(str(path), "w", format="webm", options={"avoid_negative_ts": "disabled"}) as c:
        s = c.add_stream("libvpx-vp9", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = ms
        s.options = {"lossless": "1", "deadline": "realtime", "lag-in-frames": "0"}
        for i in range(60):  # frame i: flat grey 4*i at (i - 10) / 10 s
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = (i - 10) * 100, ms
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    index = probe_video(path)
    assert (index.num_frames, index.pts[0], index.duration) == (60, -1000, pytest.approx(6.0))
    spec = WindowSpec(seconds=2.0, frames=4)
    job = prepare_job(VideoJob("neg", str(path)), spec)
    pyav_times = {}
    for w, frames, times in decode_windows_pyav(job.index, job.plan):
        shown = np.round(frames.reshape(4, -1).mean(1) / 4).astype(int)
        assert shown.tolist() == job.plan.frames[w].tolist()
        pyav_times[w] = times
    np.testing.assert_allclose(pyav_times[0], job.plan.frames[0] / 10)  # time 0: the first frame's (-1 s)
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video.decode_dali import decode_windows_dali

    # The decoder API gives the index's frames (and its times); the reader's timestamps are off there, so
    # it hands such a video to PyAV.
    assert list(decode_windows_dali([job], spec, device="cpu", dali_api="reader")) == [job]
    windows = [e for e in decode_windows_dali([job], spec, device="cpu", dali_api="decoder") if isinstance(e, Window)]
    assert [e.window for e in windows] == list(range(len(job.plan)))
    for e in windows:
        shown = np.round(e.frames.numpy().reshape(4, -1).mean(1) / 4).astype(int)
        assert shown.tolist() == job.plan.frames[e.window].tolist()
        np.testing.assert_allclose(e.times, pyav_times[e.window], atol=1e-6)


def test_a_refused_packet_in_an_avi_does_not_shift_the_later_frames(tmp_path):
    """AVI frames are matched by output position: going on after a packet the decoder refuses (MJPEG raises)
    would show frame k+1 for frame k to the end of the file. There the first refusal ends the decode: the
    frames after it are stood in (damage), never shifted."""
    from lvmae_fast.video.probe import VideoError

    src = tmp_path / "whole.avi"
    import av

    with av.open(str(src), "w") as c:
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    path = _remux_damaged(src, tmp_path / "bad.avi", garble={20})
    index = probe_video(path)
    assert index.pts_in_decode_order
    plan = plan_windows(index.times, index.duration, 1.0, 10)
    shown = {}
    with pytest.raises(VideoError, match="damaged video data"):
        for w, frames, _ in decode_windows_pyav(index, plan):
            shown[w] = np.round(frames.reshape(10, -1).mean(1) / 4).astype(int)
    assert sorted(shown) == [0, 1]  # before the refused packet: its own frames
    for w, got in shown.items():
        assert got.tolist() == plan.frames[w].tolist()


def _mp4_with_edit_list(path, sections, frames=500, fps=25, options=None):
    """An H.264 mp4 of `frames` distinct frames whose edit list shows only `sections` [(start s, length s)]
    of its media, as an editor cutting parts out without re-encoding leaves it (elst rewritten in place)."""
    import struct
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps, options=options or {"bf": "0", "g": "50"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k in range(frames):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32, 0], img[:, 32:, 0] = k * 23 % 256, (k * 71 + 40) % 256
            img[:24, :, 1], img[24:, :, 1], img[:, :, 2] = (k * 5 + 100) % 256, k * 131 % 256, (k // 7) * 97 % 256
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = k, Fraction(1, fps)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    b = bytearray(Path(path).read_bytes())

    def box(tag, lo=0, hi=None):
        hi, i = len(b) if hi is None else hi, lo
        while i < hi:
            n, t = struct.unpack(">I4s", b[i:i + 8])
            if t == tag:
                return i, n
            i += n
        raise AssertionError(tag)

    moov = box(b"moov")
    trak, mvhd = box(b"trak", moov[0] + 8, sum(moov)), box(b"mvhd", moov[0] + 8, sum(moov))
    edts, tkhd = box(b"edts", trak[0] + 8, sum(trak)), box(b"tkhd", trak[0] + 8, sum(trak))
    elst, mdhd = box(b"elst", edts[0] + 8, sum(edts)), box(b"mdhd", box(b"mdia", trak[0] + 8, sum(trak))[0] + 8)
    movie_ts, media_ts = (struct.unpack(">I", b[x[0] + 20:x[0] + 24])[0] for x in (mvhd, mdhd))
    media0 = struct.unpack(">i", b[elst[0] + 20:elst[0] + 24])[0]
    entries = b"".join(struct.pack(">Iii", int(d * movie_ts), media0 + int(st * media_ts), 0x10000) for st, d in sections)
    new = struct.pack(">I4sII", 16 + len(entries), b"elst", 0, len(sections)) + entries
    total = int(sum(d for _, d in sections) * movie_ts)
    struct.pack_into(">I", b, mvhd[0] + 24, total)
    struct.pack_into(">I", b, tkhd[0] + 28, total)
    for x in (moov, trak, edts):  # moov follows mdat: no chunk offset moves
        struct.pack_into(">I", b, x[0], x[1] + len(new) - elst[1])
    b[elst[0]:sum(elst)] = new
    Path(path).write_bytes(b)
    return path


@pytest.mark.parametrize("sections, options", [
    ([(1.0, 4.0), (6.5, 4.0), (12.5, 4.0)], {"bf": "0", "g": "50"}),
    ([(2 * k + 0.5, 1.2) for k in range(9)], {"bf": "2", "g": "25", "sc_threshold": "0"}),
])
def test_an_mp4_cut_by_an_edit_list_of_several_sections_gives_the_shown_frames(tmp_path, sections, options):
    """Before each section FFmpeg hands over the lead-in packets from its GOP's keyframe, flagged discard
    (decoded, never shown, not in the index); their pts may equal a shown frame's. Counted as that needed
    frame, it let the GOP-tail skip drop the real one: wrong frames, or a "damaged" refusal."""
    path = _mp4_with_edit_list(tmp_path / "cut.mp4", sections, options=options)
    index = probe_video(path)
    for seconds in (5.0, 2.0, 1.0):  # 1.0 s with B-frames: two shown packets share pts 107520 (both counted)
        plan = plan_windows(index.times, index.duration, seconds, 8)
        want = _naive_windows(path, plan, index)
        got = list(decode_windows_pyav(index, plan, threads=1))
        assert [w for w, _, _ in got] == list(range(len(plan)))
        for w, frames, _ in got:
            np.testing.assert_array_equal(frames, want[w], err_msg=f"{seconds} s windows: window {w}")


@pytest.mark.parametrize("colorspace, matrix", [(1, (0.2126, 0.0722)), (5, (0.299, 0.114))])  # BT.709, BT.601
def test_tagged_colour_is_converted_with_the_streams_matrix(tmp_path, colorspace, matrix):
    # A flat limited-range Y'CbCr colour, lossless, tagged with its matrix: the decoded RGB must be the
    # standard's formula (PyAV 14-16 converted BT.709 with BT.601's matrix: 8 levels off in red).
    av = pytest.importorskip("av")
    ycbcr = (120, 90, 170)
    path = tmp_path / "flat.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range = colorspace, colorspace, colorspace, 1
        for i in range(150):
            frame = av.VideoFrame(64, 48, "yuv420p")
            for plane, value in zip(frame.planes, ycbcr):
                plane.update(np.full(plane.buffer_size, value, np.uint8).tobytes())
            frame.colorspace, frame.color_range, frame.pts = colorspace, 1, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    kr, kb = matrix
    kg = 1 - kr - kb
    y, cb, cr = (ycbcr[0] - 16) / 219, (ycbcr[1] - 128) / 224, (ycbcr[2] - 128) / 224
    r, b = y + 2 * (1 - kr) * cr, y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / kg
    expected = np.clip(np.round(np.array([r, g, b]) * 255), 0, 255)
    index = probe_video(str(path))
    _, frames, _ = next(decode_windows_pyav(index, plan_windows(index.times, index.duration)))
    assert np.abs(frames[0, 24, 32].astype(float) - expected).max() <= 2, (frames[0, 24, 32], expected)


@pytest.mark.parametrize("codec, suffix, skippable", [("libx264", ".mp4", True), ("libvpx-vp9", ".webm", False)])
def test_skipping_deblocking_gives_the_frames_an_unfiltered_decode_shows(tmp_path, codec, suffix, skippable):
    """extract --skip-deblocking: the windows hold exactly the frames a decode without FFmpeg's loop
    filter shows at the planned positions, at the same times; for H.264 those differ from the filtered
    ones (the option took), for VP9 (its decoder ignores the option) they are the usual frames."""
    import av

    path = tmp_path / f"c{suffix}"
    source = synth.write_camera_like(tmp_path / "src.mp4", duration=3.0, fps=10, size=(160, 96), seed=2)
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 160, 96, "yuv420p", 150_000
        for frame in src.decode(video=0):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                out.mux(packet)
        out.mux(stream.encode())

    def reference(options):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.options = options
            return {f.pts: f.to_ndarray(format="rgb24") for f in container.decode(stream)}

    unfiltered, filtered = reference({"skip_loop_filter": "all"}), reference({})
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=1.0, frames=4))
    plain = list(decode_windows_pyav(job.index, job.plan))
    skipped = list(decode_windows_pyav(job.index, job.plan, threads=2, deblock=False))
    assert [(w, list(t)) for w, _, t in skipped] == [(w, list(t)) for w, _, t in plain] and len(skipped) == 3
    for w, frames, _ in skipped:
        assert np.array_equal(frames, np.stack([unfiltered[int(p)] for p in job.index.pts[job.plan.frames[w]]]))
    differs = [not np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(skipped, plain)]
    assert all(differs) if skippable else not any(differs)
    assert any(not np.array_equal(unfiltered[p], filtered[p]) for p in filtered) == skippable
    with pytest.raises(ValueError, match="NVDEC always deblocks"):
        next(decode_windows_pyav(job.index, job.plan, deblock=False, hwaccel=lambda: None))
