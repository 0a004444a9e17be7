"""End to end: `lvmae extract` on real files, the failure corpus, resume after a hard kill."""
import json
import subprocess
import sys
import textwrap

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
        "sub/c": synth.write_video(d / "sub" / "c.mkv", duration=3.4, fps=8, codec="vp9"),
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
    # 3.0 s -> 3 windows; 3.4 s -> 3 full + 0.4 s tail (< 0.5 s): dropped
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
    out = capsys.readouterr().out
    assert "4 done, 0 skipped" in out and "5 failed" in out

    # Re-run: everything already there is skipped, nothing recomputed.
    summary = extract_videos(folder, store_dir, encoder="tiny", seconds=1.0)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 4, 5)


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
    extract_videos(sys.argv[1], sys.argv[2], encoder="tiny", seconds=1.0, batch_size=2)
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
    monkeypatch.setattr(decode_pyav, "decode_windows_pyav", lambda index, plan: iter(()))
    s = extract_videos([("a", str(good["a"].path))], tmp_path / "s", seconds=1.0, decoder="pyav")
    assert (s["done"], s["failed"]) == (0, 1)
    [failure] = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert failure["video_id"] == "a" and "no windows" in failure["reason"]


def test_an_error_after_a_video_is_stored_does_not_also_count_it_failed(corpus, tmp_path, monkeypatch):
    from lvmae_fast.video import decode_pyav

    real = decode_pyav.decode_windows_pyav

    def raises_after_the_last_window(index, plan):
        yield from real(index, plan)
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
    assert Store(tmp_path / "s").video_ids == ["a"]  # nothing written by the refused runs
    assert Store(tmp_path / "s")._entries["a"]["n"] == 3
