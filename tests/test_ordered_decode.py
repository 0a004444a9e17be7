"""Several videos decoded at once (video/ordered.py): the consumer sees the sequential order exactly."""
import random
import sys
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


def test_closing_while_the_input_is_slow_starts_nothing_more_and_closes_the_input():
    """The next input item is slow to come (extract probes the next video: a demux of the whole file). A
    worker waits inside the input for it, the other for its turn. Closing must not leave them to start
    work afterwards (they used to: the waiting worker took the item once it came and started its decode,
    the other then took the next one too) and the input must still be closed (it was not: the worker
    inside it held the lock). It also returned only after a 2 s join per worker waiting for its turn."""
    inside, release, source_closed = threading.Event(), threading.Event(), threading.Event()
    started = []

    def items():
        try:
            yield 0
            inside.set()
            release.wait(10)  # probing a big file
            yield from range(1, 10)
        finally:
            source_closed.set()

    def produce(item):
        started.append(item)
        yield item

    events = ordered_parallel(items(), produce, workers=2, depth=1)
    assert next(events) == 0
    assert inside.wait(10)
    events.close()
    release.set()
    for t in [t for t in threading.enumerate() if t.name.startswith("lvmae-decode-")]:
        t.join(10)
    assert started == [0]
    assert source_closed.is_set()
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
    assert [default_decode_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 2, 4, 8, 16, 16]


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
    for readers in ("0", "-1"):  # zero DALI pipelines: refused before DALI's absence is even looked at
        assert main(["extract", str(mixed_corpus / "v0.mp4"), "--encoder", "tiny", "--out", str(tmp_path / "t"),
                     "--decoder", "dali", "--readers", readers]) == 1
        assert f"--readers (DALI pipelines) must be >= 1, got {readers}" in capsys.readouterr().err
        assert not (tmp_path / "t").exists()


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
    # 12 windows in near-equal parts of at most part_windows (5: 4, 4, 4, not 5, 5 and a 2-window leftover)
    sizes = {1: [1] * 12, 3: [3] * 4, 5: [4] * 3}[part_windows]
    assert [list(p.windows) for p in parts] == [list(range(sum(sizes[:i]), sum(sizes[:i + 1]))) for i in range(len(sizes))]
    assert all(isinstance(p, DecodePart) and p.job is job and p.damage is parts[0].damage for p in parts)
    got = [e for p in parts for e in decode_part(p)]
    assert all(isinstance(e, Window) for e in got)
    assert [e.window for e in got] == list(range(12))
    for e in got:
        np.testing.assert_array_equal(e.frames, one_pass[e.window][0], err_msg=f"window {e.window}")
        np.testing.assert_array_equal(e.times, one_pass[e.window][1])


def test_tail_part_windows_hand_values():
    """Windows per part near the end of the input: 32 equal 6-window videos (30 s, 2 s GOPs at 30 fps)
    on 24 decodes; and the floors (2 windows, 4 keyframe intervals)."""
    from types import SimpleNamespace

    from lvmae_fast.extract import tail_part_windows

    def index(frames, gop):
        return SimpleNamespace(num_frames=frames, keyframe=np.arange(frames) % gop == 0)

    camera = index(900, 60)                                      # 150 frames a window, 60-frame GOPs
    assert tail_part_windows(camera, 6, 6, 32, 24, 32) == 32     # plenty of videos left: the usual parts
    assert tail_part_windows(camera, 6, 6, 24, 24, 32) == 32
    assert tail_part_windows(camera, 6, 6, 23, 24, 32) == 3      # 2 parts (24 / 23 rounded up) of 3
    assert tail_part_windows(camera, 6, 6, 8, 24, 32) == 2       # 3 parts of 2
    assert tail_part_windows(camera, 6, 6, 1, 24, 32) == 2       # 24 parts wanted; 2 windows is the floor
    long_camera = index(15000, 60)                               # 100 windows of the same video
    assert tail_part_windows(long_camera, 100, 100, 1, 4, 32) == 25  # a long last video: 4 parts
    assert tail_part_windows(long_camera, 100, 100, 1, 2, 32) == 32  # never longer than part_windows
    assert tail_part_windows(long_camera, 100, 12, 1, 4, 32) == 3    # resumed, 12 windows left: 4 parts of 3
    web = index(750, 250)                                        # 10 s GOPs, 125 frames a window
    assert tail_part_windows(web, 6, 6, 1, 24, 32) == 8          # 4 GOPs = 8 windows: a 6-window video stays whole
    assert tail_part_windows(camera, 6, 1, 1, 24, 32) == 32      # one window left: nothing to cut
    assert tail_part_windows(camera, 6, 6, 1, 1, 32) == 32       # one decode: no tail to fill


def test_the_last_videos_are_cut_to_keep_every_decode_busy(tmp_path):
    """3 videos of 20 one-second windows (1.2 s GOPs: parts of >= 5 windows) on 8 decodes: the first
    (3 left) in 3 parts of 7, the second (2 left) in 4 of 5, the last (1 left) in 4 of 5 (the GOP floor);
    with one decode, none is cut (part_windows 32)."""
    from lvmae_fast.extract import pyav_parts
    from lvmae_fast.video.jobs import VideoJob, WindowSpec

    spec = WindowSpec(seconds=1.0, frames=4)
    videos = [distinct_frames_video(tmp_path / f"v{k}.mp4", frames=500) for k in range(3)]
    jobs = [VideoJob(f"v{k}", str(v)) for k, v in enumerate(videos)]
    parts = list(pyav_parts(jobs, spec, part_windows=32, decodes_at_once=8))
    sizes = {}
    for p in parts:
        sizes.setdefault(p.job.video_id, []).append(len(p.windows))
    assert sizes == {"v0": [7, 7, 6], "v1": [5, 5, 5, 5], "v2": [5, 5, 5, 5]}
    # 21 and 22 windows in parts of 5 (the floor): the leftover window(s) were parts of their own (1, 2)
    for frames, want in ((525, [6, 5, 5, 5]), (550, [6, 6, 5, 5])):
        last = distinct_frames_video(tmp_path / f"last{frames}.mp4", frames=frames)
        got = [len(p.windows) for p in pyav_parts([VideoJob("x", str(last))], spec, part_windows=32, decodes_at_once=24)]
        assert got == want, frames
    # The floor (8 windows: 4 GOPs of 2 s) never makes a tail part longer than part_windows (12 windows, 9 a
    # part: one part of 12 left a decode idle).
    from lvmae_fast import synth

    long_gops = synth.write_distinct_frames(tmp_path / "g.mp4", frames=300, fps=25, keyint=50)
    got = [(p.job.video_id, len(p.windows)) for p in pyav_parts(
        [VideoJob("first", str(long_gops)), VideoJob("last", str(long_gops))], spec, part_windows=9, decodes_at_once=2)]
    assert got == [("first", 6), ("first", 6), ("last", 6), ("last", 6)]
    assert [p.windows is None for p in pyav_parts(jobs, spec, part_windows=32, decodes_at_once=1)] == [True] * 3


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


def test_parts_of_a_damaged_video_deliver_what_one_pass_delivers(tmp_path, monkeypatch):
    """Frames the decoder never produces, 2 in each of 3 parts: each part alone would be within the
    budget (3 of 72 sampled frames), the video is not: one pass refuses it at the 4th (window 5), after
    windows 0-4. The parts deliver exactly that: the first one to meet damage hands the rest of the
    video to one decode (one pass's stand-ins, budget and reason), and the parts after it stop."""
    from lvmae_fast.extract import DecodePart, decode_part
    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import Failed, VideoJob, Window, WindowSpec, prepare_job
    from lvmae_fast.video.probe import VideoError

    video = distinct_frames_video(tmp_path / "long.mp4")
    job = prepare_job(VideoJob("d", str(video)), WindowSpec(seconds=1.0, frames=6))
    assert decode_pyav._missing_budget(len(np.unique(job.plan.frames))) == 3
    lost = {int(job.index.pts[job.plan.frames[w][k]]) for w in (1, 5, 9) for k in (2, 4)}
    real_frames = decode_pyav._frames
    monkeypatch.setattr(decode_pyav, "_frames", lambda *a, **kw: (f for f in real_frames(*a, **kw) if f.pts not in lost))

    one_pass = []
    with pytest.raises(VideoError, match=r"more than 3 of the 72 sampled frames could not be decoded \(number 4 at") as err:
        for w, frames, times in decode_pyav.decode_windows_pyav(job.index, job.plan):
            one_pass.append((w, frames, times))
    assert [w for w, _, _ in one_pass] == [0, 1, 2, 3, 4]
    windows = [np.arange(k, k + 4) for k in (0, 4, 8)]
    shared = decode_pyav.SharedDamage()
    events = [e for part in windows for e in decode_part(DecodePart(job, part, shared))]
    assert [e.window for e in events if isinstance(e, Window)] == [0, 1, 2, 3, 4]
    for e, (w, frames, times) in zip(events, one_pass):
        np.testing.assert_array_equal(e.frames, frames, err_msg=f"window {w}")
        np.testing.assert_array_equal(e.times, times)
    assert isinstance(events[-1], Failed) and events[-1].reason == str(err.value)
    assert shared.redone_by == 0  # window 0 came from the first part, 1.. from its decode of the rest
    # the parts after it stop (what they delivered before is dropped by extract's loop)
    assert list(decode_part(DecodePart(job, windows[2], shared))) == []
    assert shared.superseded(4) and not shared.superseded(0)


def test_a_long_video_cut_into_parts_stores_what_one_pass_stores(tmp_path, monkeypatch):
    from lvmae_fast import extract
    from lvmae_fast.store import Store

    video = distinct_frames_video(tmp_path / "long.mp4", frames=500)   # 20 one-second windows
    stores = {}
    for name, workers, cut in (("one pass", 1, False), ("parts, 1 worker", 1, True), ("parts, 3 workers", 3, True)):
        real = extract.pyav_parts
        with monkeypatch.context() as m:
            if not cut:
                m.setattr(extract, "pyav_parts", lambda jobs, spec, partials=None, part_windows=0, decodes_at_once=1:
                          real(jobs, spec, partials, part_windows=10**9))
            summary = extract.extract_videos(str(video), tmp_path / name, seconds=1.0, batch_size=8,
                                             decoder="pyav", decode_workers=workers)
        assert (summary["done"], summary["windows"]) == (1, 20)
        stores[name] = Store(tmp_path / name)
    for name in ("parts, 1 worker", "parts, 3 workers"):
        np.testing.assert_array_equal(stores[name].get("long"), stores["one pass"].get("long"), err_msg=name)
        np.testing.assert_array_equal(stores[name].window_times("long"), stores["one pass"].window_times("long"))


# ------------------------------------------------------------------ damaged videos: as one pass, any workers
def damaged_copy(src, dst, near: float, keyframe: bool):
    """`src` with the middle half of one packet overwritten by random bytes: the video packet nearest
    `near` seconds that is (or is not) a keyframe; returns dst. The index (mp4 moov) stays intact."""
    import av

    with av.open(str(src)) as c:
        stream = c.streams.video[0]
        packets = [(float(p.pts * stream.time_base), p.pos, p.size) for p in c.demux(stream)
                   if p.size and p.is_keyframe == keyframe]
    _, pos, size = min(packets, key=lambda p: abs(p[0] - near))
    a, b = pos + size // 4, pos + size * 3 // 4
    data = bytearray(src.read_bytes())
    data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


def one_pass_and_parts(monkeypatch, tmp_path, inputs, **options):
    """extract_videos with each video decoded in one pass (parts longer than any video), and as parts with
    1 and 3 workers: {name: (summary, Store, failures.jsonl text)}."""
    from lvmae_fast import extract
    from lvmae_fast.store import Store

    runs = {}
    real = extract.pyav_parts
    for name, workers, cut in (("one pass", 1, False), ("parts, 1 worker", 1, True), ("parts, 3 workers", 3, True)):
        with monkeypatch.context() as m:
            if not cut:
                m.setattr(extract, "pyav_parts", lambda jobs, spec, partials=None, part_windows=0, decodes_at_once=1:
                          real(jobs, spec, partials, part_windows=10**9))
            out = tmp_path / name
            summary = extract.extract_videos(inputs, out, decoder="pyav", decode_workers=workers, **options)
        runs[name] = (summary, Store(out) if (out / "index.json").exists() else None,
                      (out / "failures.jsonl").read_text())
    return runs


def assert_same_runs(runs):
    (s0, store0, fail0), *_ = runs.values()
    for name, (s, store, fail) in list(runs.items())[1:]:
        assert (s["done"], s["failed"], s["windows"]) == (s0["done"], s0["failed"], s0["windows"]), name
        assert fail == fail0, name
        assert (store is None) == (store0 is None), name
        if store0 is not None:
            assert store.video_ids == store0.video_ids, name
            for vid in store0.video_ids:
                np.testing.assert_array_equal(store.get(vid), store0.get(vid), err_msg=f"{name}: {vid}")
                np.testing.assert_array_equal(store.window_times(vid), store0.window_times(vid))


def test_a_decoder_error_midway_gives_the_store_of_one_pass(tmp_path, monkeypatch):
    """A damaged packet just before the keyframe where the second part starts makes FFmpeg raise there. The
    parts after it once decoded the rest as if nothing had happened (a few stand-ins in the first part,
    within budget: stored) while one pass stopped there (refused). One pass now goes on after the refused
    packet (since 2026-11-27c), and the parts hand the video to it: both store the same windows."""
    pytest.importorskip("av")
    from lvmae_fast import synth

    src = synth.write_video(tmp_path / "src.mp4", duration=24.0, fps=10, codec="h264", gop=12, seed=2).path
    video = damaged_copy(src, tmp_path / "v" / "broken.mp4", near=7.1, keyframe=False)
    synth.write_video(tmp_path / "v" / "next.mp4", duration=3.0, fps=10, codec="h264", seed=1)
    runs = one_pass_and_parts(monkeypatch, tmp_path, [("broken", str(video)), ("next", str(tmp_path / "v" / "next.mp4"))],
                              seconds=1.0, batch_size=3)
    summary, _, failures = runs["one pass"]
    assert (summary["done"], summary["failed"]) == (2, 0), failures
    assert_same_runs(runs)


def test_parts_that_start_after_a_redo_stored_their_video_stop(tmp_path):
    """A damaged first part decodes the rest of the video; when its last window filled an encoder batch the
    video was stored (and its frame index released) before the later parts had started, and the next one
    to start read the released index: AttributeError, the whole job stopped. Later parts now see the video
    is stored and stop; the video after it is extracted too."""
    pytest.importorskip("av")
    from lvmae_fast import synth
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store

    src = synth.write_video(tmp_path / "src.mp4", duration=64.0, fps=10, codec="h264", gop=12, seed=2).path
    video = damaged_copy(src, tmp_path / "v" / "broken.mp4", near=3.1, keyframe=False)
    synth.write_video(tmp_path / "v" / "next.mp4", duration=3.0, fps=10, codec="h264", seed=1)
    summary = extract_videos([("broken", str(video)), ("next", str(tmp_path / "v" / "next.mp4"))], tmp_path / "s",
                             seconds=1.0, batch_size=8, decode_workers=2)   # 64 windows: 8 parts, 8 batches
    assert (summary["done"], summary["failed"]) == (2, 0)
    assert Store(tmp_path / "s").num_segments("broken") == 64


def test_a_damaged_keyframe_where_a_part_starts_gives_the_frames_of_one_pass(tmp_path, monkeypatch):
    """FFmpeg conceals a damaged keyframe from the frames before it, which a part that starts there (a seek)
    does not have: its frames then differ from one pass. The seek is not used when its first frame is
    corrupt (the decode starts at the beginning of the file instead)."""
    pytest.importorskip("av")
    from lvmae_fast import synth

    src = synth.write_video(tmp_path / "src.mp4", duration=24.0, fps=10, codec="h264", gop=12, seed=2).path
    video = damaged_copy(src, tmp_path / "concealed.mp4", near=7.2, keyframe=True)  # the 2nd part seeks to it
    runs = one_pass_and_parts(monkeypatch, tmp_path, str(video), seconds=1.0, batch_size=8)
    assert runs["one pass"][0]["done"] == 1
    assert_same_runs(runs)


def test_frame_threads_per_decode_do_not_depend_on_the_number_of_workers(tmp_path, monkeypatch):
    """FFmpeg conceals damaged data differently with another number of frame threads: a decode's threads
    must not follow --decode-workers, or the store of a damaged (but accepted) video depends on it."""
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store
    from lvmae_fast.video import decode_pyav

    video = damaged_copy(distinct_frames_video(tmp_path / "src.mp4", frames=200), tmp_path / "d.mp4",
                         near=0.84, keyframe=False)
    real, threads_used = decode_pyav.decode_windows_pyav, {}

    def recording(*a, threads=0, **kw):
        threads_used.setdefault(workers, set()).add(threads)
        return real(*a, threads=threads, **kw)

    monkeypatch.setattr(decode_pyav, "decode_windows_pyav", recording)
    stores = {}
    for workers in (1, 2, 3):
        s = extract_videos(str(video), tmp_path / f"w{workers}", seconds=1.0, frames=25, batch_size=8,
                           decoder="pyav", decode_workers=workers)
        assert s["done"] == 1
        stores[workers] = Store(tmp_path / f"w{workers}").get("d")
    for workers in (2, 3):
        np.testing.assert_array_equal(stores[workers], stores[1], err_msg=f"{workers} workers")
    assert len(set().union(*threads_used.values())) == 1 and set(threads_used) == {1, 2, 3}, threads_used


def test_which_part_meets_the_damage_first_changes_nothing(tmp_path, monkeypatch):
    """Frames lost in the last part of a long video only. With 3 workers that part may be decoded before
    the others: the windows that reach the encoder (hence the batches of the next video, and its bits)
    and failures.jsonl must be those of 1 worker. Forced here: parts 1 and 2 wait until part 3's decode
    has ended (it used to refuse the video alone, and parts 1 and 2 then delivered nothing: 6 windows
    reached the encoder instead of 22)."""
    from lvmae_fast import extract
    from lvmae_fast.store import Store
    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    long = distinct_frames_video(tmp_path / "long.mp4", frames=500)    # 20 one-second windows: parts of 8
    short = distinct_frames_video(tmp_path / "short.mp4", frames=100)
    spec = WindowSpec(seconds=1.0, frames=6)
    job = prepare_job(VideoJob("long", str(long)), spec)
    assert decode_pyav._missing_budget(len(np.unique(job.plan.frames))) == 6
    lost = {int(p) for p in job.index.pts[job.plan.frames[[17, 18]]].ravel()}  # 12 frames
    third = int(job.index.pts[job.plan.frames[12][0]])   # parts 1 and 2 seek before it, part 3 after
    real_frames = decode_pyav._frames
    part3_ended = threading.Event()

    def frames(index, threads, seek_to, keep=None, hold=False, **kw):
        if index.path != str(long):
            yield from real_frames(index, threads, seek_to, keep, **kw)
            return
        late = seek_to is not None and seek_to >= third
        if hold and not late:
            part3_ended.wait(10)
        try:
            yield from (f for f in real_frames(index, threads, seek_to, keep, **kw) if f.pts not in lost)
        finally:
            if late:
                part3_ended.set()

    runs = {}
    for workers in (1, 3):
        part3_ended.clear()
        with monkeypatch.context() as m:
            m.setattr(decode_pyav, "_frames", lambda *a, hold=workers > 1, **kw: frames(*a, hold=hold, **kw))
            out = tmp_path / f"w{workers}"
            summary = extract.extract_videos([("long", str(long)), ("short", str(short))], out, seconds=1.0,
                                             frames=6, batch_size=3, decoder="pyav", decode_workers=workers)
        runs[workers] = (summary, Store(out), (out / "failures.jsonl").read_text())
    (s1, store1, fail1), (s3, store3, fail3) = runs[1], runs[3]
    assert (s1["done"], s1["failed"]) == (1, 1)
    assert "damaged video data: more than 6 of the 120 sampled frames" in fail1
    assert s3["windows"] == s1["windows"]
    assert fail3 == fail1
    np.testing.assert_array_equal(store3.get("short"), store1.get("short"))


@pytest.mark.parametrize("gop_tails", [False, True])
def test_a_decoder_error_between_two_parts_ends_the_video_as_in_one_pass(tmp_path, monkeypatch, gop_tails):
    """FFmpeg raises at a frame no window samples, after the first part's last frame and before the
    second part's first sampled frame (a damaged packet there): one pass decodes it and stands in every
    frame after it (refused). The parts once skipped it and stored the video; a part now decodes on to
    the next part's first sampled frame. (Seen with real damage: a mkv whose damaged cluster demuxed to a
    packet FFmpeg refused between two parts.) With and without GOP-tail skipping (keyframes that are
    not clean, e.g. open GOPs, have no tails skipped)."""
    av = pytest.importorskip("av")
    from lvmae_fast import synth
    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    monkeypatch.setattr(decode_pyav, "SKIP_GOP_TAILS", gop_tails)
    video = synth.write_distinct_frames(tmp_path / "long.mp4", frames=500, keyint=25)  # keyframes 0, 25, 50...
    job = prepare_job(VideoJob("long", str(video)), WindowSpec(seconds=1.0, frames=6))
    # parts of 8 windows: window 7 (the first part's last) samples up to frame 197, window 8 from frame 202,
    # and the second part starts at the keyframe at frame 200: frames 198 and 199 are sampled by neither
    assert job.plan.frames[7].max() == 197 and job.plan.frames[8].min() == 202 and job.index.keyframe[200]
    # Frame 199 (a P-frame that B-frame 197 predicts from, so it is no GOP tail; 198 is a B-frame nothing
    # refers to, which is not decoded at all) fails.
    bad = int(job.index.pts[199])
    needed = {int(p) for p in job.index.pts[np.unique(job.plan.frames)]}
    assert bad in {f.pts for f in decode_pyav._frames(job.index, 0, None, needed)}
    real_frames = decode_pyav._frames

    def frames(*a, **kw):
        for f in real_frames(*a, **kw):
            if f.pts == bad:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            yield f

    monkeypatch.setattr(decode_pyav, "_frames", frames)
    runs = one_pass_and_parts(monkeypatch, tmp_path, str(video), seconds=1.0, frames=6, batch_size=8)
    summary, _, failures = runs["one pass"]
    assert (summary["done"], summary["failed"]) == (0, 1)
    assert "damaged video data: more than 6 of the 120 sampled frames could not be decoded (number 7 at" in failures
    assert_same_runs(runs)


# --------------------------------------------------------------------- --decoder hybrid (video/hybrid.py)
def test_decoder_share_fills_the_nvdec_slots_first_and_keeps_each_video_on_one_decoder():
    from lvmae_fast.video.hybrid import DecoderShare

    share = DecoderShare(nvdec_slots=2)
    a, b, c, d = (object() for _ in range(4))
    assert [share.start(v) for v in (a, b, c)] == ["nvdec", "nvdec", "pyav"]   # third: both slots taken
    assert share.start(a) == "nvdec"            # a's next part: a stays on NVDEC, over the slot count
    assert share.running() == {"nvdec": 3, "pyav": 1}
    share.finish(a)
    share.finish(a)
    assert share.start(c) == "pyav"             # a freed a slot, but c's parts stay on the CPU
    assert share.start(d) == "nvdec"            # a new video takes the free slot
    assert share.running() == {"nvdec": 2, "pyav": 2}
    with pytest.raises(ValueError, match="nvdec_slots must be >= 1"):
        DecoderShare(0)


def fake_nvdec(monkeypatch, seconds=0.3):
    """decode_pyav.nvdec_accel replaced by software decoding that is slow to open (so the other workers
    start their decodes meanwhile) and counts its decodes; resolve_decoder accepting hybrid on a CPU."""
    from lvmae_fast import extract
    from lvmae_fast.video import decode_pyav

    opened = []

    def accel(index=0):
        opened.append(index)
        time.sleep(seconds)
        return None   # av.open(..., hwaccel=None): FFmpeg's software decoder
    monkeypatch.setattr(decode_pyav, "nvdec_accel", accel)
    real = extract.resolve_decoder
    monkeypatch.setattr(extract, "resolve_decoder", lambda decoder, device: "hybrid" if decoder == "hybrid"
                        else real(decoder, device))
    return opened


def test_hybrid_decoding_splits_the_videos_and_writes_the_store_one_decoder_writes(mixed_corpus, tmp_path,
                                                                                   monkeypatch):
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store

    opened = fake_nvdec(monkeypatch)
    runs = {}
    for decoder in ("pyav", "hybrid"):
        out = tmp_path / decoder
        runs[decoder] = (extract_videos(mixed_corpus, out, encoder="tiny", seconds=1.0, batch_size=4,
                                        decoder=decoder, decode_workers=2, nvdec_workers=1),
                         Store(out), (out / "failures.jsonl").read_text())
    (s_cpu, store_cpu, fail_cpu), (s_mix, store_mix, fail_mix) = runs["pyav"], runs["hybrid"]
    assert (s_mix["done"], s_mix["failed"]) == (s_cpu["done"], s_cpu["failed"]) == (6, 8)
    assert (s_mix["decode_workers"], s_mix["nvdec_workers"], s_cpu["nvdec_workers"]) == (2, 1, None)
    # every stored video counted once, under the decoder it went to
    assert set(s_mix["decoded_by"]) <= {"nvdec", "pyav"} and sum(s_mix["decoded_by"].values()) == 6
    assert store_mix.video_ids == store_cpu.video_ids
    for vid in store_cpu.video_ids:   # the fake NVDEC decodes in software: bit-equal
        np.testing.assert_array_equal(store_mix.get(vid), store_cpu.get(vid))
    assert fail_mix == fail_cpu
    # The good videos alone: the first takes the free NVDEC slot, the next ones start while it opens
    # (0.3 s) and go to the CPU; each NVDEC decode opened through nvdec_accel.
    opened.clear()
    good = sorted(mixed_corpus.glob("v*.mp4"))
    split = extract_videos(good, tmp_path / "good", encoder="tiny", seconds=1.0, batch_size=4, decoder="hybrid",
                           decode_workers=2, nvdec_workers=1)["decoded_by"]
    assert split["nvdec"] >= 1 and split["pyav"] >= 1 and sum(split.values()) == 5, split
    assert len(opened) == split["nvdec"]   # short videos: one decode each


def test_hybrid_decodes_every_part_of_a_long_video_on_the_decoder_its_first_part_got(tmp_path, monkeypatch):
    """20 windows, the only video, on 4 decodes at once (3 CPU + 1 NVDEC): cut into 4 parts of 5
    (tail_part_windows). The first part takes the one NVDEC slot; the three after it, started while it
    runs (the slot full), must still go to NVDEC, not to the idle CPU workers."""
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store

    video = distinct_frames_video(tmp_path / "long.mp4", frames=500)
    opened = fake_nvdec(monkeypatch)
    mixed = extract_videos(str(video), tmp_path / "hybrid", seconds=1.0, batch_size=8, decoder="hybrid",
                           decode_workers=3, nvdec_workers=1)
    assert (mixed["done"], mixed["windows"], mixed["decoded_by"]) == (1, 20, {"nvdec": 1})
    assert len(opened) == 4
    extract_videos(str(video), tmp_path / "pyav", seconds=1.0, batch_size=8, decoder="pyav", decode_workers=1)
    np.testing.assert_array_equal(Store(tmp_path / "hybrid").get("long"), Store(tmp_path / "pyav").get("long"))


def test_a_refused_priority_change_is_a_warning_not_a_failure(monkeypatch, caplog):
    import os

    from lvmae_fast.video import ordered

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level("WARNING"):
        assert list(ordered.in_background(lambda: iter([1, 2, 3]), nice=5)) == [1, 2, 3]
    assert ordered.lower_thread_priority(5) is False
    assert "could not lower a decode thread's priority" in caplog.text or not sys.platform.startswith("linux")


def thread_nices() -> dict[int, int]:
    """{thread id: nice value} of this process's threads, read from /proc (stat field 19)."""
    from pathlib import Path

    nices = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        nices[int(task.name)] = int(stat[stat.rindex(")") + 2:].split()[16])
    return nices


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are niced apart on Linux only")
def test_cpu_decodes_run_niced_with_their_ffmpeg_threads_and_nvdec_decodes_do_not(mixed_corpus, tmp_path,
                                                                                  monkeypatch):
    """extract.CPU_DECODE_NICE: each CPU decode runs in a thread of its own with the nice value raised,
    and FFmpeg's frame threads, started by it, inherit it; NVDEC decodes (hybrid) and the caller's thread
    keep theirs. The store is the one an un-niced run writes."""
    import os

    from lvmae_fast import extract
    from lvmae_fast.store import Store

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base > 19 - 5:
        pytest.skip(f"this process already runs at nice {base}")
    opened_at = []
    fake_nvdec(monkeypatch)
    from lvmae_fast.video import decode_pyav

    fake = decode_pyav.nvdec_accel

    def accel(index=0):  # called on the thread that opens the NVDEC decode
        opened_at.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return fake(index)
    monkeypatch.setattr(decode_pyav, "nvdec_accel", accel)
    seen = []   # per CPU decode: (its thread's nice, how many threads of the process run at base + 5)
    real = extract.decode_part

    def decode_part(part, threads=0, hwaccel=None, on_software=None):
        first = True
        for event in real(part, threads, hwaccel, on_software):
            if first and hwaccel is None:  # FFmpeg has opened the decoder (and its frame threads) by now
                nices = thread_nices()
                seen.append((nices[threading.get_native_id()], sum(n == base + 5 for n in nices.values())))
                first = False
            yield event
    monkeypatch.setattr(extract, "decode_part", decode_part)
    monkeypatch.setattr(extract, "FRAME_THREADS", 2)
    good = sorted(mixed_corpus.glob("v*.mp4"))
    stores = {}
    for nice in (0, 5):
        monkeypatch.setattr(extract, "CPU_DECODE_NICE", nice)
        for decoder in ("pyav", "hybrid"):
            seen.clear()
            opened_at.clear()
            out = tmp_path / f"{decoder}{nice}"
            summary = extract.extract_videos(good, out, encoder="tiny", seconds=1.0, batch_size=4, decoder=decoder,
                                             decode_workers=2, nvdec_workers=1)
            assert summary["done"] == 5
            stores[decoder, nice] = Store(out)
            cpu_decodes = summary["decoded_by"].get("pyav", 0)
            assert len(seen) == cpu_decodes >= 1
            if nice:
                # the decode's own thread and FFmpeg's 2 frame threads (at least) run at base + 5
                assert all(own == base + 5 and niced >= 3 for own, niced in seen), seen
            else:
                assert all(own == base and niced == 0 for own, niced in seen), seen
            assert opened_at == [base] * summary["decoded_by"].get("nvdec", 0)
            assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    for vid in stores["pyav", 0].video_ids:
        for key in stores:
            np.testing.assert_array_equal(stores[key].get(vid), stores["pyav", 0].get(vid))


def test_hybrid_is_refused_where_nvdec_cannot_run_and_bad_worker_counts(mixed_corpus, tmp_path, capsys):
    import torch

    from lvmae_fast import extract
    from lvmae_fast.cli import main

    pytest.importorskip("av.codec.hwaccel")
    with pytest.raises(ValueError, match="--decoder hybrid decodes on the GPU's NVDEC: it needs --device cuda"):
        extract.resolve_decoder("hybrid", torch.device("cpu"))
    assert main(["extract", str(mixed_corpus / "v0.mp4"), "--encoder", "tiny", "--out", str(tmp_path / "t"),
                 "--nvdec-workers", "-1"]) == 1
    assert "--nvdec-workers must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    # with another decoder it would be ignored: refused instead
    assert main(["extract", str(mixed_corpus / "v0.mp4"), "--encoder", "tiny", "--out", str(tmp_path / "t"),
                 "--decoder", "pyav", "--nvdec-workers", "4"]) == 1
    assert "--nvdec-workers applies to --decoder hybrid only (got --decoder pyav" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_resumed_video_stays_on_the_decoder_its_saved_windows_came_from(tmp_path, monkeypatch):
    """A hybrid job killed mid-video saves its windows with the decoder that made them (meta.json
    `decoded_by`); the resumed job decodes the rest of that video on the same decoder, whatever the
    load. Checked both ways: as saved (NVDEC) and with the record edited to the CPU."""
    import json

    from lvmae_fast import synth
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store
    from lvmae_fast.video.encoders import tiny
    from lvmae_fast.video.partial import PARTIAL_DIR, PartialVideos

    video = synth.write_video(tmp_path / "long.mp4", duration=12.0, fps=10, codec="h264", gop=12, seed=3).path
    opened = fake_nvdec(monkeypatch, seconds=0.0)

    class Killed(Exception):
        pass

    real, calls = tiny.TinyVideoEncoder.encode_video, [0]

    def dying(self, x):
        calls[0] += 1
        if calls[0] == 4:
            raise Killed
        return real(self, x)

    def killed_run(store):
        calls[0] = 0
        with monkeypatch.context() as m:
            m.setattr(tiny.TinyVideoEncoder, "encode_video", dying)
            with pytest.raises(Killed):
                extract_videos(str(video), store, seconds=1.0, batch_size=2, decoder="hybrid", decode_workers=1,
                               nvdec_workers=1)
        metas = list((store / PARTIAL_DIR).rglob("meta.json"))
        assert len(metas) == 1 and len(list((store / PARTIAL_DIR).rglob("chunk-*.npz"))) == 3
        return metas[0]

    meta = killed_run(tmp_path / "a")
    assert json.loads(meta.read_text())["decoded_by"] == "nvdec"   # the first video takes the free slot
    opened.clear()
    s = extract_videos(str(video), tmp_path / "a", seconds=1.0, batch_size=2, decoder="hybrid", decode_workers=1,
                       nvdec_workers=1)
    assert (s["done"], s["windows"], s["decoded_by"]) == (1, 6, {"nvdec": 1}) and len(opened) >= 1

    meta = killed_run(tmp_path / "b")
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "decoded_by": "pyav"}))   # as if the CPU had made them
    assert PartialVideos(tmp_path / "b", dim=record["dim"], settings=record["settings"]).load(
        "long", str(video), 12) is not None                           # the record is not a setting
    opened.clear()
    s = extract_videos(str(video), tmp_path / "b", seconds=1.0, batch_size=2, decoder="hybrid", decode_workers=1,
                       nvdec_workers=1)
    assert (s["done"], s["windows"], s["decoded_by"]) == (1, 6, {"pyav": 1}) and opened == []
    clean = extract_videos(str(video), tmp_path / "clean", seconds=1.0, batch_size=2, decoder="pyav")
    assert clean["windows"] == 12
    for store in ("a", "b"):   # the fake NVDEC decodes in software: the same store as one clean run
        np.testing.assert_array_equal(Store(tmp_path / store).get("long"), Store(tmp_path / "clean").get("long"))


def test_a_window_using_a_frame_predicted_from_damage_shown_after_it_goes_to_the_redo(tmp_path, monkeypatch):
    """Open-GOP H.264, the P-frame at 31.9 s damaged: decoded before the B-frame at 31.8 s (predicted from
    it) but shown after it, so it is flagged corrupt one frame after window 31 is complete. The part
    handed window 31 on before it saw the damage, with its own concealed pixels (they differ by where the
    decode started); the redo then began at window 32. Parts now hold windows back REORDER_FRAMES frames."""
    pytest.importorskip("av")
    from lvmae_fast import synth

    src = synth.write_camera_like(tmp_path / "src.mp4", duration=40, fps=10, size=(160, 96), keyint=20, seed=2,
                                  open_gop=True)
    video = damaged_copy(src, tmp_path / "v" / "cam.mp4", near=32.0, keyframe=False)
    runs = one_pass_and_parts(monkeypatch, tmp_path, str(video), seconds=1.0, frames=4, batch_size=8)
    assert runs["one pass"][0]["done"] == 1
    assert_same_runs(runs)


def write_resolution_change(path, sizes=((160, 96), (96, 64)), seconds_each=20, fps=10):
    """One H.264 stream in mkv whose resolution changes midway (joined recordings): in-band SPS per
    keyframe, keyframes every 2 s."""
    av = pytest.importorskip("av")
    from fractions import Fraction

    rng = np.random.default_rng(0)
    n = seconds_each * fps
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *sizes[0], "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for seg, (w, h) in enumerate(sizes):
            enc = av.CodecContext.create("libx264", "w")
            enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
            enc.time_base, enc.framerate, enc.gop_size, enc.max_b_frames = Fraction(1, fps), fps, 2 * fps, 0
            enc.options = {"preset": "ultrafast", "x264-params": "repeat-headers=1"}
            packets = []
            for i in range(n):
                img = np.full((h, w, 3), (i * 7 + seg * 80) % 256, np.uint8)
                img[: h // 2, : w // 2] = rng.integers(0, 256, 3)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
                frame.pts = i
                packets += enc.encode(frame)
            packets += enc.encode(None)
            for p in packets:
                p.stream = stream
                p.pts = p.dts = (seg * n + p.pts) * (1000 // fps)
                p.time_base = Fraction(1, 1000)
                out.mux(p)
    return path


def test_a_video_that_changes_resolution_is_scaled_alike_by_one_pass_and_parts(tmp_path, monkeypatch):
    """20 s at 160x96, then 20 s at 96x64: every frame is scaled to the stream's probed size. Scaled to the
    first frame of each decode instead, a part (as a resume) starting after the change kept 96x64 and
    stored other embeddings than one pass (windows 24-39)."""
    video = write_resolution_change(tmp_path / "joined.mkv")
    runs = one_pass_and_parts(monkeypatch, tmp_path, str(video), seconds=1.0, frames=4, batch_size=8)
    assert runs["one pass"][0]["windows"] == 40
    assert_same_runs(runs)


def software_settings(index=0):
    """HWAccel settings PyAV cannot use for H.264 on this machine: it drops them and FFmpeg's software
    decoder decodes, silently, as where NVDEC cannot decode a stream (frames in yuv420p, not 'cuda')."""
    from av.codec.hwaccel import HWAccel

    return HWAccel("drm", allow_software_fallback=True)


def test_a_decode_given_nvdec_settings_that_ffmpeg_ran_in_software_is_told(tmp_path, caplog):
    """PyAV's `is_hwaccel` cannot tell whether NVDEC decoded: the frames' format can. A decode given
    settings that FFmpeg did not use calls on_software once (or logs it), with the frames of a plain
    software decode; a decode without settings, or whose factory gives none, never does."""
    from lvmae_fast import synth
    from lvmae_fast.video.decode_pyav import decode_windows_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec, prepare_job

    video = synth.write_video(tmp_path / "v.mp4", duration=4.0, fps=10, codec="h264", gop=6, seed=2)
    job = prepare_job(VideoJob("v", str(video.path)), WindowSpec(seconds=1.0))
    plain = list(decode_windows_pyav(job.index, job.plan))
    calls = []
    for hwaccel, expected in ((None, 0), (lambda: None, 0), (software_settings, 1)):
        calls.clear()
        got = list(decode_windows_pyav(job.index, job.plan, hwaccel=hwaccel, on_software=lambda: calls.append(1)))
        assert len(calls) == expected
        assert [w for w, _, _ in got] == [w for w, _, _ in plain] == [0, 1, 2, 3]
        for (_, a, _), (_, b, _) in zip(plain, got):
            np.testing.assert_array_equal(a, b)
    with caplog.at_level("WARNING"):   # no callback: a warning naming the file
        list(decode_windows_pyav(job.index, job.plan, hwaccel=software_settings))
    assert "NVDEC did not decode this video" in caplog.text and str(video.path) in caplog.text


def test_nvdec_decodes_ffmpeg_ran_in_software_are_counted_apart_in_the_summary(mixed_corpus, tmp_path, monkeypatch,
                                                                             caplog):
    """--decoder hybrid where NVDEC's settings were not used: those videos were decoded on the CPU, and the
    summary says so ('pyav (nvdec fallback)') instead of counting them as NVDEC's, with one warning per
    video however many parts it was cut into."""
    from lvmae_fast import extract
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.video import decode_pyav

    fake_nvdec(monkeypatch, seconds=0.0)
    monkeypatch.setattr(decode_pyav, "nvdec_accel", software_settings)
    good = sorted(mixed_corpus.glob("v*.mp4"))
    with caplog.at_level("WARNING"):
        by = extract_videos(good, tmp_path / "s", encoder="tiny", seconds=1.0, batch_size=4, decoder="hybrid",
                            decode_workers=1, nvdec_workers=1)["decoded_by"]
    assert "nvdec" not in by and by[extract.NVDEC_FALLBACK] >= 1 and sum(by.values()) == 5, by
    warned = [r for r in caplog.records if "NVDEC did not decode this video" in r.getMessage()]
    assert len(warned) == by[extract.NVDEC_FALLBACK]


def test_nvdec_check_refuses_settings_ffmpeg_did_not_use(monkeypatch):
    """Two ways NVDEC settings go unused: PyAV drops them (is_hwaccel False), or FFmpeg takes them and
    falls back to software with is_hwaccel still True: only the frames' format tells that one."""
    import av

    from lvmae_fast.video import decode_pyav

    monkeypatch.setattr(decode_pyav, "nvdec_accel", software_settings)
    assert decode_pyav.nvdec_problem(0) == "FFmpeg fell back to its software decoder"

    class Claims:   # wraps a PyAV object, overriding some attributes
        def __init__(self, inner, **override):
            self._inner, self._override = inner, override

        def __getattr__(self, name):
            return self._override[name] if name in self._override else getattr(self._inner, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

    real_open = av.open

    def open_claiming_nvdec(file, mode="r", **kw):   # software decoding, its context saying NVDEC was taken
        if mode != "r":
            return real_open(file, mode, **kw)
        kw.pop("hwaccel", None)
        container = real_open(file, mode, **kw)
        stream = container.streams.video[0]
        claimed = Claims(stream, codec_context=Claims(stream.codec_context, is_hwaccel=True))
        return Claims(container, streams=Claims(container.streams, video=[claimed]),
                      decode=lambda s: container.decode(stream))
    monkeypatch.setattr(av, "open", open_claiming_nvdec)
    assert decode_pyav.nvdec_problem(0) == "FFmpeg fell back to its software decoder"


def test_nvdec_check_says_why_ffmpeg_fell_back(monkeypatch):
    """FFmpeg names a fallback's cause only in its log, which PyAV keeps off: the check captures what
    FFmpeg warned of meanwhile (on any thread: frame threads set the hwaccel up) and leaves the log
    level as it was."""
    import threading

    import av.logging

    from lvmae_fast.video import decode_pyav

    def settings_ffmpeg_refuses(index=0):   # FFmpeg's words on a host without the driver's decode library
        said = [(av.logging.ERROR, "nvdec", "Cannot load libnvcuvid.so.1\n"),
                (av.logging.ERROR, "h264", "Failed setup for format cuda: hwaccel initialisation returned error.\n"),
                (av.logging.ERROR, "nvdec", "Cannot load libnvcuvid.so.1\n"),   # said again: once in the reason
                (av.logging.VERBOSE, "h264", "detail below the warning level\n")]
        thread = threading.Thread(target=lambda: [av.logging.log(*line) for line in said])
        thread.start()
        thread.join()
        return software_settings()

    monkeypatch.setattr(decode_pyav, "nvdec_accel", settings_ffmpeg_refuses)
    before = av.logging.get_level()
    assert decode_pyav.nvdec_problem(0) == (
        "FFmpeg fell back to its software decoder (FFmpeg said: [nvdec] Cannot load libnvcuvid.so.1; "
        "[h264] Failed setup for format cuda: hwaccel initialisation returned error.)")
    assert av.logging.get_level() == before


def test_a_rotated_video_is_embedded_as_stored_with_one_warning_however_many_parts(tmp_path, caplog):
    """A phone's portrait video is stored landscape with a display rotation, which players apply and the
    decoders (PyAV's arrays, DALI) do not: its frames are embedded as stored, so the user is told, once
    per video though its parts decode apart; a video without rotation gets no warning."""
    import av

    from lvmae_fast.extract import decode_part, pyav_parts
    from lvmae_fast.video import decode_pyav
    from lvmae_fast.video.jobs import VideoJob, WindowSpec

    def write(path, rotation):
        with av.open(str(path), "w") as out:
            s = out.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            if rotation:
                s.set_display_rotation(rotation)
            for k in range(40):
                f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * k, np.uint8), format="rgb24")
                f.pts = k
                for p in s.encode(f):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        return str(path)

    spec = WindowSpec(seconds=1.0, frames=2)
    with caplog.at_level("WARNING", logger=decode_pyav.__name__):
        for name, rotation in (("portrait.mp4", 90), ("landscape.mp4", 0)):
            parts = list(pyav_parts([VideoJob(name, write(tmp_path / name, rotation))], spec, part_windows=1))
            assert len(parts) == 4
            windows = [w for p in parts for w in decode_part(p)]
            assert [w.frames.shape for w in windows] == [(2, 48, 64, 3)] * 4   # as stored
    told = [r.getMessage() for r in caplog.records if "display matrix" in r.getMessage()]
    assert len(told) == 1 and "portrait.mp4: its player shows it rotated by 90 degrees" in told[0], told


def test_items_in_flight_are_capped_while_one_long_item_holds_the_order():
    """While one worker decoded a long video that cannot be cut into parts, the other ran through every
    later video, each holding its windows until the consumer reached it: memory grew with the number of
    videos behind the long one (2102 windows, 840 MB on 2000 short videos). At most `ahead` items are
    started and not yet consumed."""
    release, started = threading.Event(), []

    def produce(i):
        started.append(i)
        if i == 0:
            release.wait(10)   # the long video
        yield i

    gen = ordered_parallel(range(50), produce, workers=2, ahead=4)
    threading.Timer(0.5, release.set).start()
    first = next(gen)          # blocks until item 0 is released
    assert first == 0 and max(started) < 4, started   # items 0..3 only, not all 50
    assert list(gen) == list(range(1, 50))
    with pytest.raises(ValueError, match="ahead must be >= workers"):
        next(ordered_parallel(range(3), produce, workers=2, ahead=1))
