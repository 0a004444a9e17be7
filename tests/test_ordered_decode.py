"""Several videos decoded at once (video/ordered.py): the consumer sees the sequential order exactly."""
import random
import threading
import time

import numpy as np
import pytest

from lvmae_fast.video.ordered import default_decode_workers, ordered_parallel


def sequential(items, produce):
    """The reference: one generator after the other."""
    out = []
    for item in items:
        out.extend(produce(item))
    return out


def jittery(item):
    """item k yields k*10, k*10+1, ... (k % 5 values), sleeping a random bit between them, so the
    workers finish out of order."""
    rng = random.Random(item)
    for j in range(item % 5):
        time.sleep(rng.random() * 0.004)
        yield item * 10 + j


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("depth", [1, 3])
def test_items_come_out_in_input_order_whatever_the_timing(workers, depth):
    items = list(range(40))
    assert list(ordered_parallel(iter(items), jittery, workers=workers, depth=depth)) == sequential(items, jittery)


def test_empty_input_and_items_that_yield_nothing():
    assert list(ordered_parallel([], jittery, workers=3)) == []
    assert list(ordered_parallel([0, 5, 10], jittery, workers=2)) == []  # k % 5 == 0: nothing each


def test_the_workers_really_run_side_by_side():
    # Each generator waits until all of them are running at once: one worker at a time never gets
    # past the barrier (BrokenBarrierError after the timeout), which the second case shows.
    def meeting(parties, timeout):
        barrier = threading.Barrier(parties, timeout=timeout)

        def meet(item):
            barrier.wait()
            yield item
        return meet

    assert list(ordered_parallel(range(3), meeting(3, 10), workers=3)) == [0, 1, 2]
    with pytest.raises(threading.BrokenBarrierError):
        list(ordered_parallel(range(2), meeting(2, 0.5), workers=1))


def test_an_error_is_raised_at_its_place_in_the_order():
    def fails_at_7(item):
        yield from jittery(item)
        if item == 7:
            raise RuntimeError("bad video 7")

    got = []
    with pytest.raises(RuntimeError, match="bad video 7"):
        for x in ordered_parallel(range(20), fails_at_7, workers=4, depth=2):
            got.append(x)
    assert got == sequential(range(8), jittery)  # everything of items 0..7, nothing after


def test_an_error_from_the_input_iterator_is_raised_after_the_items_before_it():
    def items():
        yield from range(6)
        raise OSError("listing failed")

    got = []
    with pytest.raises(OSError, match="listing failed"):
        for x in ordered_parallel(items(), jittery, workers=3):
            got.append(x)
    assert got == sequential(range(6), jittery)


def test_closing_early_stops_every_worker_and_closes_their_generators():
    closed, started = [], []
    lock = threading.Lock()

    def endless(item):
        with lock:
            started.append(item)
        try:
            while True:
                yield item
        finally:
            with lock:
                closed.append(item)

    source_closed = threading.Event()

    def items():
        try:
            yield from range(100)
        finally:
            source_closed.set()

    events = ordered_parallel(items(), endless, workers=3, depth=2)
    assert [next(events) for _ in range(5)] == [0] * 5
    events.close()
    assert sorted(closed) == sorted(started)  # every generator started was closed (open files released)
    assert source_closed.is_set()  # and the input (extract's probing thread stops with it)
    assert 1 <= len(started) <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("lvmae-decode-")]


def test_memory_is_bounded_per_video_in_flight():
    produced = {}
    lock = threading.Lock()

    def counted(item):
        for j in range(50):
            with lock:
                produced[item] = j + 1
            yield item

    events = ordered_parallel(range(4), counted, workers=4, depth=3)
    assert next(events) == 0
    time.sleep(0.3)  # let the workers run as far as their queues allow
    with lock:
        ahead = dict(produced)
    # item 0: 1 consumed + 3 queued + 1 held by its blocked put; the others: 3 queued + 1 held
    assert ahead[0] <= 5 and all(ahead[k] <= 4 for k in range(1, 4)), ahead
    assert list(events) == [0] * 49 + [1] * 50 + [2] * 50 + [3] * 50


def test_bad_arguments_and_the_default_worker_count():
    with pytest.raises(ValueError, match="workers"):
        list(ordered_parallel([1], jittery, workers=0))
    with pytest.raises(ValueError, match="depth"):
        list(ordered_parallel([1], jittery, depth=0))
    assert [default_decode_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 2, 4, 8, 8, 8]


# ------------------------------------------------------------------------------- through lvmae extract
@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    pytest.importorskip("av")
    from lvmae_fast import synth

    d = tmp_path_factory.mktemp("mixed")
    for k in range(5):
        synth.write_video(d / f"v{k}.mp4", duration=2.0 + k * 0.7, fps=10, codec="h264", seed=k)
    synth.write_video(d / "w.webm", duration=3.0, fps=8, codec="vp9", vfr=True, seed=9)
    synth.write_failure_corpus(d / "bad")
    return d


def test_any_number_of_decode_workers_writes_the_same_store_and_failures(mixed_corpus, tmp_path):
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store

    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        # batch 4 does not divide the videos' window counts: batches span videos, as they do for real
        summary = extract_videos(mixed_corpus, out, encoder="tiny", seconds=1.0, batch_size=4, decoder="pyav",
                                 decode_workers=workers)
        assert summary["decode_workers"] == workers
        runs[workers] = (summary, Store(out), (out / "failures.jsonl").read_text())
    (s1, store1, fail1), (s3, store3, fail3) = runs[1], runs[3]
    assert (s1["done"], s1["failed"]) == (s3["done"], s3["failed"]) == (6, 8)
    assert store1.video_ids == store3.video_ids  # same order, not only the same set
    for vid in store1.video_ids:
        np.testing.assert_array_equal(store1.get(vid), store3.get(vid))  # same batches: bit-equal
        np.testing.assert_array_equal(store1.window_times(vid), store3.window_times(vid))
    assert fail1 == fail3 and fail1.count("\n") == 8


def test_decode_workers_flag(mixed_corpus, tmp_path, capsys):
    from lvmae_fast.cli import main

    assert main(["extract", str(mixed_corpus / "v0.mp4"), "--encoder", "tiny", "--out", str(tmp_path / "s"),
                 "--seconds", "1", "--no-progress", "--decode-workers", "2"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert main(["extract", str(mixed_corpus / "v0.mp4"), "--encoder", "tiny", "--out", str(tmp_path / "t"),
                 "--decode-workers", "-1"]) == 1
    assert "--decode-workers must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything is written


# ------------------------------------------------------------------------ long videos cut into parts
def distinct_frames_video(path, frames=300):
    pytest.importorskip("av")
    from lvmae_fast import synth

    return synth.write_distinct_frames(path, frames=frames)


@pytest.mark.parametrize("part_windows", [1, 3, 5])
def test_parts_of_a_long_video_decode_the_frames_of_one_pass(tmp_path, part_windows):
    from lvmae_fast.extract import DecodePart, decode_part, pyav_parts
    from lvmae_fast.video.decode_pyav import decode_windows_pyav
    from lvmae_fast.video.jobs import VideoJob, Window, WindowSpec

    video = distinct_frames_video(tmp_path / "long.mp4")
    spec = WindowSpec(seconds=1.0, frames=6)
    parts = list(pyav_parts([VideoJob("long", str(video))], spec, part_windows=part_windows))
    job = parts[0].job
    one_pass = {w: (f, t) for w, f, t in decode_windows_pyav(job.index, job.plan)}
    assert len(one_pass) == len(job.plan) == 12
    assert [list(p.windows) for p in parts] == [list(range(k, min(k + part_windows, 12)))
                                                for k in range(0, 12, part_windows)]
    assert all(isinstance(p, DecodePart) and p.job is job and p.damage is parts[0].damage for p in parts)
    got = [e for p in parts for e in decode_part(p)]
    assert all(isinstance(e, Window) for e in got)
    assert [e.window for e in got] == list(range(12))
    for e in got:
        np.testing.assert_array_equal(e.frames, one_pass[e.window][0], err_msg=f"window {e.window}")
        np.testing.assert_array_equal(e.times, one_pass[e.window][1])


def test_only_videos_longer_than_a_part_in_containers_that_seek_by_index_are_cut(tmp_path):
    from lvmae_fast.extract import pyav_parts
    from lvmae_fast.video.jobs import VideoJob, WindowSpec

    spec = WindowSpec(seconds=1.0, frames=4)
    mp4 = distinct_frames_video(tmp_path / "v.mp4", frames=100)   # 4 windows
    ts = distinct_frames_video(tmp_path / "v.ts", frames=300)     # 12 windows, but mpeg-ts seeks by bytes
    parts = list(pyav_parts([VideoJob("mp4", str(mp4)), VideoJob("ts", str(ts)),
                             VideoJob("gone", str(tmp_path / "missing.mp4"))], spec, part_windows=4))
    assert [(p.job.video_id, p.windows) for p in parts[:2]] == [("mp4", None), ("ts", None)]
    assert parts[2].reason == "file not found"


def test_parts_share_one_damage_budget(tmp_path, monkeypatch):
    """Frames the decoder never produces, 2 in each of 3 parts: each part alone is within the budget
    (3 of 72 sampled frames), the video is not, and shared parts refuse it as one pass does."""
    from lvmae_fast.extract import DecodePart, decode_part
    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import Failed, VideoJob, Window, WindowSpec, prepare_job
    from lvmae_fast.video.probe import VideoError

    video = distinct_frames_video(tmp_path / "long.mp4")
    job = prepare_job(VideoJob("d", str(video)), WindowSpec(seconds=1.0, frames=6))
    assert decode_pyav._missing_budget(len(np.unique(job.plan.frames))) == 3
    lost = {int(job.index.pts[job.plan.frames[w][k]]) for w in (1, 5, 9) for k in (2, 4)}
    real_frames = decode_pyav._frames
    monkeypatch.setattr(decode_pyav, "_frames", lambda *a: (f for f in real_frames(*a) if f.pts not in lost))

    with pytest.raises(VideoError, match=r"more than 3 of the 72 sampled frames could not be decoded \(number 4 at"):
        list(decode_pyav.decode_windows_pyav(job.index, job.plan))  # one pass
    windows = [np.arange(k, k + 4) for k in (0, 4, 8)]
    for part in windows:  # each part on its own budget: accepted, with its 2 stand-ins
        alone = DecodePart(job, part, decode_pyav.SharedDamage())
        assert [e.window for e in decode_part(alone) if isinstance(e, Window)] == list(part)
    shared = decode_pyav.SharedDamage()
    events = [e for part in windows for e in decode_part(DecodePart(job, part, shared))]
    [failed] = [e for e in events if isinstance(e, Failed)]
    assert failed.reason == "damaged video data: more than 3 of the 72 sampled frames could not be decoded"
    assert shared.failed
    # the 4th lost frame (window 5, 2nd part) refuses the video; the 3rd part then decodes nothing
    assert [e.window for e in events if isinstance(e, Window)] == list(range(5))
    # a part whose video another part already refused decodes nothing
    assert list(decode_part(DecodePart(job, windows[0], shared))) == []


def test_a_long_video_cut_into_parts_stores_what_one_pass_stores(tmp_path, monkeypatch):
    from lvmae_fast import extract
    from lvmae_fast.store import Store

    video = distinct_frames_video(tmp_path / "long.mp4", frames=500)   # 20 one-second windows
    stores = {}
    for name, workers, cut in (("one pass", 1, False), ("parts, 1 worker", 1, True), ("parts, 3 workers", 3, True)):
        real = extract.pyav_parts
        with monkeypatch.context() as m:
            if not cut:
                m.setattr(extract, "pyav_parts", lambda jobs, spec, partials=None, part_windows=0:
                          real(jobs, spec, partials, part_windows=10**9))
            summary = extract.extract_videos(str(video), tmp_path / name, seconds=1.0, batch_size=8,
                                             decoder="pyav", decode_workers=workers)
        assert (summary["done"], summary["windows"]) == (1, 20)
        stores[name] = Store(tmp_path / name)
    for name in ("parts, 1 worker", "parts, 3 workers"):
        np.testing.assert_array_equal(stores[name].get("long"), stores["one pass"].get("long"), err_msg=name)
        np.testing.assert_array_equal(stores[name].window_times("long"), stores["one pass"].window_times("long"))
