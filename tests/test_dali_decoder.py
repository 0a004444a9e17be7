"""DALI's in-memory decoder API (decode_dali, dali_api="decoder") against independent references: frames
that say their own index, PyAV (decode_windows_pyav), and DALI's reader API. DALI-CPU on VP9 only."""
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")

from lvmae_fast import synth
from lvmae_fast.video import decode_dali
from lvmae_fast.video.decode_dali import decode_windows_dali
from lvmae_fast.video.decode_pyav import decode_windows_pyav
from lvmae_fast.video.jobs import VideoJob, Window, WindowSpec, prepare_job


def _numbered_vp9(path, times):
    """Lossless VP9 (webm, or mp4 by suffix) whose frame i is flat grey 4*i, at `times` (seconds, exact in
    webm's 1 ms): the decoded pixels say which frame came out."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.codec_context.gop_size = 12
        s.options = {"lossless": "1", "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _cut_by_edit_list(src, dst, frames: int):
    """Remux `src` with its first `frames` frames before time 0 (negative pts, as a copy cut with an edit
    list): the probe's index leaves them out, the container still counts them."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        stream = i.streams.video[0]
        out = o.add_stream_from_template(stream)
        shift = int(Fraction(frames, 10) / stream.time_base)
        for packet in i.demux(stream):
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                o.mux(packet)
    return dst


def _recording_builds(monkeypatch) -> list[str]:
    """The API of every DALI pipeline built from now on."""
    built, real_build = [], decode_dali._build_pipe

    def recording(source, *args, **kwargs):
        built.append("reader" if isinstance(source, str) else "decoder")
        return real_build(source, *args, **kwargs)

    monkeypatch.setattr(decode_dali, "_build_pipe", recording)
    return built


def _shown(frames) -> list[int]:
    frames = np.asarray(frames)
    return np.round(frames.reshape(len(frames), -1).mean(1) / 4).astype(int).tolist()


def _decode(job, spec, api, **kw):
    options = dict(device="cpu", readers=2, batch_size=3, dali_api=api)
    return list(decode_windows_dali([job], spec, **{**options, **kw}))


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    d = tmp_path_factory.mktemp("numbered")
    cfr = np.arange(60) / 10.0                                        # 6 s at 10 fps
    vfr = synth.frame_times_for(6.0, 10.0, vfr=True, seed=4)[:63]      # gaps of 0.05, 0.1 and 0.2 s
    return {"cfr": (_numbered_vp9(d / "cfr.webm", cfr), cfr), "vfr": (_numbered_vp9(d / "vfr.webm", vfr), vfr)}


@pytest.mark.parametrize("rule", ["time", "index"])
@pytest.mark.parametrize("name", ["cfr", "vfr"])
def test_decoder_api_gives_the_planned_frames_and_times(numbered, name, rule):
    """Frame k of fn.decoders.video is frame k of the probe's index (presentation order): the pixels of
    every window are the planned frames, as PyAV decodes them; times are the written ones and equal
    PyAV's and the reader API's; the frames equal the reader API's bit for bit."""
    path, written = numbered[name]
    spec = WindowSpec(seconds=1.5, frames=6, rule=rule)   # 6 frames in 1.5 s: repeated frames at 10 fps
    job = prepare_job(VideoJob("n", str(path)), spec)
    np.testing.assert_allclose(job.index.times, written, atol=1e-9)
    decoded = _decode(job, spec, "decoder")
    assert all(isinstance(e, Window) for e in decoded), decoded
    assert [e.window for e in decoded] == list(range(len(job.plan)))
    reader = _decode(job, spec, "reader")
    assert [e.window for e in reader] == list(range(len(job.plan)))
    pyav = list(decode_windows_pyav(job.index, job.plan))
    for ours, theirs, (w, frames, times) in zip(decoded, reader, pyav):
        assert _shown(ours.frames) == job.plan.frames[w].tolist() == _shown(frames)
        np.testing.assert_allclose(ours.times, written[job.plan.frames[w]], atol=1e-9)
        np.testing.assert_allclose(ours.times, times, atol=1e-9)
        np.testing.assert_allclose(ours.times, theirs.times, atol=1e-6)
        assert ours.times.dtype == np.float64 and ours.frames.dtype == theirs.frames.dtype
        np.testing.assert_array_equal(ours.frames.numpy(), theirs.frames.numpy())


def test_decoder_api_decodes_only_the_windows_not_embedded_yet(numbered):
    """A resumed job (job.skip: windows an earlier, killed job embedded) gets only its other windows,
    with the frames a full decode gives them (the decoder cannot seek: it still starts at frame 0)."""
    path, _ = numbered["cfr"]
    spec = WindowSpec(seconds=1.0, frames=4)
    full = {e.window: e.frames.numpy() for e in _decode(prepare_job(VideoJob("n", str(path)), spec), spec, "decoder")}
    assert sorted(full) == list(range(6))
    job = prepare_job(VideoJob("n", str(path)), spec)
    job.skip = np.array([True, True, False, True, False, False])
    part = _decode(job, spec, "decoder", batch_size=2)
    assert [e.window for e in part] == [2, 4, 5]
    for e in part:
        np.testing.assert_array_equal(e.frames.numpy(), full[e.window])
        assert _shown(e.frames) == job.plan.frames[e.window].tolist()


def test_parts_batches_and_the_long_video_rule(numbered):
    """Samples are runs of at most part_windows windows, batches hold at most batch_size windows; a video
    whose parts would decode it more than MAX_DECODE_PASSES times goes to the reader API, which gives
    the same frames."""
    path, _ = numbered["cfr"]
    spec = WindowSpec(seconds=0.5, frames=2)   # 12 windows
    job = prepare_job(VideoJob("n", str(path)), spec)
    shard = decode_dali._DecoderShard([job], batch_size=5, part_windows=4)
    assert [part.tolist() for _, part, _ in shard.slots] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert shard.batches == [[0], [1], [2]]
    assert decode_dali.suits_decoder_api(job, 12) and decode_dali.suits_decoder_api(job, 4)  # 1 and 2 passes
    assert not decode_dali.suits_decoder_api(job, 2)   # 6 parts: 3.5 passes
    small = decode_dali._DecoderShard([job, job], batch_size=5, part_windows=2)
    assert [sum(len(small.slots[k][1]) for k in batch) for batch in small.batches] == [4, 4, 4, 4, 4, 4]

    for batch_size, api in ((2, "reader"), (4, "decoder")):
        with pytest.MonkeyPatch.context() as mp:
            built = _recording_builds(mp)
            events = _decode(job, spec, "decoder", readers=1, batch_size=batch_size)
        assert built == [api]
        assert [e.window for e in events] == list(range(12))
        for e in events:
            assert _shown(e.frames) == job.plan.frames[e.window].tolist()


def test_a_container_counting_frames_the_index_leaves_out_goes_to_the_reader(tmp_path, monkeypatch):
    """An mp4 cut by an edit list holds frames with negative pts: the index (and PyAV) leave them out, a
    decoder without an index may number them (NVDEC is sent every packet), which would shift every frame.
    Such a file goes to the reader API, which numbers frames as the index does."""
    whole = _numbered_vp9(tmp_path / "whole.mp4", np.arange(40) / 10.0)
    cut = _cut_by_edit_list(whole, tmp_path / "cut.mp4", 5)
    spec = WindowSpec(seconds=1.0, frames=4)
    jobs = [prepare_job(VideoJob(p.stem, str(p)), spec) for p in (whole, cut)]
    assert (jobs[0].index.num_frames, jobs[1].index.num_frames) == (40, 35)
    assert decode_dali.counts_frames_as_the_index(jobs[0]) and not decode_dali.counts_frames_as_the_index(jobs[1])
    built = _recording_builds(monkeypatch)
    events = decode_windows_dali(jobs, spec, device="cpu", readers=1, batch_size=4, dali_api="decoder")
    events = [e for e in events if isinstance(e, Window)]
    assert built == ["decoder", "reader"]
    for e, shift in [(e, 0) for e in events if e.job is jobs[0]] + [(e, 5) for e in events if e.job is jobs[1]]:
        assert _shown(e.frames) == (e.job.plan.frames[e.window] + shift).tolist()  # cut: index frame k = frame k+5
    assert sorted((e.job.video_id, e.window) for e in events) == sorted(
        (job.video_id, w) for job in jobs for w in range(len(job.plan)))


@pytest.mark.parametrize("api", ["decoder", "reader"])
def test_damaged_files_go_to_pyav_and_the_others_stay_on_dali(tmp_path, api):
    """Files that change after probing (cut short, garbage, gone) fail in DALI: each goes to PyAV with
    only the windows DALI did not deliver (job.skip), and the videos after it keep decoding with DALI,
    to the frames of an undamaged run."""
    spec = WindowSpec(seconds=1.0, frames=4)
    paths = [synth.write_video(tmp_path / f"{k}.webm", duration=3.0, fps=10, codec="vp9", seed=k).path
             for k in range(6)]
    jobs = [prepare_job(VideoJob(str(k), str(p)), spec) for k, p in enumerate(paths)]
    reference = {k: [e.frames.numpy() for e in _decode(prepare_job(VideoJob(str(k), str(p)), spec), spec, api)]
                 for k, p in enumerate(paths)}
    cut = synth.write_video(tmp_path / "cut.webm", duration=2.5, fps=10, codec="vp9", seed=1).path  # 1's start
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    jobs[1].path = str(cut)                      # its last window asks for frames 20..29 of 25
    jobs[3].path = str(garbage)                  # not a video at all
    jobs[4].path = str(tmp_path / "gone.webm")   # deleted after probing
    events = decode_windows_dali(jobs, spec, device="cpu", readers=1, batch_size=2, dali_api=api)
    events = list(events)
    handed_back = [e for e in events if isinstance(e, VideoJob)]
    assert {j.video_id for j in handed_back} == {"1", "3", "4"}, [j.video_id for j in handed_back]
    delivered = {k: [e.window for e in events if isinstance(e, Window) and e.job is jobs[k]] for k in range(6)}
    assert [delivered[k] for k in (0, 2, 5)] == [[0, 1, 2]] * 3
    for k in (0, 1, 2, 5):
        for e, frames in zip([e for e in events if isinstance(e, Window) and e.job is jobs[k]], reference[k]):
            np.testing.assert_array_equal(e.frames.numpy(), frames)
    # The cut file: DALI's windows (the frames it has), marked done for PyAV, which decodes the last one.
    assert delivered[1] == [0, 1] and jobs[1].skip.tolist() == [True, True, False]
    assert delivered[3] == delivered[4] == [] and jobs[3].skip is None and jobs[4].skip is None


def test_both_apis_write_the_same_store(tmp_path, capsys):
    """`lvmae extract --decoder dali --dali-api decoder|reader` on DALI-CPU: the same rows, bit for bit."""
    from lvmae_fast.cli import main
    from lvmae_fast.store import Store

    folder = tmp_path / "videos"
    synth.write_video(folder / "cfr.webm", duration=3.0, fps=10, codec="vp9", seed=1)
    synth.write_video(folder / "vfr.webm", duration=3.2, fps=12, codec="vp9", vfr=True, seed=2)
    synth.write_video(folder / "sub" / "c.mkv", duration=2.6, fps=8, codec="vp9", seed=3)
    stores = {}
    for api in ("decoder", "reader"):
        out = tmp_path / api
        assert main(["extract", str(folder), "--encoder", "tiny", "--out", str(out), "--seconds", "1",
                     "--frames", "4", "--batch-size", "3", "--decoder", "dali", "--device", "cpu",
                     "--dali-api", api, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "3 done" in printed and "decoded by dali 3" in printed, printed  # no PyAV fallback
        stores[api] = Store(out)
    assert sorted(stores["decoder"].video_ids) == sorted(stores["reader"].video_ids) == ["cfr", "sub/c", "vfr"]
    for vid in stores["decoder"].video_ids:
        np.testing.assert_array_equal(stores["decoder"].get(vid), stores["reader"].get(vid))
        np.testing.assert_array_equal(stores["decoder"].window_times(vid), stores["reader"].window_times(vid))


def test_unknown_dali_api_is_refused(tmp_path):
    from lvmae_fast.extract import extract_videos

    with pytest.raises(ValueError, match="dali-api"):
        extract_videos(tmp_path, tmp_path / "s", decoder="dali", device="cpu", dali_api="nvdec")
    with pytest.raises(ValueError, match="dali_api"):
        list(decode_windows_dali([], WindowSpec(), device="cpu", dali_api="nvdec"))


@pytest.mark.gpu
def test_gpu_decoder_api_gives_the_readers_windows_of_h264_with_b_frames(tmp_path):
    """On NVDEC, camera-like H.264 (High profile, B-frames: decode order != presentation order): the
    in-memory decoder API gives the reader API's windows and times, and every frame is nearest its own
    software-decoded (PyAV) frame among all sampled frames, so neither API is off by a reordered frame."""
    path = synth.write_camera_like(tmp_path / "c.mp4", duration=6.0, fps=30, size=(640, 360), seed=5)
    spec = WindowSpec(seconds=2.0, frames=4)
    job = prepare_job(VideoJob("c", str(path)), spec)
    ours = _decode(job, spec, "decoder", device="gpu")
    reader = _decode(job, spec, "reader", device="gpu")
    pyav = list(decode_windows_pyav(job.index, job.plan))
    assert [e.window for e in ours] == [e.window for e in reader] == [w for w, _, _ in pyav] == [0, 1, 2]
    for a, b, (_, _, times) in zip(ours, reader, pyav):
        np.testing.assert_allclose(a.times, times, atol=1e-6)
        np.testing.assert_allclose(b.times, times, atol=1e-6)
    software = np.concatenate([f for _, f, _ in pyav]).astype(np.float32)
    for events in (ours, reader):
        frames = np.concatenate([e.frames.cpu().numpy() for e in events]).astype(np.float32)
        assert frames.shape == software.shape
        distance = np.array([[np.abs(g - c).mean() for c in software] for g in frames])
        np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(len(software)))
        assert distance.diagonal().max() < 4.0


def test_a_video_dali_hands_back_is_stored_as_decoder_pyav_stores_it(tmp_path, monkeypatch, capsys):
    """DALI's hand-backs are the damaged videos, whose concealed frames depend on FFmpeg's frame-thread
    count: the fallback decoded with FFmpeg's own count instead of pyav_threads(), so such a video's rows
    differed from `--decoder pyav`'s (by 0.43 in a review)."""
    from lvmae_fast import extract
    from lvmae_fast.cli import main
    from lvmae_fast.store import Store

    monkeypatch.setattr(extract, "FRAME_THREADS", 1)   # FFmpeg's own count is more on any multi-core host
    folder = tmp_path / "videos"
    _garble(synth.write_video(folder / "damaged.webm", duration=15.0, fps=10, codec="vp9", seed=4,
                              size=(66, 50), gop=30).path, range(40, 70, 3))
    stores = {}
    for decoder in ("pyav", "dali"):
        assert main(["extract", str(folder), "--encoder", "tiny", "--out", str(tmp_path / decoder), "--decoder",
                     decoder, "--device", "cpu", "--no-progress"]) == 0
        stores[decoder] = Store(tmp_path / decoder)
    assert "decoded by pyav (fallback) 1" in capsys.readouterr().out   # DALI failed on it
    np.testing.assert_array_equal(stores["dali"].get("damaged"), stores["pyav"].get("damaged"))


def _garble(path, packets):
    """Random bytes over the payloads of these packets (by demux position), the container left intact:
    a file that probes fine and that DALI fails on."""
    import av

    with av.open(str(path)) as container:
        where = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for k in packets:
        pos, size = where[k]
        data[pos + 4:pos + size - 4] = rng.integers(0, 256, size - 8, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("api", ["decoder", "reader"])
@pytest.mark.parametrize("batch_size", [32, 2])   # all in one batch; or failures after partial deliveries
def test_only_the_file_dali_fails_on_alone_goes_to_pyav(tmp_path, api, batch_size):
    """A failed batch names no file. The guess (the video of the last sample taken, else the first of a
    fresh pipeline) sent every good video ahead of the damaged one in that batch to PyAV, one per
    rebuilt pipeline; now a guess decodes alone first and only a file DALI fails on alone is handed
    back: the good ones keep DALI's frames, bit for bit those of their own undamaged runs."""
    spec = WindowSpec(seconds=1.0, frames=4)
    paths = [synth.write_video(tmp_path / f"{k}.webm", duration=3.0, fps=10, codec="vp9", seed=k).path
             for k in range(6)]
    _garble(paths[4], [12])   # a mid-GOP packet of the 5th file
    reference = {k: [e.frames.numpy() for e in _decode(prepare_job(VideoJob(str(k), str(p)), spec), spec, api)]
                 for k, p in enumerate(paths) if k != 4}
    jobs = [prepare_job(VideoJob(str(k), str(p)), spec) for k, p in enumerate(paths)]
    events = list(decode_windows_dali(jobs, spec, device="cpu", readers=1, batch_size=batch_size, dali_api=api))
    assert [j.video_id for j in events if isinstance(j, VideoJob)] == ["4"]
    for k in reference:
        got = [e for e in events if isinstance(e, Window) and e.job is jobs[k]]
        assert [e.window for e in got] == [0, 1, 2], k
        for e, frames in zip(got, reference[k]):
            np.testing.assert_array_equal(e.frames.numpy(), frames)
