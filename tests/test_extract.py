"""End to end: `lvmae extract` on real files, the failure corpus, resume after a hard kill."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from lvmae_fast import synth
from lvmae_fast.cli import main
from lvmae_fast.extract import extract_videos
from lvmae_fast.store import Store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    good = {
        "a": synth.write_video(d / "a.mp4", duration=3.0, fps=10, codec="h264"),
        "b": synth.write_video(d / "b.webm", duration=3.0, fps=10, codec="vp9", vfr=True, seed=1),
        "sub/c": synth.write_video(d / "sub" / "c.mkv", duration=3.3, fps=8, codec="vp9"),  # 27 frames: 3.375 s
        "d": synth.write_video(d / "d.mp4", duration=3.0, fps=10, codec="h264", audio=True),
    }
    bad = synth.write_failure_corpus(d / "bad")
    return d, good, bad


def test_cli_extracts_good_files_and_lists_failures(corpus, tmp_path, capsys):
    folder, good, bad = corpus
    store_dir = tmp_path / "store"
    rc = main(["extract", str(folder), "--encoder", "tiny", "--out", str(store_dir), "--seconds", "1",
               "--no-progress"])
    assert rc == 0
    store = Store(store_dir)
    assert sorted(store.video_ids) == sorted(good)
    assert store.dim == 64
    # 3.0 s -> 3 windows; 3.375 s -> 3 full + 0.375 s tail (< 0.5 s): dropped
    for vid in good:
        assert store.get(vid).shape == (3, 64)
        np.testing.assert_allclose(store.window_times(vid), [[0, 1], [1, 2], [2, 3]])
    failures = [json.loads(line) for line in (store_dir / "failures.jsonl").read_text().splitlines()]
    by_name = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in failures}
    assert set(by_name) == {p.name for p in bad.values()}
    assert "zero-byte" in by_name["zero_byte.mp4"]
    assert "no video stream" in by_name["audio_only.mp4"]
    assert "too short" in by_name["too_short.mp4"]
    assert "not a readable media file" in by_name["notes.mp4"]
    assert by_name["truncated.mp4"]
    assert by_name["truncated_webm.webm"].startswith("truncated") and by_name["truncated_faststart.mp4"].startswith("truncated")
    assert by_name["damaged_middle.mp4"].startswith("damaged video data")
    out = capsys.readouterr().out
    assert "4 done, 0 skipped" in out and "8 failed" in out and "decoded by pyav 4" in out

    # Re-run: everything already there is skipped, nothing recomputed.
    summary = extract_videos(folder, store_dir, encoder="tiny", seconds=1.0)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 4, 8)


def test_window_options_and_partial_tail(corpus, tmp_path):
    folder, good, _ = corpus
    s = extract_videos(str(good["sub/c"].path), tmp_path / "s", seconds=1.0, min_last=0.25, frames=4)
    assert s["done"] == 1
    np.testing.assert_allclose(Store(tmp_path / "s").window_times("c"), [[0, 1], [1, 2], [2, 3], [3, 3.375]])


def test_list_input_and_dali_cpu_backend(corpus, tmp_path):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    folder, good, _ = corpus
    listing = tmp_path / "videos.csv"
    listing.write_text("path,video_id\n" + "".join(f"{v.path},{k.replace('/', '_')}\n" for k, v in good.items()))
    s = extract_videos(listing, tmp_path / "dali", decoder="dali", device="cpu", seconds=1.0, sampling="index")
    assert (s["done"], s["failed"]) == (4, 0)
    assert s["decoder"] == "dali"


KILLER = textwrap.dedent("""
    import os, sys
    from lvmae_fast.video.encoders import tiny
    real = tiny.TinyVideoEncoder.encode_video
    calls = [0]
    def dying(self, x):
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os._exit(9)  # a hard kill mid-batch: no cleanup, no final commit
        return real(self, x)
    tiny.TinyVideoEncoder.encode_video = dying
    from lvmae_fast.extract import extract_videos
    frames, decoder = (int(sys.argv[4]), sys.argv[5]) if len(sys.argv) > 4 else (8, "auto")
    extract_videos(sys.argv[1], sys.argv[2], encoder="tiny", seconds=1.0, batch_size=2, frames=frames,
                   decoder=decoder)
""")


def test_resume_after_kill(corpus, tmp_path):
    folder, good, _ = corpus
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(folder), str(killed), "4"], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    partial = Store(killed)  # readable: only committed, complete videos
    assert 1 <= len(partial) < len(good)
    for vid in partial.video_ids:
        assert partial.get(vid).shape == (3, 64)
    first = set(partial.video_ids)

    summary = extract_videos(folder, killed, encoder="tiny", seconds=1.0, batch_size=2)
    assert summary["skipped"] == len(first) and summary["done"] == len(good) - len(first)
    clean_dir = tmp_path / "clean"
    extract_videos(folder, clean_dir, encoder="tiny", seconds=1.0, batch_size=5)
    resumed, clean = Store(killed), Store(clean_dir)
    assert sorted(resumed.video_ids) == sorted(clean.video_ids) == sorted(good)
    for vid in good:
        np.testing.assert_allclose(resumed.get(vid).astype(np.float32), clean.get(vid).astype(np.float32),
                                   atol=2e-3)


def test_bad_cli_input_is_one_line_error(tmp_path, capsys):
    rc = main(["extract", str(tmp_path / "nope"), "--encoder", "tiny", "--out", str(tmp_path / "s")])
    assert rc == 1
    assert "is not a folder" in capsys.readouterr().err


def test_input_without_any_video_is_a_clear_error(tmp_path):
    from lvmae_fast.extract import expand_inputs

    (tmp_path / "notes.txt").write_text("not a video list entry")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        expand_inputs(tmp_path / "empty")
    out = subprocess.run([sys.executable, "-m", "lvmae_fast", "extract", str(tmp_path / "empty"), "--encoder", "tiny",
                          "--out", str(tmp_path / "store")], capture_output=True, text=True)
    assert out.returncode == 1 and "no videos found" in out.stderr


@pytest.mark.parametrize("text, want", [
    (",video_id,path\n0,x,a.mp4\n1,y,b.mp4\n", [("x", "a.mp4"), ("y", "b.mp4")]),  # pandas' to_csv: index column
    ("video_id,path\n,a.mp4\ny,b.mp4\n", [("a", "a.mp4"), ("y", "b.mp4")]),        # empty id: the file's stem
    ("path,video_id\na.mp4\nb.mp4,bb\n", [("a", "a.mp4"), ("bb", "b.mp4")]),         # short row: no id
    ("# clips\na.mp4\n\n ,\nsub/b.mp4\n", [("a", "a.mp4"), ("b", "sub/b.mp4")]),     # headerless, blank rows
])
def test_csv_lists_read_every_row_with_a_path(tmp_path, text, want):
    from lvmae_fast.video.inputs import list_videos

    (tmp_path / "list.csv").write_text(text)
    assert list_videos(tmp_path / "list.csv") == [(vid, str(tmp_path / p)) for vid, p in want]


def test_csv_rows_without_a_path_are_one_line_errors_naming_the_line(tmp_path):
    (tmp_path / "list.csv").write_text("video_id,path\nx,a.mp4\n\ny\n")
    out = subprocess.run([sys.executable, "-m", "lvmae_fast", "extract", str(tmp_path / "list.csv"), "--encoder",
                          "tiny", "--out", str(tmp_path / "store")], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "list.csv, line 4: no path in column 2 ('path')" in out.stderr


@pytest.mark.parametrize("header", ["video_id,file", "id,video", "name,File_Path", "url"])
def test_a_csv_header_without_a_path_column_is_refused_not_read_as_a_video(tmp_path, header):
    from lvmae_fast.video.inputs import list_videos

    (tmp_path / "list.csv").write_text(f"{header}\nx,a.mp4\n")
    with pytest.raises(ValueError, match=r"list.csv: its first row looks like a header \(columns: '"
                                         + header.split(",")[0] + r"'.*\) but has no 'path' column"):
        list_videos(tmp_path / "list.csv")
    # a headerless list whose first video is named like a column is still headerless
    (tmp_path / "video").write_bytes(b"")
    (tmp_path / "list.csv").write_text("video,x\nb.mp4\n")
    assert list_videos(tmp_path / "list.csv") == [("video", str(tmp_path / "video")), ("b", str(tmp_path / "b.mp4"))]


@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "1e-20"])
def test_window_seconds_must_be_finite_and_positive(tmp_path, capsys, seconds):
    video = synth.write_video(tmp_path / "v.mp4", duration=2.0, fps=10, codec="h264").path
    rc = main(["extract", str(video), "--encoder", "tiny", "--out", str(tmp_path / "s"), "--seconds", seconds])
    assert rc == 1 and "window seconds must be a finite number >= 0.001" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing written: a store set to inf would refuse every later run


def test_broken_links_and_listed_folders_are_failures_with_their_reason(tmp_path):
    folder = tmp_path / "v"
    synth.write_video(folder / "ok.mp4", duration=1.0, fps=10, codec="h264")
    (folder / "gone.mp4").symlink_to(tmp_path / "missing.mp4")  # was skipped without a word
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"]) == (1, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"].endswith("gone.mp4") and failure["reason"] == "broken symbolic link (its target is missing)"
    (tmp_path / "list.txt").write_text("v/ok.mp4\nv\n")
    s = extract_videos(tmp_path / "list.txt", tmp_path / "s2", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"]) == (1, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s2" / "failures.jsonl").read_text().splitlines()]
    assert failure["reason"] == "a folder, not a video file"  # was "file not found"


def test_background_producer_stops_when_the_consumer_stops():
    # A consumer that stops early (an encoder error, close()) must not leave the decode thread blocked
    # forever on a full queue with its generator (and the open container inside it) never closed.
    import threading

    from lvmae_fast.extract import in_background

    closed = threading.Event()

    def frames():
        try:
            yield from range(1000)
        finally:
            closed.set()

    events = in_background(frames, maxsize=2)
    assert next(events) == 0
    events.close()
    assert closed.wait(5.0)


def test_non_finite_embeddings_fail_that_video_only(corpus, tmp_path):
    from lvmae_fast.video.encoders.tiny import TinyVideoEncoder

    class NaNOnFirstBatch(TinyVideoEncoder):
        def encode_video(self, x):
            out = super().encode_video(x)
            self.calls = getattr(self, "calls", 0) + 1
            return out * float("nan") if self.calls == 1 else out

    _, good, _ = corpus
    model = NaNOnFirstBatch()
    # PyAV decodes in input order, 3 windows per video: batch 1 is exactly a's windows.
    s = extract_videos([("a", str(good["a"].path)), ("d", str(good["d"].path))], tmp_path / "s", encoder=model,
                       seconds=1.0, batch_size=3, decoder="pyav")
    assert (s["done"], s["failed"]) == (1, 1)
    assert Store(tmp_path / "s").video_ids == ["d"]
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["video_id"] == "a" and "non-finite" in failure["reason"]


def test_a_video_the_decoder_yields_nothing_for_is_listed_as_failed(corpus, tmp_path, monkeypatch):
    from lvmae_fast.video import decode_pyav

    _, good, _ = corpus
    monkeypatch.setattr(decode_pyav, "decode_windows_pyav", lambda index, plan, **kw: iter(()))
    s = extract_videos([("a", str(good["a"].path))], tmp_path / "s", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"]) == (0, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["video_id"] == "a" and "no windows" in failure["reason"]


def test_an_error_after_a_video_is_stored_does_not_also_count_it_failed(corpus, tmp_path, monkeypatch):
    from lvmae_fast.video import decode_pyav

    real = decode_pyav.decode_windows_pyav

    def raises_after_the_last_window(index, plan, **kw):
        yield from real(index, plan, **kw)
        raise RuntimeError("error while closing the container")

    _, good, _ = corpus
    monkeypatch.setattr(decode_pyav, "decode_windows_pyav", raises_after_the_last_window)
    # batch_size 3 = a's 3 windows: a is stored before the decoder's late error arrives.
    s = extract_videos([("a", str(good["a"].path))], tmp_path / "s", seconds=1.0, batch_size=3, decoder="pyav")
    assert (s["done"], s["failed"]) == (1, 0)
    assert Store(tmp_path / "s").video_ids == ["a"]
    assert (tmp_path / "s" / "failures.jsonl").read_text() == ""


def test_resume_with_other_window_settings_is_refused(corpus, tmp_path):
    folder, good, _ = corpus
    s = extract_videos(str(good["a"].path), tmp_path / "s", seconds=1.0, frames=4)
    assert s["done"] == 1
    again = extract_videos(str(good["a"].path), tmp_path / "s", seconds=1.0, frames=4)  # same settings: resumes
    assert again["skipped"] == 1 and again["done"] == 0
    with pytest.raises(ValueError, match=r"frames=4 \(now 8\)"):
        extract_videos(str(good["d"].path), tmp_path / "s", seconds=1.0, frames=8)
    with pytest.raises(ValueError, match="window_seconds"):
        extract_videos(str(good["d"].path), tmp_path / "s", seconds=2.0, frames=4)
    with pytest.raises(ValueError, match=r"seed=0 \(now 1\)"):  # another random tiny encoder: other embeddings
        extract_videos(str(good["d"].path), tmp_path / "s", seconds=1.0, frames=4, seed=1)
    assert Store(tmp_path / "s").video_ids == ["a"]  # nothing written by the refused runs
    assert Store(tmp_path / "s")._entries["a"]["n"] == 3


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """12 one-second windows, a keyframe every 1.2 s: a video that spans many encoder batches."""
    d = tmp_path_factory.mktemp("long")
    return synth.write_video(d / "long.mp4", duration=12.0, fps=10, codec="h264", gop=12, seed=3)


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_pyav_decode_skipping_windows_gives_the_same_frames(tmp_path, codec):
    """Resuming decodes only the windows left, from the keyframe before the first: every window it
    yields equals the same window of a full decode (frames and timestamps)."""
    from lvmae_fast.video.decode_pyav import decode_windows_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    video = synth.write_video(tmp_path / f"v.{'mp4' if codec == 'h264' else 'webm'}", duration=8.0, fps=10,
                              codec=codec, gop=12, seed=4)
    job = prepare_job(VideoJob("v", str(video.path)), WindowSpec(seconds=1.0))
    full = {w: (f, t) for w, f, t in decode_windows_pyav(job.index, job.plan)}
    assert sorted(full) == list(range(8))
    for skip_upto, extra in [(5, ()), (3, (6,)), (0, (2, 7))]:  # a prefix (seek), and gaps (no seek)
        skip = np.zeros(8, bool)
        skip[:skip_upto] = True
        skip[list(extra)] = True
        got = list(decode_windows_pyav(job.index, job.plan, skip=skip))
        assert [w for w, _, _ in got] == [w for w in range(8) if not skip[w]]
        for w, frames, times in got:
            np.testing.assert_array_equal(frames, full[w][0])
            np.testing.assert_array_equal(times, full[w][1])


def test_a_seek_ffmpeg_refuses_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    """Resuming past saved windows seeks; a seek that raises (a damaged index) failed the video. It now
    decodes from the start, as for a seek that lands elsewhere: the same windows as a full decode."""
    import av

    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    video = synth.write_video(tmp_path / "v.mp4", duration=8.0, fps=10, codec="h264", gop=12, seed=4)
    job = prepare_job(VideoJob("v", str(video.path)), WindowSpec(seconds=1.0))
    full = {w: f for w, f, _ in decode_pyav.decode_windows_pyav(job.index, job.plan)}

    class RefusesSeeks:  # the container, whose seek fails
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def seek(self, *a, **kw):
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    real_open, seeks = decode_pyav._open, []
    monkeypatch.setattr(decode_pyav, "_open", lambda *a: seeks.append(1) or RefusesSeeks(real_open(*a)))
    skip = np.arange(8) < 5
    got = list(decode_pyav.decode_windows_pyav(job.index, job.plan, skip=skip))
    assert [w for w, _, _ in got] == [5, 6, 7] and len(seeks) == 2  # the seek's open, then from the start
    for w, frames, _ in got:
        np.testing.assert_array_equal(frames, full[w])


def kill_during_4th_batch(video, store, frames=8):
    proc = subprocess.run([sys.executable, "-c", KILLER, str(video), str(store), "4", str(frames), "pyav"], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]


def test_a_killed_job_loses_only_the_batch_in_flight_of_a_long_video(long_video, tmp_path):
    """Batches 1-3 (6 of the 12 windows) were embedded before the kill: the resumed job encodes only
    the 6 others, and the stored video equals an uninterrupted job's."""
    from lvmae_fast.video.partial import PARTIAL_DIR

    killed = tmp_path / "killed"
    kill_during_4th_batch(long_video.path, killed)
    assert not (killed / "index.json").exists()  # nothing complete, nothing committed
    assert len(list((killed / PARTIAL_DIR).rglob("chunk-*.npz"))) == 3
    # Saved windows name the frame-index version they were planned on (another version's are not reused).
    from lvmae_fast.video.probe import INDEX_VERSION
    (meta,) = (killed / PARTIAL_DIR).rglob("meta.json")
    assert json.loads(meta.read_text())["settings"]["frame_index"] == INDEX_VERSION
    resumed = extract_videos(str(long_video.path), killed, encoder="tiny", seconds=1.0, batch_size=2, decoder="pyav")
    assert (resumed["done"], resumed["windows"]) == (1, 6)
    assert not any((killed / PARTIAL_DIR).iterdir())  # committed: its saved windows are gone
    clean = extract_videos(str(long_video.path), tmp_path / "clean", encoder="tiny", seconds=1.0, batch_size=5,
                           decoder="pyav")
    assert clean["windows"] == 12
    np.testing.assert_allclose(Store(killed).get("long").astype(np.float32),
                               Store(tmp_path / "clean").get("long").astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(Store(killed).window_times("long"), Store(tmp_path / "clean").window_times("long"))


CTRL_C_DURING_3RD_SAVE = """
import sys
from lvmae_fast.cli import main
from lvmae_fast.video import partial
saves, real = [], partial.PartialVideos.save
def save(self, *args, **kwargs):
    saves.append(1)
    if len(saves) == 3:
        raise KeyboardInterrupt  # as Ctrl-C arrives
    return real(self, *args, **kwargs)
partial.PartialVideos.save = save
sys.exit(main(["extract", sys.argv[1], "--encoder", "tiny", "--out", sys.argv[2], "--seconds", "1", "--batch-size", "2",
               "--decoder", "pyav", "--no-progress"]))
"""


def test_ctrl_c_ends_extract_with_a_resume_hint_not_a_traceback(long_video, tmp_path):
    store = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", CTRL_C_DURING_3RD_SAVE, str(long_video.path), str(store)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "lvmae extract: interrupted; run the same command again to resume" in r.stderr
    resumed = extract_videos(str(long_video.path), store, encoder="tiny", seconds=1.0, batch_size=2, decoder="pyav")
    assert (resumed["done"], resumed["windows"]) == (1, 8)  # 2 saved batches of 2 windows kept


def test_a_killed_job_gives_a_damaged_video_the_verdict_of_one_pass(long_video, tmp_path, monkeypatch):
    """6 sampled frames never come out of the decoder (3 in window 1, 3 in window 10; the budget is
    max(2, 5% of 96) = 4): one pass refuses the video. Killed after windows 0-5 were saved, the rerun must
    refuse it too, not decode windows 6-11 with a fresh budget (3 stand-ins, accepted): saved windows
    with a stood-in frame make the video start over."""
    from lvmae_fast.video import decode_pyav, encoders
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job
    from lvmae_fast.video.partial import PARTIAL_DIR

    job = prepare_job(VideoJob("long", str(long_video.path)), WindowSpec(seconds=1.0))
    lost = {int(job.index.pts[f]) for w in (1, 10) for f in job.plan.frames[w][[1, 3, 5]]}
    real_frames = decode_pyav._frames

    def damaged_frames(*args, **kwargs):  # as a damaged stream: these frames are never produced
        return (frame for frame in real_frames(*args, **kwargs) if frame.pts not in lost)

    monkeypatch.setattr(decode_pyav, "_frames", damaged_frames)
    run = dict(encoder="tiny", seconds=1.0, batch_size=2, decoder="pyav", decode_workers=1)
    one_pass = extract_videos(str(long_video.path), tmp_path / "one", **run)
    assert (one_pass["done"], one_pass["failed"]) == (0, 1)

    class Killed(BaseException):
        pass

    real_encode, calls = encoders.tiny.TinyVideoEncoder.encode_video, [0]

    def dying(self, x):
        calls[0] += 1
        if calls[0] == 4:
            raise Killed
        return real_encode(self, x)

    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(encoders.tiny.TinyVideoEncoder, "encode_video", dying)
        with pytest.raises(Killed):
            extract_videos(str(long_video.path), killed, **run)
    assert len(list((killed / PARTIAL_DIR).rglob("chunk-*.npz"))) == 3  # windows 0-5, window 1 stood in
    resumed = extract_videos(str(long_video.path), killed, **run)
    assert (resumed["done"], resumed["failed"]) == (0, 1)
    [failure] = [json.loads(line) for line in (killed / "failures.jsonl").read_text().splitlines()]
    assert failure["reason"].startswith("damaged video data: more than 4 of the 96 sampled frames")


def test_saved_windows_of_a_changed_file_are_discarded(long_video, tmp_path):
    import os
    import shutil

    from lvmae_fast.video.partial import PartialVideos

    video = tmp_path / "long.mp4"
    shutil.copy(long_video.path, video)
    store = tmp_path / "s"
    store.mkdir()
    stale = PartialVideos(store, dim=64)
    stale.save("long", str(video), 12, np.arange(4), np.full((4, 64), 7.0, np.float32))
    assert stale.load("long", str(video), 12)[1].sum() == 4  # same file: resumable
    os.utime(video, ns=(0, 0))                                 # the file was replaced since
    s = extract_videos(str(video), store, encoder="tiny", seconds=1.0, batch_size=4, decoder="pyav")
    assert (s["done"], s["windows"]) == (1, 12)                # all windows embedded afresh
    assert not (Store(store).get("long") == 7.0).all(axis=1).any()


def test_two_files_with_one_video_id_fail_the_second_only(tmp_path):
    folder = tmp_path / "v"
    synth.write_video(folder / "clip.mp4", duration=2.0, fps=10, codec="h264")
    synth.write_video(folder / "clip.webm", duration=2.0, fps=10, codec="vp9")
    synth.write_video(folder / "other.mp4", duration=2.0, fps=10, codec="h264")
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"], s["total"]) == (2, 1, 3)
    assert s["decoded_by"] == {"pyav": 2}
    assert sorted(Store(tmp_path / "s").video_ids) == ["clip", "other"]
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"].endswith("clip.webm") and "already used by" in failure["reason"]


def test_a_stored_file_keeps_its_id_when_a_new_one_sorts_before_it(tmp_path):
    """a.webm stored, then a.mp4 added beside it: the listing puts a.mp4 first, so a.mp4 was "skipped as
    stored" and the stored a.webm listed as the failure; every later run repeated it. Now the stored file
    keeps its id and the new one is the failure, as when both were new."""
    folder = tmp_path / "v"
    synth.write_video(folder / "a.webm", duration=2.0, fps=10, codec="vp9")
    extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    synth.write_video(folder / "a.mp4", duration=3.0, fps=10, codec="h264")
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["skipped"], s["failed"], s["total"]) == (0, 1, 1, 2)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"].endswith("a.mp4")
    assert failure["reason"].startswith(f"video id 'a' is already used by {folder / 'a.webm'} (in the store)")


def test_every_clash_of_video_ids_is_a_failure_line(tmp_path):
    """Three clashing pairs: three failure lines (each clash was once recorded through a job object
    freed at once, whose reused id made the next clash look recorded already)."""
    folder = tmp_path / "v"
    for name in "abc":
        synth.write_video(folder / f"{name}.mp4", duration=1.0, fps=10, codec="h264")
        (folder / f"{name}.mkv").write_bytes((folder / f"{name}.mp4").read_bytes())
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"], s["total"]) == (3, 3, 6)
    failures = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["video_id"] for f in failures) == ["a", "b", "c"]


@pytest.mark.parametrize("rule", ["time", "index"])
def test_dali_cpu_decode_skipping_windows_gives_the_same_frames(tmp_path, rule):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video.decode_dali import decode_windows_dali
    from lvmae_fast.video.jobs import VideoJob, Window, WindowSpec, prepare_job

    video = synth.write_video(tmp_path / "v.webm", duration=6.0, fps=10, codec="vp9", gop=12, seed=5)
    spec = WindowSpec(seconds=1.0, frames=4, rule=rule)

    def decode(skip):
        job = prepare_job(VideoJob("v", str(video.path)), spec)
        job.skip = skip
        events = list(decode_windows_dali([job], spec, device="cpu", readers=1, batch_size=3))
        assert all(isinstance(e, Window) for e in events)
        return {e.window: (np.asarray(e.frames), e.times) for e in events}

    full = decode(None)
    assert sorted(full) == list(range(6))
    skip = np.array([True, True, False, True, False, False])
    part = decode(skip)
    assert sorted(part) == [2, 4, 5]
    for w, (frames, times) in part.items():
        np.testing.assert_array_equal(frames, full[w][0])
        np.testing.assert_allclose(times, full[w][1])


def test_an_encoders_resize_size_and_style_reach_the_frames_and_the_stores_settings(corpus, tmp_path):
    """A checkpoint's preprocessor `size` (or LanguageBind's preprocessing style) changes every window's
    pixels: extract must preprocess with it, and a store written without it must refuse to mix."""
    from lvmae_fast.video.encoders import build_encoder

    _, good, _ = corpus
    plain = extract_videos(str(good["a"].path), tmp_path / "plain", encoder=build_encoder("tiny"), seconds=1.0, frames=4)
    other = build_encoder("tiny")
    other.resize, other.preprocess_style = 40, "pytorchvideo"
    wider = extract_videos(str(good["a"].path), tmp_path / "wider", encoder=other, seconds=1.0, frames=4)
    assert plain["done"] == wider["done"] == 1
    settings = json.loads((tmp_path / "wider" / "index.json").read_text())["settings"]
    assert (settings["resize"], settings["preprocess_style"]) == (40, "pytorchvideo")
    assert "resize" not in json.loads((tmp_path / "plain" / "index.json").read_text())["settings"]
    a, b = (Store(tmp_path / name).get("a") for name in ("plain", "wider"))
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match=r"resize=40 \(now None\)"):
        extract_videos(str(good["d"].path), tmp_path / "wider", encoder=build_encoder("tiny"), seconds=1.0, frames=4)


def test_saved_windows_survive_a_clashing_file_and_never_mix_settings(long_video, tmp_path):
    """A second file claiming the id of a half-done video fails alone (the first file's saved windows
    are kept and used); a job with other window settings re-embeds every window."""
    import shutil

    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copy(long_video.path, folder / "long.mp4")
    kill_during_4th_batch(folder, tmp_path / "s")
    synth.write_video(folder / "long.webm", duration=2.0, fps=10, codec="vp9")
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, batch_size=2, decoder="pyav")
    assert (s["done"], s["failed"], s["windows"]) == (1, 1, 6)

    kill_during_4th_batch(long_video.path, tmp_path / "s2", frames=8)
    s = extract_videos(long_video.path, tmp_path / "s2", encoder="tiny", seconds=1.0, batch_size=2,
                       decoder="pyav", frames=4)
    assert (s["done"], s["windows"]) == (1, 12)
    clean = extract_videos(long_video.path, tmp_path / "clean4", encoder="tiny", seconds=1.0, frames=4, decoder="pyav")
    assert clean["done"] == 1
    np.testing.assert_allclose(Store(tmp_path / "s2").get("long").astype(np.float32),
                               Store(tmp_path / "clean4").get("long").astype(np.float32), atol=2e-3)


def test_files_cut_mid_gop_and_resumed_mpeg_ts(tmp_path):
    """A recording cut mid-GOP starts with undecodable frames: they take the first decodable frame
    and are not damage. MPEG-TS seeks by bytes: a resume past a prefix must still give the frames a
    full decode gives (the seek is verified, else the file is decoded from the start)."""
    import av

    from lvmae_fast.video.decode_pyav import decode_windows_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    src = synth.write_video(tmp_path / "src.mp4", duration=12.0, fps=10, codec="h264", gop=40, seed=6).path
    cut = tmp_path / "cut.mkv"          # stream copy from 2.5 s: its first 1.5 s reference a lost keyframe
    with av.open(str(src)) as inp, av.open(str(cut), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        inp.seek(int(2.5 / s_in.time_base), stream=s_in, any_frame=True, backward=False)
        for packet in inp.demux(s_in):
            if packet.dts is None:
                continue
            packet.stream = s_out
            out.mux(packet)
    job = prepare_job(VideoJob("cut", str(cut)), WindowSpec(seconds=1.0))
    assert not job.index.keyframe[0]
    windows = list(decode_windows_pyav(job.index, job.plan))
    assert [w for w, _, _ in windows] == list(range(len(job.plan)))

    # MPEG-TS with B-frames and a distinct picture per frame (synth's scenes repeat one picture).
    ts = synth.write_distinct_frames(tmp_path / "v.ts", frames=200, fps=25, keyint=30, bframes=3)
    job = prepare_job(VideoJob("ts", str(ts)), WindowSpec(seconds=1.0))
    full = {w: (f, t) for w, f, t in decode_windows_pyav(job.index, job.plan)}
    for k in range(1, len(job.plan)):
        skip = np.arange(len(job.plan)) < k
        for w, frames, times in decode_windows_pyav(job.index, job.plan, skip=skip):
            np.testing.assert_array_equal(times, full[w][1], err_msg=f"prefix {k}, window {w}")
            np.testing.assert_array_equal(frames, full[w][0], err_msg=f"prefix {k}, window {w}")


def test_dali_failing_midway_hands_pyav_only_the_windows_it_did_not_deliver(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video import decode_dali
    from lvmae_fast.video.jobs import VideoJob, Window, WindowSpec, prepare_job

    video = synth.write_video(tmp_path / "v.webm", duration=6.0, fps=10, codec="vp9", gop=12, seed=8)
    spec = WindowSpec(seconds=1.0, frames=4, rule="index")
    real_build = decode_dali._build_pipe

    def failing_after_one_batch(*args, **kwargs):
        pipe, runs = real_build(*args, **kwargs), [0]
        real_run = pipe.run

        def run():
            runs[0] += 1
            if runs[0] == 2:
                raise RuntimeError("simulated decoder failure")
            return real_run()
        pipe.run = run
        return pipe

    monkeypatch.setattr(decode_dali, "_build_pipe", failing_after_one_batch)
    job = prepare_job(VideoJob("v", str(video.path)), spec)
    events = list(decode_dali.decode_windows_dali([job], spec, device="cpu", readers=1, batch_size=2))
    delivered = [e.window for e in events if isinstance(e, Window)]
    handed_back = [e for e in events if isinstance(e, VideoJob)]
    assert delivered == [0, 1] and handed_back == [job]
    assert job.skip.tolist() == [True, True, False, False, False, False]
    s = extract_videos([("v", str(video.path))], tmp_path / "s", seconds=1.0, frames=4, sampling="index",
                       decoder="dali", device="cpu", batch_size=2)
    # End to end (the failure still patched in): 2 windows from DALI + the 4 others from PyAV, not 2 + 6.
    assert (s["done"], s["windows"], s["decoded_by"]) == (1, 6, {"pyav (fallback)": 1})


def test_another_checkpoint_under_the_same_encoder_name_is_refused(corpus, tmp_path):
    from safetensors.torch import save_file

    from lvmae_fast.video.encoders.tiny import TinyVideoEncoder

    for name, seed in (("A", 7), ("B", 8)):
        (tmp_path / name).mkdir()
        save_file(TinyVideoEncoder(seed=seed).state_dict(), str(tmp_path / name / "tiny.safetensors"))
    video = str(corpus[1]["a"].path)
    assert extract_videos(video, tmp_path / "s", weights=tmp_path / "A", seconds=1.0)["done"] == 1
    copy = tmp_path / "A_copy"  # the same checkpoint elsewhere: same content, resumes
    copy.mkdir()
    (copy / "tiny.safetensors").write_bytes((tmp_path / "A" / "tiny.safetensors").read_bytes())
    assert extract_videos(video, tmp_path / "s", weights=copy, seconds=1.0)["skipped"] == 1
    for other in (tmp_path / "B", None):
        with pytest.raises(ValueError, match="weights="):
            extract_videos(str(corpus[1]["d"].path), tmp_path / "s", weights=other, seconds=1.0)
    # A store written before 2026-11-27 records the sampled fingerprint: the same checkpoint resumes it.
    from lvmae_fast.store import load_index
    from lvmae_fast.video.encoders import legacy_weights_fingerprint

    index = load_index(tmp_path / "s")
    index["settings"]["weights"] = legacy_weights_fingerprint(tmp_path / "A")
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    assert extract_videos(str(corpus[1]["d"].path), tmp_path / "s", weights=copy, seconds=1.0)["done"] == 1
    with pytest.raises(ValueError, match="weights="):
        extract_videos(str(corpus[1]["b"].path), tmp_path / "s", weights=tmp_path / "B", seconds=1.0)


def test_out_must_be_a_store_or_new_and_other_inputs_are_checked_first(corpus, tmp_path):
    video = str(corpus[1]["a"].path)
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "data.txt").write_text("user data")
    (mine / "partial" / "exp").mkdir(parents=True)
    with pytest.raises(ValueError, match="not an embedding store and not empty .*shards/data.txt"):
        extract_videos(video, mine, seconds=1.0)
    assert (mine / "shards" / "data.txt").read_text() == "user data" and (mine / "partial" / "exp").is_dir()
    assert not (mine / ".lock").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        extract_videos(video, a_file, seconds=1.0)
    with pytest.raises(ValueError, match="min-last must be in"):
        extract_videos(video, tmp_path / "s", min_last=1.5)
    with pytest.raises(ValueError, match=r"--seed must be in \[-2\^63, 2\^64\), got 10{23}$"):  # was torch's overflow
        extract_videos(video, tmp_path / "s", seed=10 ** 23)
    assert not (tmp_path / "s").exists()  # refused before a store (and its settings) existed


def test_list_inputs_with_a_bom_text_files_and_one_file_twice(corpus, tmp_path):
    folder, good, _ = corpus
    listing = tmp_path / "list.csv"
    listing.write_text(f"video_id,path\nfirst,{good['a'].path}\nsecond,{good['d'].path}\n", encoding="utf-8-sig")
    s = extract_videos(listing, tmp_path / "s1", seconds=1.0)
    assert sorted(Store(tmp_path / "s1").video_ids) == ["first", "second"] and s["failed"] == 0
    notes = tmp_path / "g" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("meeting notes\n" * 2000)
    video = tmp_path / "g" / "clip.mp4"
    video.write_bytes(good["a"].path.read_bytes())
    s = extract_videos(str(tmp_path / "g" / "*"), tmp_path / "s2", seconds=1.0)
    assert (s["done"], s["failed"]) == (1, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s2" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"].endswith("notes.txt") and failure["reason"].startswith("not a video")
    twice = tmp_path / "twice.txt"
    twice.write_text(f"{video}\n{tmp_path / 'g' / '.' / 'clip.mp4'}\n")
    s = extract_videos(twice, tmp_path / "s3", seconds=1.0)
    assert (s["done"], s["failed"], s["total"]) == (1, 0, 1)


def test_saved_windows_resume_only_under_the_same_decoder_and_precision(long_video, tmp_path):
    """Windows saved by a PyAV fp32 job are not mixed with another decoder's or precision's: the video
    starts over (all 12 windows), where the same settings resume with the 6 left."""
    kill_during_4th_batch(long_video.path, tmp_path / "b")
    s = extract_videos(str(long_video.path), tmp_path / "b", seconds=1.0, batch_size=2, decoder="pyav",
                       precision="bf16")
    assert (s["done"], s["windows"]) == (1, 12)
    pytest.importorskip("nvidia.dali")  # the decoder half needs DALI (its CPU backend hands H.264 to PyAV)
    kill_during_4th_batch(long_video.path, tmp_path / "a")
    s = extract_videos(str(long_video.path), tmp_path / "a", seconds=1.0, batch_size=2, decoder="dali")
    assert (s["done"], s["windows"]) == (1, 12)


def test_unsupported_devices_are_one_line_errors_before_anything_is_written(corpus, tmp_path, capsys):
    """--device mps printed a traceback; --device meta a traceback after writing a partial store
    (index.json, shards/, failures.jsonl). Any device but auto/cpu/cuda[:N], and cuda without CUDA,
    is refused in one line and leaves --out uncreated."""
    import torch

    folder, good, _ = corpus
    devices = ["mps", "meta", "xpu", "cuda:x", "cpu:"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for device in devices:
        out = tmp_path / "store"
        capsys.readouterr()
        assert main(["extract", str(good["a"].path), "--encoder", "tiny", "--out", str(out), "--seconds", "1",
                     "--no-progress", "--device", device]) == 1, device
        err = capsys.readouterr().err
        assert err.startswith(f"lvmae extract: error: device '{device}'") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and not out.exists(), device


def test_progress_shows_how_far_the_video_in_flight_is(tmp_path, capsys, monkeypatch):
    """One long video kept the bar at 0/1 video until its end: the postfix names it and its windows. When
    stderr is not a terminal (a CI log) there is no bar: its frames were glued to the log lines."""
    synth.write_video(tmp_path / "v" / "long.mp4", duration=6.0, fps=4, codec="h264")
    extract_videos(tmp_path / "v", tmp_path / "plain", encoder="tiny", seconds=1.0, batch_size=2, progress=True)
    assert "windows" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    extract_videos(tmp_path / "v", tmp_path / "store", encoder="tiny", seconds=1.0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    for done in (2, 4):  # after each 2-window batch of its 6 windows; the last batch completes it
        assert f"long: {done}/6 windows" in err
    assert "long: 6/6" not in err


def test_dali_failing_on_one_video_keeps_the_others_of_its_reader_on_dali(tmp_path, monkeypatch):
    """A DALI error does not send the rest of its reader to PyAV (before: every unfinished video of it
    went there): the video it was decoding decodes alone, the reader restarts for the videos after it.
    The failure here is the first pipeline's, not a file's: the video decodes alone on DALI, no video
    goes to PyAV (test_dali_decoder has damaged files). The store equals PyAV's."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from lvmae_fast.video import decode_dali

    pairs = [(k, str(synth.write_video(tmp_path / f"{k}.webm", duration=3.0, fps=10, codec="vp9", seed=i).path))
             for i, k in enumerate("abc")]
    real_build, built = decode_dali._build_pipe, []

    def first_reader_fails_at_its_second_batch(*args, **kwargs):
        pipe, runs = real_build(*args, **kwargs), [0]
        built.append(pipe)
        real_run = pipe.run

        def run():
            runs[0] += 1
            if len(built) == 1 and runs[0] == 2:
                raise RuntimeError("simulated decoder failure")
            return real_run()
        pipe.run = run
        return pipe

    monkeypatch.setattr(decode_dali, "_build_pipe", first_reader_fails_at_its_second_batch)
    options = dict(seconds=1.0, frames=4, sampling="index", device="cpu", batch_size=2, readers=1)
    s = extract_videos(pairs, tmp_path / "dali", decoder="dali", **options)
    assert (s["done"], s["windows"], s["decoded_by"]) == (3, 9, {"dali": 3})
    assert len(built) == 3  # the video it was decoding alone, and the videos after it
    ref = extract_videos(pairs, tmp_path / "pyav", decoder="pyav", **options)
    assert ref["done"] == 3
    dali, pyav = Store(tmp_path / "dali"), Store(tmp_path / "pyav")
    for vid in "abc":
        np.testing.assert_allclose(dali.window_times(vid), pyav.window_times(vid))
        np.testing.assert_allclose(dali.get(vid), pyav.get(vid), atol=0.1, rtol=0.1)


def test_a_full_disk_while_saving_windows_or_failures_is_one_line_and_the_rerun_resumes(long_video, tmp_path,
                                                                                        monkeypatch, capsys):
    """ENOSPC while a long video's embedded windows are saved beside the store (video/partial.py): no temp
    file, the chunks saved before stay, one line naming the video and the reason, and a rerun resumes
    from the saved chunks. ENOSPC on failures.jsonl: one line naming the file, no torn line."""
    import errno
    import io

    import lvmae_fast.extract as extract_mod
    import lvmae_fast.video.partial as partial_mod

    real_savez, calls = partial_mod.np.savez, []

    def savez(f, **arrays):  # the third chunk finds the disk full
        calls.append(1)
        if len(calls) == 3:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, **arrays)

    monkeypatch.setattr(partial_mod.np, "savez", savez)
    store = tmp_path / "s"
    args = ["extract", str(long_video.path), "--encoder", "tiny", "--out", str(store), "--seconds", "1",
            "--batch-size", "2", "--decoder", "pyav", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lvmae extract: error: could not save embedded windows of video long under {store / 'partial'}: "
                   "No space left on device (2 chunks saved before are kept; rerunning resumes from them)"], err
    assert sorted(p.name for p in (store / "partial").rglob("*") if p.is_file()) == [
        "chunk-000000.npz", "chunk-000001.npz", "meta.json"]
    monkeypatch.setattr(partial_mod.np, "savez", real_savez)
    resumed = extract_videos(str(long_video.path), store, encoder="tiny", seconds=1.0, batch_size=2, decoder="pyav")
    assert (resumed["done"], resumed["windows"]) == (1, 8)  # the 4 windows saved before are not redone
    assert Store(store).num_segments("long") == 12

    bad = tmp_path / "notes.mp4"
    bad.write_text("hello")

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract_mod, "open", lambda path, mode, buffering=-1: Full(path, "w"), raising=False)
    assert main(["extract", str(bad), "--encoder", "tiny", "--out", str(tmp_path / "s2"), "--seconds", "1",
                 "--decoder", "pyav", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"lvmae extract: error: could not write to {tmp_path / 's2' / 'failures.jsonl'} (recording that {bad} failed"), err
    assert err[0].endswith("): No space left on device")
    assert (tmp_path / "s2" / "failures.jsonl").read_bytes() == b""


def test_auto_decoder_is_pyav_even_where_dali_could_run(monkeypatch):
    """`--decoder auto` takes PyAV on a CUDA host with DALI too (measured 3.6x faster end to end there);
    DALI only when asked for, and asking without DALI installed is a one-line error naming the extra."""
    import torch

    from lvmae_fast import extract
    from lvmae_fast.video import decode_dali

    monkeypatch.setattr(decode_dali, "dali_available", lambda: True)
    for device in ("cuda", "cpu"):
        assert extract.resolve_decoder("auto", torch.device(device)) == "pyav"
        assert extract.resolve_decoder("dali", torch.device(device)) == "dali"
    monkeypatch.setattr(decode_dali, "dali_available", lambda: False)
    with pytest.raises(ValueError, match=r"nvidia-dali is not installed .*lvmae_fast\[dali\]"):
        extract.resolve_decoder("dali", torch.device("cuda"))


def test_nvdec_decoder_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    """--decoder nvdec needs a CUDA device, an FFmpeg with the CUDA hwaccel, and NVDEC really decoding
    (checked on a test clip before the job): each missing piece is one clear error, not a failure per video."""
    import torch

    from lvmae_fast import extract

    hwaccel = pytest.importorskip("av.codec.hwaccel")
    with pytest.raises(ValueError, match="needs --device cuda"):
        extract.resolve_decoder("nvdec", torch.device("cpu"))
    monkeypatch.setattr(hwaccel, "hwdevices_available", lambda: ["vaapi"])
    with pytest.raises(ValueError, match=r"no CUDA hwaccel here \(hwdevices: vaapi\)"):
        extract.resolve_decoder("nvdec", torch.device("cuda"))
    if not torch.cuda.is_available():  # the test clip really fails to open on the device here
        monkeypatch.setattr(hwaccel, "hwdevices_available", lambda: ["cuda"])
        with pytest.raises(ValueError, match=r"NVDEC decode does not work on cuda \(.+\); use --decoder pyav"):
            extract.resolve_decoder("nvdec", torch.device("cuda"))


def test_nvdec_settings_give_ffmpeg_a_cuda_context_of_its_own():
    """PyAV's is_hw_owned asks FFmpeg for the device's primary context by default, which FFmpeg refuses
    (ENOTSUP, "[Errno 95] Operation not supported") once torch has brought it up with other scheduling
    flags: every NVDEC decode in `lvmae extract` failed that way on an H200, the encoder being on the
    GPU first. The settings must ask for FFmpeg's own context (primary_ctx 0) on the given device."""
    pytest.importorskip("av.codec.hwaccel")
    from lvmae_fast.video.decode_pyav import nvdec_accel

    accel = nvdec_accel(1)
    assert accel.options == {"primary_ctx": "0"}
    assert accel.device_id == 1 and accel.is_hw_owned and accel.allow_software_fallback


def test_shared_nvdec_settings_bind_torchs_context_and_ask_ffmpeg_for_the_current_one(monkeypatch):
    """--nvdec-context shared: the device's primary context is made current on the calling thread
    (the driver is not on a CPU box: the binding is stood in for), then FFmpeg takes the current
    context (current_ctx 1) and no context of its own (primary_ctx 0; both 1 would be refused)."""
    pytest.importorskip("av.codec.hwaccel")
    from lvmae_fast.video import decode_pyav

    bound = []
    monkeypatch.setattr(decode_pyav, "_bind_primary_context", bound.append)
    accel = decode_pyav.nvdec_accel(1, shared=True)
    assert bound == [1] and accel.options == {"primary_ctx": "0", "current_ctx": "1"} and accel.device_id == 1
    monkeypatch.setattr(decode_pyav, "NVDEC_SHARED_CONTEXT", True)   # the module default, as the bench sets it
    assert decode_pyav.nvdec_accel(0).options["current_ctx"] == "1" and bound == [1, 0]
    assert "current_ctx" not in decode_pyav.nvdec_accel(0, shared=False).options and bound == [1, 0]


class FakeDriver:
    """libcuda as _primary_context calls it: records calls, answers cuDevicePrimaryCtxGetState with
    `flags`, and returns `fail_set` from the flag change."""

    def __init__(self, flags: int, fail_set: int = 0):
        self.flags, self.fail_set, self.calls = flags, fail_set, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "cuDevicePrimaryCtxRetain":
                args[0]._obj.value = 1234            # the context handle
            elif name == "cuDevicePrimaryCtxGetState":
                args[1]._obj.value, args[2]._obj.value = self.flags, 1
            elif name == "cuDevicePrimaryCtxSetFlags_v2":
                if self.fail_set:
                    return self.fail_set
                self.flags = args[1].value
            return 0
        return call


@pytest.fixture
def use_driver(monkeypatch):
    """Install a stand-in libcuda for the test; the primary context cached per process starts and ends empty."""
    from lvmae_fast.video import decode_pyav

    def use(driver):
        monkeypatch.setattr(decode_pyav, "_libcuda", lambda: driver)
        return driver

    decode_pyav._primary_context.cache_clear()
    yield use
    decode_pyav._primary_context.cache_clear()


@pytest.mark.parametrize("flags, expected, changed", [(0x0, 0x4, True), (0x11, 0x14, True), (0x14, 0x14, False)])
def test_shared_nvdec_context_is_switched_to_blocking_sync_keeping_its_other_flags(use_driver, flags, expected,
                                                                                  changed):
    """torch's context schedules by CUDA's default (spin while waiting, with fewer contexts than CPUs):
    binding it for NVDEC switches its scheduling bits to blocking sync, other flag bits kept, once."""
    from lvmae_fast.video import decode_pyav

    driver = use_driver(FakeDriver(flags))
    assert decode_pyav._primary_context(0) == 1234
    assert decode_pyav._primary_context(0) == 1234   # retained once per process
    assert driver.flags == expected
    assert driver.calls.count("cuDevicePrimaryCtxRetain") == 1
    assert ("cuDevicePrimaryCtxSetFlags_v2" in driver.calls) == changed


def test_shared_nvdec_context_still_binds_when_the_flags_cannot_change(use_driver, caplog):
    from lvmae_fast.video import decode_pyav

    use_driver(FakeDriver(0x0, fail_set=201))
    with caplog.at_level("WARNING"):
        assert decode_pyav._primary_context(0) == 1234
    assert "will spin while they wait" in caplog.text and "cuDevicePrimaryCtxSetFlags_v2 failed (CUresult 201)" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_nvdec_decodes_the_frames_software_decoding_gives(tmp_path, monkeypatch, shared):
    """PyAV on NVDEC (FFmpeg's CUDA hwaccel), after torch has brought up the device's primary context
    (as the encoder does in extract; this failed with ENOTSUP on an H200 before primary_ctx 0): the
    test clip check passes, and a camera-like clip (High profile, B-frames) gives the windows of the
    software decode: the same frames (times, and each GPU frame nearest its own software frame among
    all sampled frames), pixels within rounding. The H200 showed a mean difference of 2.5 of 255: NV12
    from the GPU and planar YUV from libavcodec take different chroma paths to RGB."""
    from lvmae_fast.video.decode_pyav import decode_windows_pyav, nvdec_accel, nvdec_problem
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job
    import torch

    from lvmae_fast.video import decode_pyav

    monkeypatch.setattr(decode_pyav, "NVDEC_SHARED_CONTEXT", shared)  # shared: in torch's context
    torch.zeros(1, device="cuda")                    # torch's primary context first, as in extract
    assert nvdec_problem(0) is None
    path = synth.write_camera_like(tmp_path / "c.mp4", duration=6.0, fps=30, size=(640, 360), seed=3)
    job = prepare_job(VideoJob("c", str(path)), WindowSpec(seconds=2.0, frames=4))
    cpu = list(decode_windows_pyav(job.index, job.plan))
    software = []   # FFmpeg decoding in software though given NVDEC: frames not 'cuda' (decode_pyav.HW_FRAME_FORMAT)
    gpu = list(decode_windows_pyav(job.index, job.plan, hwaccel=lambda: nvdec_accel(0),
                                   on_software=lambda: software.append(1)))
    assert software == [], "NVDEC did not decode the clip: FFmpeg fell back to software"
    assert [w for w, _, _ in gpu] == [w for w, _, _ in cpu] == [0, 1, 2]
    for (_, a, ta), (_, b, tb) in zip(cpu, gpu):
        np.testing.assert_array_equal(ta, tb)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 4.0
    cpu_frames = np.concatenate([a for _, a, _ in cpu]).astype(np.float32)
    gpu_frames = np.concatenate([b for _, b, _ in gpu]).astype(np.float32)
    distance = np.array([[np.abs(g - c).mean() for c in cpu_frames] for g in gpu_frames])
    np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(len(cpu_frames)))


@pytest.mark.gpu
def test_gpu_side_streams_give_the_store_the_default_stream_gives(corpus, tmp_path, monkeypatch):
    """extract.SIDE_STREAMS: uploads and preprocessing on each decode thread's stream, the encoder on its
    own, give the embeddings of the default stream's run exactly (same kernels, same inputs), with
    several decodes at once and a batch that spans videos."""
    from lvmae_fast import extract

    stores = {}
    for side in (False, True):
        monkeypatch.setattr(extract, "SIDE_STREAMS", side)
        out = tmp_path / f"side{side}"
        summary = extract_videos(str(corpus[0]), out, encoder="tiny", seconds=1.0, batch_size=3, device="cuda",
                                 decoder="pyav", decode_workers=3)
        assert summary["done"] == len(corpus[1])
        stores[side] = Store(out)
    assert stores[True].video_ids == stores[False].video_ids
    for vid in stores[False].video_ids:
        np.testing.assert_array_equal(stores[True].get(vid), stores[False].get(vid))


def test_folder_inputs_take_camera_and_disc_suffixes(tmp_path):
    """A folder of AVCHD (.MTS/.M2TS), MXF and VOB files was skipped silently: none of them was listed."""
    from lvmae_fast.video.inputs import list_videos

    for name in ("00001.MTS", "00002.m2ts", "C0001.MXF", "VTS_01_1.VOB", "clip.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(vid for vid, _ in list_videos(tmp_path)) == ["00001", "00002", "C0001", "VTS_01_1", "clip"]


def test_a_file_name_that_is_not_utf8_is_extracted_and_resumed(tmp_path):
    # Its id holds surrogate escapes (os.fsdecode); hashing it for saved progress ended the whole job.
    import os

    folder = tmp_path / "v"
    synth.write_video(folder / "ok.mp4", duration=1.0, fps=10, codec="h264")
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.mp4")
    os.link(os.fsencode(folder / "ok.mp4"), odd)
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"]) == (2, 0)
    assert os.fsdecode(b"caf\xe9") in Store(tmp_path / "s").video_ids
    s = extract_videos(folder, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["skipped"], s["failed"]) == (0, 2, 0)


def test_a_store_id_held_from_another_file_is_a_failure_across_runs(tmp_path, caplog):
    """An input whose id the store holds from another, still existing file of another size was skipped as
    stored (a log warning only: nothing in failures.jsonl, and every later run repeated it)."""
    one = synth.write_video(tmp_path / "sub1" / "clip.mp4", duration=1.0, fps=10, codec="h264").path
    other = synth.write_video(tmp_path / "sub2" / "clip.mp4", duration=2.0, fps=10, codec="h264", seed=1).path
    extract_videos(tmp_path / "sub1", tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    s = extract_videos(other, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["skipped"], s["failed"], s["total"]) == (0, 0, 1, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"] == str(other) and failure["reason"].startswith(
        f"video id 'clip' is in the store already, from {Path(one).resolve()}, a file of another size")
    # A copy of the stored file (a staged dataset) or the file moved: the video the store holds, no warning.
    import shutil

    shutil.copytree(tmp_path / "sub1", tmp_path / "copy")
    moved = Path(one).rename(tmp_path / "clip.mp4")
    for again in (tmp_path / "copy" / "clip.mp4", moved):
        caplog.clear()
        with caplog.at_level("WARNING"):
            s = extract_videos(again, tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
        assert (s["skipped"], s["failed"]) == (1, 0) and not caplog.records
    assert Store(tmp_path / "s").num_segments("clip") == 1


def test_a_stale_list_entry_does_not_take_the_id_of_a_file_that_exists(tmp_path):
    synth.write_video(tmp_path / "real" / "clip.mp4", duration=1.0, fps=10, codec="h264")
    (tmp_path / "list.txt").write_text("old/clip.mp4\nreal/clip.mp4\n")
    s = extract_videos(tmp_path / "list.txt", tmp_path / "s", encoder="tiny", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"], s["total"]) == (1, 1, 2)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["path"].endswith("old/clip.mp4") and failure["reason"] == "file not found"
    assert Store(tmp_path / "s").meta("clip")["source"] == str((tmp_path / "real" / "clip.mp4").resolve())


def test_csv_comments_only_before_the_first_row_or_in_headerless_lists(tmp_path):
    from lvmae_fast.video.inputs import list_videos

    (tmp_path / "list.csv").write_text("# made by hand\nvideo_id,path\n#7,a.mp4\nx,#b.mp4\n")
    assert list_videos(tmp_path / "list.csv") == [("#7", str(tmp_path / "a.mp4")), ("x", str(tmp_path / "#b.mp4"))]


def test_links_keep_their_names_and_broken_ones_are_inputs_in_globs_too(tmp_path):
    from lvmae_fast.video.inputs import list_videos

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "3f2a.mp4").write_bytes(b"x")
    root = tmp_path / "vids"
    root.mkdir()
    for name in ("clip_1.mp4", "clip_2.mp4"):  # a content-addressed dataset: two names, one blob
        (root / name).symlink_to(tmp_path / "blobs" / "3f2a.mp4")
    (root / "broken.mp4").symlink_to(tmp_path / "nowhere.mp4")  # a glob dropped it without a word
    want = [(n, str(root / f"{n}.mp4")) for n in ("broken", "clip_1", "clip_2")]
    assert list_videos(root) == want and list_videos(f"{root}/*.mp4") == want


def test_list_files_users_make_get_clear_errors_or_warnings(tmp_path, caplog):
    """From a review of list inputs: a `ls > list.txt` line '#1 clip.mp4' was dropped as a comment without a
    word; an unclosed quote in a CSV swallowed the rows after it into one path, or ended in a csv.Error
    traceback; a UTF-16 list (PowerShell's `>`) gave only "'utf-8' codec can't decode..."; a ';'-separated
    CSV made its header a failed video; an 'id' column was ignored silently."""
    from lvmae_fast.video.inputs import list_videos

    (tmp_path / "#1 clip.mp4").write_bytes(b"x")
    listed = tmp_path / "list.txt"
    listed.write_text("#1 clip.mp4\n# a note\nb.mp4\n./#1 clip.mp4\n")
    with caplog.at_level("WARNING"):
        assert list_videos(listed) == [("b", str(tmp_path / "b.mp4")), ("#1 clip", str(tmp_path / "./#1 clip.mp4"))]
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and "list.txt, line 1: '#1 clip.mp4' is a comment" in told[0], told

    cases = {
        "quote.csv": ('path\n"a.mp4\nb.mp4\nc.mp4\n', r"quote.csv, line 2: a path cell spans lines"),
        "huge.csv": ('path\n"' + "v.mp4\n" * 30000, r"huge.csv, line \d+: not a valid CSV \(field larger"),
        "semi.csv": ("path;video_id\na.mp4;x\n", r"semi.csv: its first row 'path;video_id' is one cell holding a ';'"),
    }
    for name, (text, error) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=error):
            list_videos(tmp_path / name)
    (tmp_path / "utf16.txt").write_bytes("a.mp4\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"utf16.txt: a list file must be UTF-8 text \(.*save it as UTF-8\)"):
        list_videos(tmp_path / "utf16.txt")

    # A file whose name holds a newline, quoted by csv.writer: a real path, not an unclosed quote.
    (tmp_path / "new\nline.mp4").write_bytes(b"x")
    with open(tmp_path / "newline.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "video_id"], ["new\nline.mp4", "nl"], ["b.mp4", "b"]])
    assert list_videos(tmp_path / "newline.csv") == [("nl", str(tmp_path / "new\nline.mp4")), ("b", str(tmp_path / "b.mp4"))]

    caplog.clear()
    (tmp_path / "ids.csv").write_text("Video ID,path\nx1,a.mp4\n")
    with caplog.at_level("WARNING"):
        assert list_videos(tmp_path / "ids.csv") == [("a", str(tmp_path / "a.mp4"))]
    assert any("column 'Video ID' is not used for ids" in r.getMessage() for r in caplog.records)


def test_folder_inputs_leave_hidden_files_and_folders_out(tmp_path):
    """A USB drive's .Trash-1000/files/ and macOS' ._clip.mp4 were extracted as videos (a glob already left
    them out); folder inputs now agree with globs."""
    from lvmae_fast.video.inputs import list_videos

    for name in ("x.mp4", "sub/Y.MP4", ".Trash-1000/files/deleted.mp4", "._x.mp4", "sub/.hidden/z.mp4"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    assert [vid for vid, _ in list_videos(tmp_path / "in")] == ["sub/Y", "x"]
    assert [vid for vid, _ in list_videos(str(tmp_path / "in" / "**" / "*.*"))] == ["sub/Y", "x"]


def test_skip_deblocking_is_recorded_refused_where_it_cannot_apply_and_reaches_the_decodes(tmp_path, monkeypatch, capsys):
    """--skip-deblocking: the store records it (a later run with the filter on is refused, as any setting
    that changes the pixels), it changes a camera-like H.264 clip's embeddings, and decoders that cannot
    skip the filter (NVDEC, DALI) refuse it up front instead of ignoring it."""
    from lvmae_fast import extract as extract_module

    video = synth.write_camera_like(tmp_path / "c.mp4", duration=2.0, fps=10, size=(160, 96), seed=4)
    assert main(["extract", str(video), "--encoder", "tiny", "--out", str(tmp_path / "skip"), "--seconds", "1",
                 "--skip-deblocking", "--no-progress"]) == 0
    assert json.loads((tmp_path / "skip" / "index.json").read_text())["settings"]["deblocking"] == "skipped"
    extract_videos(str(video), tmp_path / "plain", seconds=1.0)
    # Not recorded when off: stores from before the option still resume.
    assert "deblocking" not in json.loads((tmp_path / "plain" / "index.json").read_text())["settings"]
    skipped, plain = Store(tmp_path / "skip"), Store(tmp_path / "plain")
    assert not np.array_equal(skipped.get("c"), plain.get("c"))
    with pytest.raises(ValueError, match=r"deblocking='skipped' \(now None\)"):
        extract_videos(str(video), tmp_path / "skip", seconds=1.0)
    monkeypatch.setattr(extract_module, "resolve_decoder", lambda decoder, device: decoder)
    for decoder in ("nvdec", "hybrid", "dali"):
        with pytest.raises(ValueError, match=f"not --decoder {decoder}: NVDEC always deblocks"):
            extract_videos(str(video), tmp_path / decoder, seconds=1.0, decoder=decoder, skip_deblocking=True)
        assert not (tmp_path / decoder).exists()


@pytest.mark.parametrize("flags", [["--readers", "2"], ["--dali-api", "decoder"], ["--decoder", "auto", "--readers", "4"]])
def test_dali_flags_with_another_decoder_are_refused_not_ignored(corpus, tmp_path, flags, capsys):
    _, good, _ = corpus
    assert main(["extract", str(good["a"].path), "--encoder", "tiny", "--out", str(tmp_path / "s"), *flags]) == 1
    assert f"{flags[-2]} applies to --decoder dali only" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_finished_videos_frame_index_is_not_held_for_the_rest_of_the_job(corpus, tmp_path, monkeypatch):
    """Every job object stays referenced for the whole run; its frame index (~2 MB per hour of 30 fps) was
    kept with it, so a job over thousands of hours grew by gigabytes. Once a video is stored, its index
    goes; the store is unchanged."""
    from lvmae_fast import extract as extract_module
    from lvmae_fast.video.encoders import build_encoder

    folder, good, _ = corpus
    jobs, seen = [], []

    class Recorded(extract_module.VideoJob):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            jobs.append(self)

    monkeypatch.setattr(extract_module, "VideoJob", Recorded)
    model = build_encoder("tiny")
    encode = model.encode_video

    def spy(frames):
        seen.append([job.index is None for job in jobs])
        return encode(frames)

    model.encode_video = spy
    paths = [(vid, str(good[vid].path)) for vid in ("a", "d", "b")]
    summary = extract_videos(paths, tmp_path / "s", encoder=model, seconds=1.0, batch_size=3, decode_workers=1)
    assert summary["done"] == 3 and len(seen) == 3  # one batch per video (3 windows each)
    assert seen == [[False, False, False], [True, False, False], [True, True, False]]
    assert all(job.index is None for job in jobs)
    reference = extract_videos(paths, tmp_path / "ref", encoder=build_encoder("tiny"), seconds=1.0, batch_size=3,
                               decode_workers=1)
    assert reference["done"] == 3
    for vid, _ in paths:
        assert np.array_equal(Store(tmp_path / "s").get(vid), Store(tmp_path / "ref").get(vid))


def test_a_symlink_loop_among_the_inputs_is_a_failure_not_a_traceback(corpus, tmp_path):
    """Path.resolve() raises RuntimeError on a link loop (Python <= 3.12): a looping clip.mp4 beside a real
    clip.webm (the same id) stopped extract before any video with a traceback. It is now a failure line
    saying it is a loop, and the real file is extracted."""
    import shutil

    _, good, _ = corpus
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good["a"].path, folder / "clip.webm")
    (folder / "clip.mp4").symlink_to("clip.mp4")
    (folder / "alone.mp4").symlink_to("alone.mp4")
    summary = extract_videos(str(folder), tmp_path / "s", seconds=1.0)
    assert (summary["done"], summary["failed"]) == (1, 2)
    reasons = {Path(f["path"]).name: f["reason"] for f in map(json.loads, (tmp_path / "s" / "failures.jsonl").open())}
    assert set(reasons) == {"clip.mp4", "alone.mp4"}
    assert reasons["alone.mp4"].startswith("symbolic link loop"), reasons


def test_list_entries_keep_the_blanks_a_file_is_named_with(corpus, tmp_path):
    """List lines and CSV cells were stripped: " lead.mp4" and "trail.mp4 " (real names) were "file not found",
    with no way to list the second. Blanks around an entry are still cut when no file has them."""
    import shutil

    _, good, _ = corpus
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (" lead.mp4", "trail.mp4 ", "plain.mp4"):
        shutil.copy(good["a"].path, folder / name)
    (folder / "list.txt").write_text(" lead.mp4\ntrail.mp4 \n   plain.mp4  \n")
    (folder / "list.csv").write_text('path,video_id\n" lead.mp4",x\n"trail.mp4 ",y\n  plain.mp4 ,z\n')
    for listed, ids in (("list.txt", {" lead", "trail", "plain"}), ("list.csv", {"x", "y", "z"})):
        summary = extract_videos(str(folder / listed), tmp_path / listed, seconds=1.0)
        assert (summary["done"], summary["failed"]) == (3, 0), listed
        assert set(Store(tmp_path / listed).video_ids) == ids


def test_a_folder_too_deep_to_list_is_logged_not_the_end_of_the_job(corpus, tmp_path, monkeypatch, caplog):
    """A folder input holding a path longer than PATH_MAX (4096 bytes): Path.rglob raised ENAMETOOLONG and the
    job stopped before its first video. The folder it cannot list is logged with the reason and left out."""
    import os
    import shutil

    _, good, _ = corpus
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good["a"].path, folder / "a.mp4")
    monkeypatch.chdir(folder)
    for _ in range(18):  # 18 x 250 bytes: past PATH_MAX, made one relative step at a time
        os.mkdir("d" * 249)
        os.chdir("d" * 249)
    with open("deep.mp4", "wb") as f:
        f.write(b"not read")
    monkeypatch.chdir(tmp_path)
    summary = extract_videos(str(folder), tmp_path / "s", seconds=1.0)
    assert (summary["done"], summary["failed"]) == (1, 0)
    told = [r.getMessage() for r in caplog.records if "cannot list the folder" in r.getMessage()]
    assert len(told) == 1 and "File name too long" in told[0] and str(folder) in told[0], told
