"""Embedding store: layout readable by numpy alone, atomic/resumable writes, import, info, verify."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lvmae_fast.store import Store, StoreWriter, verify_store
from lvmae_fast.store_cli import import_embeddings, parse_path_list

REPO = Path(__file__).resolve().parents[1]


def lvmae(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lvmae_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def random_videos(rng, dim, lengths):
    return {f"v{i}": rng.standard_normal((n, dim)).astype(np.float32) for i, n in enumerate(lengths)}


def write_store(path, videos, dim, shard_rows=16, **kw):
    with StoreWriter(path, dim, shard_rows=shard_rows, **kw) as w:
        for vid, emb in videos.items():
            w.add(vid, emb, source_path=f"/videos/{vid}.mp4")
    return path


def killed_writer_store(path, videos, dim=4):
    """A store whose writer committed each video on its own and was then killed (its lock dropped, as the
    kernel does): the first video in index.json, the others on journal lines 1, 2, ..."""
    w = StoreWriter(path, dim=dim)
    for vid, emb in videos.items():
        w.add(vid, emb)
        w.commit()
    w._lock.release()
    return path


def test_round_trip_and_numpy_only_layout(tmp_path):
    rng = np.random.default_rng(0)
    videos = random_videos(rng, 8, [3, 20, 1, 7, 16, 5])
    times = np.stack([np.arange(7) * 2.0, np.arange(7) * 2.0 + 2.5], 1)
    with StoreWriter(tmp_path / "s", 8, encoder="enc", segment_seconds=2.0, shard_rows=16) as w:
        for vid, emb in videos.items():
            w.add(vid, emb, source_path=f"/videos/{vid}.mp4", window_times=times if vid == "v3" else None)
    store = Store(tmp_path / "s")
    assert len(store) == 6 and store.video_ids == list(videos) and store.dim == 8
    for vid, emb in videos.items():
        got = store.get(vid)
        assert isinstance(got, np.memmap) and got.dtype == np.float16
        np.testing.assert_array_equal(got, emb.astype(np.float16))
    meta = store.meta("v1")
    assert {k: meta[k] for k in ("id", "n", "segment_seconds", "source", "encoder", "dim")} == \
        {"id": "v1", "n": 20, "segment_seconds": 2.0, "source": "/videos/v1.mp4", "encoder": "enc", "dim": 8}
    np.testing.assert_array_equal(store.window_times("v3"), times.astype(np.float32))
    np.testing.assert_array_equal(store.window_times("v0"), [[0, 2], [2, 4], [4, 6]])  # default: i*S .. (i+1)*S

    # Documented recipe: json + np.load only; each video is one contiguous slice of one shard.
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for v in index["videos"]:
        shard = index["shards"][v["shard"]]
        emb = np.load(tmp_path / "s" / shard["emb"], mmap_mode="r")
        np.testing.assert_array_equal(emb[v["offset"]: v["offset"] + v["n"]], videos[v["id"]].astype(np.float16))
        assert v["offset"] + v["n"] <= shard["rows"] == emb.shape[0]
    # A 20-row video exceeds shard_rows=16: it gets a shard of its own rather than being split.
    assert index["shards"][store.meta("v1")["shard"]]["rows"] == 20


def test_writer_validation(tmp_path):
    with StoreWriter(tmp_path / "s", 4) as w:
        w.add("ok", np.ones((2, 4), np.float32))
        cases = {
            "dim": np.ones((2, 5), np.float32),
            "empty": np.ones((0, 4), np.float32),
            "nan": np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32),
            "overflow": np.full((1, 4), 70000.0, np.float32),   # finite in float32, Inf in float16
            "ints": np.ones((2, 4), np.int64),
        }
        for vid, emb in cases.items():
            with pytest.raises(ValueError):
                w.add(vid, emb)
        with pytest.raises(ValueError, match="already"):
            w.add("ok", np.ones((2, 4), np.float32))
        with pytest.raises(ValueError, match="window_times"):
            w.add("times", np.ones((2, 4), np.float32), window_times=np.zeros((3, 2)))
    assert Store(tmp_path / "s").video_ids == ["ok"]
    with pytest.raises(ValueError, match=r"\(dim 4\); these are from encoder .* \(dim 8\)"):
        StoreWriter(tmp_path / "s", 8)
    with pytest.raises(ValueError, match="encoder"):
        StoreWriter(tmp_path / "s", 4, encoder="other")


def test_killed_writer_leaves_only_committed_videos_and_resumes(tmp_path):
    # A writer process adds 10 videos of 6 rows with 16-row shards (auto-commits as shards fill), then
    # dies without closing: the store must read as exactly the committed prefix, and resume cleanly.
    script = textwrap.dedent(f"""
        import os, numpy as np
        from lvmae_fast.store import StoreWriter
        w = StoreWriter({str(tmp_path / 's')!r}, 4, shard_rows=16)
        for i in range(10):
            w.add(f"v{{i}}", np.full((6, 4), i, np.float32))
        os._exit(1)
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60)
    store = Store(tmp_path / "s")
    committed = store.video_ids
    assert 0 < len(committed) < 10 and committed == [f"v{i}" for i in range(len(committed))]
    assert verify_store(tmp_path / "s").ok
    (tmp_path / "s" / "shards" / "emb-00099.npy").write_bytes(b"garbage from a killed writer")
    with StoreWriter(tmp_path / "s", 4, shard_rows=16) as w:
        assert not (tmp_path / "s" / "shards" / "emb-00099.npy").exists()
        for i in range(10):
            if not w.contains(f"v{i}"):
                w.add(f"v{i}", np.full((6, 4), i, np.float32))
    store = Store(tmp_path / "s")
    assert store.video_ids == [f"v{i}" for i in range(10)]
    assert all(float(store.get(f"v{i}")[0, 0]) == i for i in range(10))


def test_corrupt_stores_are_named(tmp_path):
    rng = np.random.default_rng(1)
    path = write_store(tmp_path / "s", random_videos(rng, 8, [4, 9, 3, 12]), 8, shard_rows=12)
    # NaN rows written behind the writer's back: verify names exactly those videos.
    index = json.loads((path / "index.json").read_text())
    where = {v["id"]: v for v in index["videos"]}
    for vid in ("v1", "v3"):
        v = where[vid]
        emb = np.load(path / index["shards"][v["shard"]]["emb"], mmap_mode="r+")
        emb[v["offset"] + 1, 2] = np.nan
        emb.flush()
    report = verify_store(path)
    assert report.bad_videos == ["v1", "v3"]
    # Index pointing past its shard: the reader refuses, verify names the video.
    where["v2"]["n"] += 50
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="v2"):
        Store(path)
    assert "v2" in verify_store(path).bad_videos


def test_wrong_dim_shard_is_reported(tmp_path):
    rng = np.random.default_rng(2)
    path = write_store(tmp_path / "s", random_videos(rng, 8, [4, 9]), 8, shard_rows=8)
    index = json.loads((path / "index.json").read_text())
    shard_of_v1 = index["videos"][1]["shard"]
    np.save(path / index["shards"][shard_of_v1]["emb"], np.zeros((9, 6), np.float16))
    assert verify_store(path).bad_videos == ["v1"]


def test_import_directory_resume_and_mixed_dims(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    videos = random_videos(rng, 16, [5, 1, 30])
    np.save(src / "v0.npy", videos["v0"].astype(np.float16))
    np.save(src / "v1.npy", videos["v1"])
    torch.save(torch.from_numpy(videos["v2"]), src / "v2.pt")
    np.save(src / "wrongdim.npy", np.zeros((3, 12), np.float32))
    added, skipped, failures = import_embeddings(src, tmp_path / "s")
    assert (added, skipped) == (3, 0) and len(failures) == 1 and failures[0].startswith("wrongdim")
    store = Store(tmp_path / "s")
    for vid, emb in videos.items():
        np.testing.assert_array_equal(store.get(vid), emb.astype(np.float16))
    np.save(src / "v3.npy", np.ones((2, 16), np.float32))
    added, skipped, _ = import_embeddings(src, tmp_path / "s")
    assert (added, skipped) == (1, 3) and len(Store(tmp_path / "s")) == 4


@pytest.mark.parametrize("first", [np.arange(12, dtype=np.int64).reshape(3, 4), np.zeros((0, 4), np.float32),
                                   np.full((2, 4), np.nan, np.float32)])
def test_only_a_valid_file_fixes_a_new_stores_dim(tmp_path, first):
    """A file the store refuses (integers, no rows, NaN) that sorts first must not fix a new store's
    width: the valid files of another width are imported, and no store is left by refused files alone."""
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "a_bad.npy", first)
    added, _, failures = import_embeddings(src, tmp_path / "only_bad")
    assert added == 0 and len(failures) == 1 and not (tmp_path / "only_bad").exists()
    clips = {f"clip{k}": np.random.default_rng(k).standard_normal((6, 8)).astype(np.float32) for k in (1, 2)}
    for vid, emb in clips.items():
        np.save(src / f"{vid}.npy", emb)
    added, _, failures = import_embeddings(src, tmp_path / "s")
    assert added == 2 and [f.split(" ")[0] for f in failures] == ["a_bad"]
    store = Store(tmp_path / "s")
    assert store.dim == 8
    for vid, emb in clips.items():
        np.testing.assert_array_equal(store.get(vid), emb.astype(np.float16))


def test_parse_path_list_never_evaluates():
    assert parse_path_list('["a/b.pt", "c.pt"]') == ["a/b.pt", "c.pt"]
    assert parse_path_list("['a/b.pt', 'it\\'s.pt']") == ["a/b.pt", "it's.pt"]
    assert parse_path_list("[]") == []
    for bad in ("__import__('os').system('touch pwned')", "['a', __import__('os')]", "{'a': 1}", "[1, 2]"):
        with pytest.raises(ValueError):
            parse_path_list(bad)


def test_import_reference_csv_layout(tmp_path):
    rng = np.random.default_rng(4)
    seg_dir = tmp_path / "segs"
    seg_dir.mkdir()
    rows, expected = [], {}
    for vid, n in (("movieA", 3), ("movieB", 2)):
        paths = []
        for j in range(n):
            e = rng.standard_normal(8).astype(np.float32)
            p = seg_dir / f"{vid}_{j:03d}_langbind_output.pt"
            torch.save({"embedding": torch.from_numpy(e)}, p)
            paths.append(str(p))
        expected[vid] = np.stack([torch.load(p)["embedding"].numpy() for p in paths])
        rows.append({"segment_idx": len(rows), "video_filename": vid, "segment_paths": str(paths),
                     "number_of_segments": n, "label": 0, "label_name": "x"})
    marker = tmp_path / "pwned"
    rows.append({"segment_idx": 2, "video_filename": "evil", "segment_paths": f"__import__('os').system('touch {marker}')",
                 "number_of_segments": 1, "label": 0, "label_name": "x"})
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    added, _, failures = import_embeddings(tmp_path / "train.csv", tmp_path / "s", encoder="languagebind")
    assert added == 2 and len(failures) == 1 and failures[0].startswith("evil") and not marker.exists()
    store = Store(tmp_path / "s")
    for vid, emb in expected.items():
        np.testing.assert_array_equal(store.get(vid), emb.astype(np.float16))


def test_cli_import_info_verify(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    for vid, emb in random_videos(rng, 32, [4, 10, 7]).items():
        np.save(src / f"{vid}.npy", emb)
    r = lvmae("store", "import", src, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    r = lvmae("store", "info", tmp_path / "s", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["segments"] == 21
    assert lvmae("store", "verify", tmp_path / "s").returncode == 0
    emb = np.load(tmp_path / "s" / "shards" / "emb-00000.npy", mmap_mode="r+")
    emb[5, 0] = np.inf  # row 5 is v1's second row (v0 has 4 rows)
    emb.flush()
    r = lvmae("store", "verify", tmp_path / "s")
    assert r.returncode != 0 and "v1" in r.stdout and "v0" not in r.stdout and "v2" not in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = lvmae("store", "import", empty, "--out", tmp_path / "s2")
    assert r.returncode == 1 and "error" in r.stderr and not (tmp_path / "s2").exists()


def test_fortran_ordered_inputs_are_stored_readably(tmp_path):
    emb = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    times = np.asfortranarray(np.array([[0.0, 5.0], [5.0, 10.0], [10.0, 12.5]]))
    with StoreWriter(tmp_path / "s", dim=2) as w:
        w.add("a", emb, window_times=times)
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.get("a"), emb.astype(np.float16))
    np.testing.assert_array_equal(store.window_times("a"), times.astype(np.float32))


def test_commits_append_to_a_journal_that_readers_apply_and_close_folds(tmp_path):
    from lvmae_fast.store import JOURNAL_NAME

    rng = np.random.default_rng(0)
    videos = random_videos(rng, 4, [3, 1, 5, 2, 4])
    w = StoreWriter(tmp_path / "s", dim=4)
    for i, (vid, emb) in enumerate(videos.items()):
        w.add(vid, emb)
        w.commit()  # one commit per video, as an extraction job does
        if i == 0:
            snapshot = (tmp_path / "s" / "index.json").read_bytes()
        else:  # later commits only append a journal line; the snapshot is untouched
            assert (tmp_path / "s" / "index.json").read_bytes() == snapshot
            assert len((tmp_path / "s" / JOURNAL_NAME).read_text().splitlines()) == i
        reader = Store(tmp_path / "s")
        assert reader.video_ids == list(videos)[: i + 1]
    before = Store(tmp_path / "s").fingerprint
    w.close()
    assert not (tmp_path / "s" / JOURNAL_NAME).exists()
    after = Store(tmp_path / "s")
    assert after.fingerprint == before and after.video_ids == list(videos)
    for vid, emb in videos.items():
        np.testing.assert_array_equal(after.get(vid), emb.astype(np.float16))


def test_torn_journal_line_is_ignored_and_a_resumed_writer_stays_readable(tmp_path):
    from lvmae_fast.store import JOURNAL_NAME

    rng = np.random.default_rng(1)
    videos = random_videos(rng, 4, [2, 3, 4])
    w = StoreWriter(tmp_path / "s", dim=4)
    for vid, emb in list(videos.items())[:2]:
        w.add(vid, emb)
        w.commit()
    # A writer killed mid-append: half a JSON line at the end of the journal (and the kernel drops its lock).
    w._lock.release()
    with open(tmp_path / "s" / JOURNAL_NAME, "ab") as f:
        f.write(b'{"seq": 2, "shards": [{"emb": "shards/emb-0')
    assert Store(tmp_path / "s").video_ids == ["v0", "v1"]
    with StoreWriter(tmp_path / "s", dim=4) as w2:  # resumes: folds the valid part, drops the torn tail
        assert w2.contains("v1") and not w2.contains("v2")
        w2.add("v2", videos["v2"])
        w2.commit()
        assert Store(tmp_path / "s").video_ids == ["v0", "v1", "v2"]
    report = verify_store(tmp_path / "s")
    assert report.ok and report.num_videos == 3, report.problems


def test_fold_killed_before_dropping_the_journal_does_not_duplicate(tmp_path):
    from lvmae_fast.store import JOURNAL_NAME, load_index

    rng = np.random.default_rng(2)
    w = StoreWriter(tmp_path / "s", dim=4)
    for vid, emb in random_videos(rng, 4, [2, 2, 2]).items():
        w.add(vid, emb)
        w.commit()
    journal = (tmp_path / "s" / JOURNAL_NAME).read_bytes()
    w.close()  # folds and removes the journal
    (tmp_path / "s" / JOURNAL_NAME).write_bytes(journal)  # as if killed between snapshot and unlink
    assert [v["id"] for v in load_index(tmp_path / "s")["videos"]] == ["v0", "v1", "v2"]
    assert Store(tmp_path / "s").video_ids == ["v0", "v1", "v2"]


class CountingId(str):
    """A video id that counts equality comparisons: per-video work must not scan all other ids."""
    comparisons = 0
    __hash__ = str.__hash__

    def __eq__(self, other):
        CountingId.comparisons += 1
        return str.__eq__(self, other)


def test_adding_videos_does_not_compare_every_pending_id(tmp_path):
    CountingId.comparisons = 0
    with StoreWriter(tmp_path / "s", dim=2, shard_rows=1 << 20) as w:  # all 300 stay buffered until close
        for i in range(300):
            w.add(CountingId(f"v{i}"), np.ones((1, 2), np.float32))
        assert w.contains("v299") and not w.contains("v300")
    assert CountingId.comparisons < 300  # a scan of the pending list per add makes ~45000
    assert Store(tmp_path / "s").video_ids == [f"v{i}" for i in range(300)]


def test_import_reports_an_id_with_both_npy_and_pt_and_imports_the_rest(tmp_path):
    from lvmae_fast.store_cli import import_embeddings

    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "a.npy", np.full((1, 2), 1.0, np.float32))
    torch.save(torch.full((1, 2), 2.0), src / "a.pt")
    np.save(src / "b.npy", np.full((2, 2), 3.0, np.float32))
    added, skipped, failures = import_embeddings(src, tmp_path / "s")
    assert (added, skipped) == (2, 0)
    assert len(failures) == 1 and failures[0].startswith(f"a ({src / 'a.pt'}): video id repeated in the source")
    store = Store(tmp_path / "s")
    assert store.video_ids == ["a", "b"] and np.all(np.asarray(store.get("a")) == 1.0)


def test_commit_cost_does_not_grow_with_the_store(tmp_path, monkeypatch):
    w = StoreWriter(tmp_path / "s", dim=2, shard_rows=1 << 20)
    for i in range(2000):
        w.add(f"video-{i:06d}", np.ones((1, 2), np.float32))
    w.commit()
    real_dumps, serialized = json.dumps, []
    monkeypatch.setattr(json, "dumps", lambda *a, **k: serialized.append(real_dumps(*a, **k)) or serialized[-1])
    w.add("new", np.ones((1, 2), np.float32))
    w.commit()
    monkeypatch.undo()
    # One journal line for one video; copying the index serialises all 2000 entries (~150 kB).
    assert sum(map(len, serialized)) < 2000
    w.close()
    assert len(Store(tmp_path / "s")) == 2001 and verify_store(tmp_path / "s").ok


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors via /proc")
def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    import lvmae_fast.store as store_mod

    # An extraction job commits about one shard per encoder batch, so real stores have many shards;
    # every open memory map holds a file descriptor.
    videos = {f"v{i}": np.full((2, 4), i, np.float32) for i in range(30)}
    write_store(tmp_path / "s", videos, 4, shard_rows=2)  # one shard per video
    monkeypatch.setattr(store_mod, "MAX_OPEN_MAPS", 8, raising=False)
    store = Store(tmp_path / "s")
    assert len({store.meta(v)["shard"] for v in videos}) == 30
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(2):
        for vid, emb in videos.items():
            np.testing.assert_array_equal(np.array(store.get(vid)), emb.astype(np.float16))
            np.testing.assert_array_equal(np.array(store.window_times(vid)), [[0, 5], [5, 10]])
    assert len(list(Path("/proc/self/fd").iterdir())) - before <= 8


def test_failed_journal_append_is_undone_so_later_commits_stay_visible(tmp_path, monkeypatch):
    import os

    w = StoreWriter(tmp_path / "s", dim=4)
    w.add("v0", np.zeros((2, 4), np.float32))
    w.commit()  # writes index.json; later commits append to the journal
    real_fsync, failures = os.fsync, [1]

    def fsync(fd):  # the disk fills up while the journal line is being made durable
        if failures and os.readlink(f"/proc/self/fd/{fd}").endswith("index.journal"):
            failures.pop()
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    w.add("v1", np.ones((2, 4), np.float32))
    with pytest.raises(OSError):
        w.commit()
    w.commit()  # retried once space is freed
    w.add("v2", np.full((2, 4), 2, np.float32))
    w.commit()
    assert Store(tmp_path / "s").video_ids == ["v0", "v1", "v2"]
    w.close()
    store = Store(tmp_path / "s")
    assert store.video_ids == ["v0", "v1", "v2"] and float(store.get("v2")[0, 0]) == 2


def test_verify_names_a_video_id_that_appears_twice(tmp_path):
    path = write_store(tmp_path / "s", random_videos(np.random.default_rng(6), 4, [3, 2, 4]), 4, shard_rows=16)
    index = json.loads((path / "index.json").read_text())
    index["videos"][0]["id"] = "v2"  # two entries, different rows, one id
    (path / "index.json").write_text(json.dumps(index))
    report = verify_store(path)  # reported, not raised
    assert report.bad_videos == ["v2"] and "twice" in str(report.problems[0])
    with pytest.raises(ValueError, match="v2"):
        Store(path)


def test_shard_renames_are_made_durable_before_the_index_names_them(tmp_path, monkeypatch):
    import os

    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    w = StoreWriter(tmp_path / "s", dim=4)
    w.add("v0", np.zeros((2, 4), np.float32))
    w.commit()
    monkeypatch.setattr(os, "fsync", fsync)
    w.add("v1", np.ones((2, 4), np.float32))
    w.commit()
    s = (tmp_path / "s").resolve()
    assert synced.index(s / "shards") < synced.index(s / "index.journal")  # directory entries first
    synced.clear()
    w.close()  # the fold's new index.json rename is durable before the journal is removed
    index_written = next(i for i, f in enumerate(synced) if f.name.startswith(".index.json."))  # temp before rename
    assert index_written < synced.index(s)


def test_journal_folds_when_it_outgrows_the_snapshot(tmp_path, monkeypatch):
    import lvmae_fast.store as store_mod

    monkeypatch.setattr(store_mod, "FOLD_MIN_BYTES", 0)
    rng = np.random.default_rng(3)
    w = StoreWriter(tmp_path / "s", dim=2)
    sizes = []  # (index.json bytes, journal bytes) after each commit
    for vid, emb in random_videos(rng, 2, [1] * 40).items():
        w.add(vid, emb)
        w.commit()
        journal = tmp_path / "s" / store_mod.JOURNAL_NAME
        sizes.append(((tmp_path / "s" / "index.json").stat().st_size, journal.stat().st_size if journal.exists() else 0))
        # Invariant after every commit: the journal never stays larger than the snapshot.
        assert sizes[-1][1] < sizes[-1][0]
    snapshots = sorted({s for s, _ in sizes})
    # Folds happen (the snapshot grew several times) but not at every commit: each fold grows it
    # geometrically (about 2x, less the journal lines' own overhead), so total index writes stay linear.
    assert 3 <= len(snapshots) < 40
    assert all(b >= 1.5 * a for a, b in zip(snapshots[1:], snapshots[2:]))
    w.close()
    assert Store(tmp_path / "s").video_ids == [f"v{i}" for i in range(40)]


def test_a_journal_entry_that_parses_but_names_a_wrong_file_or_lacks_a_key_opens_no_writer(tmp_path):
    """A garbled shard name (or a missing key) on a journal line that still parses: verify flags it, but
    the next writer (compact, import, an extract resume) folded it and deleted the intact shard it should
    name as unreferenced, the only copy of that video; with a key missing it raised KeyError."""
    from lvmae_fast.cli import main
    from lvmae_fast.store import JOURNAL_NAME

    rng = np.random.default_rng(3)
    videos = random_videos(rng, 4, [2, 3, 4, 2])
    killed_writer_store(tmp_path / "s", videos)  # the journal stays
    journal = tmp_path / "s" / JOURNAL_NAME
    good = journal.read_bytes()
    shards_before = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    line = good.split(b"\n")[1]
    name = re.search(rb"shards/emb-\d+\.npy", line).group()
    for bad in (good.replace(name, name[:-1] + b"_"), good.replace(b'"times"', b'"#imes"', 1)):
        assert bad != good
        journal.write_bytes(bad)
        assert not verify_store_ok(tmp_path / "s")
        with pytest.raises(ValueError, match=r"is inconsistent \(\d problems; run `lvmae store verify`\), so it is not opened for writing"):
            StoreWriter(tmp_path / "s", dim=4)
        assert main(["store", "compact", str(tmp_path / "s")]) == 1   # a writer too
        assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == shards_before  # nothing deleted
        assert journal.read_bytes() == bad   # not folded either
    journal.write_bytes(good)  # repaired: every video is there
    assert Store(tmp_path / "s").video_ids == list(videos)


def test_a_damaged_journal_line_before_valid_ones_refuses_the_store_and_deletes_nothing(tmp_path):
    """Only a last line can be torn by a kill. A damaged line with valid ones after it read as the end of the
    journal: verify said OK, and the next writer folded the shortened index and deleted the shards of every
    video recorded after it."""
    from lvmae_fast.store import JOURNAL_NAME

    rng = np.random.default_rng(2)
    videos = random_videos(rng, 4, [2, 3, 4, 2, 5])
    killed_writer_store(tmp_path / "s", videos)  # v0 in index.json, v1..v4 on journal lines 1..4
    journal = tmp_path / "s" / JOURNAL_NAME
    lines = journal.read_bytes().split(b"\n")
    shards_before = sorted((tmp_path / "s" / "shards").iterdir())
    for bad in (b"X" + lines[1][1:], lines[1].replace(b'"seq":2', b'"seq":"2"'),
                lines[1].replace(b'"shards":[', b'"shards":5,"x":[')):
        assert bad != lines[1]
        journal.write_bytes(b"\n".join([lines[0], bad, *lines[2:]]))
        for open_it in (lambda: Store(tmp_path / "s"), lambda: StoreWriter(tmp_path / "s", dim=4)):
            with pytest.raises(ValueError, match=r"line 2 is damaged .* 2 more line\(s\) follow it"):
                open_it()
        assert not verify_store_ok(tmp_path / "s")
        assert sorted((tmp_path / "s" / "shards").iterdir()) == shards_before  # nothing deleted
    journal.write_bytes(b"\n".join(lines))  # restored from a backup: every video is back
    assert Store(tmp_path / "s").video_ids == list(videos)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({**index, "journal_seq": None}))
    with pytest.raises(ValueError, match="journal_seq must be an int"):
        Store(tmp_path / "s")


def test_a_reader_racing_a_writers_fold_reads_the_new_snapshot(tmp_path, monkeypatch):
    """A writer folding the journal and committing twice between a reader's read of index.json and of the
    journal: the journal then starts after the snapshot the reader holds. That is no damage: the reader
    reads both again (it was refused as damaged)."""
    from lvmae_fast import store as store_mod

    rng = np.random.default_rng(3)
    w = StoreWriter(tmp_path / "s", dim=4)
    w.add("v0", rng.standard_normal((2, 4)).astype(np.float32))
    w.commit()  # index.json holds v0; the journal is empty
    real, raced = store_mod.read_journal, []

    def racing(path, after):
        if not raced:
            raced.append(1)
            w._fold()
            for vid in ("v1", "v2"):
                w.add(vid, rng.standard_normal((2, 4)).astype(np.float32))
                w.commit()
        return real(path, after)

    w.add("v1x", rng.standard_normal((2, 4)).astype(np.float32))
    w.commit()  # a journal line, which the fold moves into index.json
    monkeypatch.setattr(store_mod, "read_journal", racing)
    assert Store(tmp_path / "s").video_ids == ["v0", "v1x", "v1", "v2"]
    w.close()


def verify_store_ok(path) -> bool:
    r = lvmae("store", "verify", path)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.returncode == 0


def test_readers_opened_before_a_compaction_scan_and_summarize_it(tmp_path):
    """Only get() re-read the index when a compaction had replaced the shards: the NaN scan (run by pretrain
    and verify at start) and `store info`'s size raised FileNotFoundError."""
    from lvmae_fast.store import scan_nonfinite, summarize

    rng = np.random.default_rng(5)
    videos = random_videos(rng, 3, [5, 1, 7, 2])
    w = StoreWriter(tmp_path / "s", dim=3, shard_rows=16)
    for vid, emb in videos.items():
        w.add(vid, emb)
        w.commit()
    before = Store(tmp_path / "s")
    w.compact()
    w.close()
    assert scan_nonfinite(before) == {}
    assert summarize(before)["bytes_on_disk"] == summarize(Store(tmp_path / "s"))["bytes_on_disk"]


def test_window_times_beyond_float32_are_refused_when_added(tmp_path):
    with StoreWriter(tmp_path / "s", dim=4) as w:
        with pytest.raises(ValueError, match="window_times must be finite in float32"):
            w.add("a", np.ones((2, 4), np.float32), window_times=[[0, 5], [5, 1e39]])


def test_compact_merges_small_shards_and_keeps_every_video(tmp_path):
    from lvmae_fast.store import JOURNAL_NAME

    rng = np.random.default_rng(4)
    videos = random_videos(rng, 3, [5, 1, 7, 2, 3, 4, 30, 2])
    times = {vid: np.cumsum(rng.uniform(1, 5, (len(e), 2)), axis=0).astype(np.float32) for vid, e in videos.items()}
    for t in times.values():
        t[:, 1] = t[:, 0] + 2.5
    w = StoreWriter(tmp_path / "s", dim=3, shard_rows=16)
    for vid, emb in videos.items():  # one commit per video, as extraction does: one small shard each
        w.add(vid, emb, window_times=times[vid])
        w.commit()
    before = Store(tmp_path / "s")
    assert len(before._shards) == len(videos)
    merged = w.compact()
    w.close()
    after = Store(tmp_path / "s")
    # v6 (30 rows) is already a full-size shard and stays; the 7 small ones pack into ceil(24/16) = 2 new ones.
    assert merged == 7 and len(after._shards) == 3
    assert after.video_ids == list(videos)
    assert after.fingerprint == before.fingerprint  # same content: runs trained on it still resume
    for vid, emb in videos.items():
        np.testing.assert_array_equal(after.get(vid), emb.astype(np.float16))
        np.testing.assert_array_equal(after.window_times(vid), times[vid])
        # A reader opened before the compaction (its shard files are gone) finds the rows anew.
        np.testing.assert_array_equal(before.get(vid), emb.astype(np.float16))
        np.testing.assert_array_equal(before.window_times(vid), times[vid])
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == sorted(
        Path(sh[k]).name for sh in after._shards for k in ("emb", "times"))  # old files deleted
    assert not (tmp_path / "s" / JOURNAL_NAME).exists() and verify_store(tmp_path / "s").ok
    # New commits after a compaction never reuse a file name the index still holds.
    with StoreWriter(tmp_path / "s", dim=3, shard_rows=16) as w2:
        for i in range(4):
            w2.add(f"new{i}", rng.standard_normal((2, 3)).astype(np.float32))
            w2.commit()
    final = Store(tmp_path / "s")
    names = [sh["emb"] for sh in final._shards]
    assert len(names) == len(set(names)) and verify_store(tmp_path / "s").ok
    np.testing.assert_array_equal(final.get("v6"), videos["v6"].astype(np.float16))


def test_cli_compact(tmp_path):
    rng = np.random.default_rng(5)
    w = StoreWriter(tmp_path / "s", dim=2, encoder="enc")
    for vid, emb in random_videos(rng, 2, [3, 4, 5]).items():
        w.add(vid, emb)
        w.commit()
    w.close()
    out = lvmae("store", "compact", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    assert "merged 3 small shards; 1 shards now" in out.stdout
    assert Store(tmp_path / "s").video_ids == ["v0", "v1", "v2"]


def write_reference_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def segment_files(seg_dir, vid, n, dim=8, seed=0):
    seg_dir.mkdir(exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for j in range(n):
        p = seg_dir / f"{vid}_{j:03d}.pt"
        torch.save({"embedding": torch.from_numpy(rng.standard_normal(dim).astype(np.float32))}, p)
        paths.append(str(p))
    return paths


class NotPlain:  # a pickled object torch.load(weights_only=True) refuses
    pass


def test_corrupt_or_non_plain_pt_files_are_reported_not_a_traceback(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    src.mkdir()
    for vid, emb in random_videos(rng, 8, [3, 4]).items():
        np.save(src / f"{vid}.npy", emb)
    (src / "garbage.pt").write_bytes(b"\x80\x02this is not a torch file" * 10)
    torch.save({"embedding": NotPlain()}, src / "pickled.pt")
    (src / "empty.npy").write_bytes(b"")
    added, skipped, failures = import_embeddings(src, tmp_path / "s")
    assert (added, skipped) == (2, 0) and len(failures) == 3  # skipped and reported; the rest is committed
    by_id = {f.split(" ")[0]: f for f in failures}
    assert set(by_id) == {"garbage", "pickled", "empty"}
    for vid, name in (("garbage", "garbage.pt"), ("pickled", "pickled.pt"), ("empty", "empty.npy")):
        assert f"{name}: cannot read embeddings (" in by_id[vid] and "\n" not in by_id[vid]
    assert "UnpicklingError" in by_id["pickled"]
    assert sorted(Store(tmp_path / "s").video_ids) == ["v0", "v1"]
    # The CLI: exit 1, one line per bad file, no traceback; a re-run resumes and reports them again.
    r = lvmae("store", "import", src, "--out", tmp_path / "s2")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "imported 2 videos" in r.stdout and "3 videos failed and were not imported" in r.stderr
    assert "failed: pickled (" in r.stderr and "pickled.pt: cannot read embeddings (UnpicklingError" in r.stderr


def test_odd_torch_and_misnamed_files_are_failures_of_their_own(tmp_path):
    """A sparse or meta tensor and a dict with mixed key types stopped the whole import with a TypeError; a
    negated view (valid data) was refused; an .npz or a text file named .npy was called a [1]-shaped array
    or pickled data."""
    rng = np.random.default_rng(9)
    src = tmp_path / "src"
    src.mkdir()
    videos = random_videos(rng, 4, [3, 5])
    np.save(src / "v0.npy", videos["v0"])
    torch.save(torch.from_numpy(videos["v1"]).neg().conj_physical()._neg_view(), src / "negview.pt")
    torch.save(torch.eye(4).to_sparse(), src / "sparse.pt")
    torch.save(torch.empty(3, 4, device="meta"), src / "meta.pt")
    torch.save({1: torch.ones(2, 4), "x": torch.ones(2, 4)}, src / "mixedkeys.pt")
    with open(src / "archive.npy", "wb") as f:
        np.savez(f, a=videos["v0"])
    (src / "notes.npy").write_text("one embedding per line\n")
    added, skipped, failures = import_embeddings(src, tmp_path / "s")
    by_id = {f.split(" ")[0]: f for f in failures}
    assert set(by_id) == {"sparse", "meta", "mixedkeys", "archive", "notes"} and (added, skipped) == (2, 0), failures
    assert "embeddings must be a dense tensor with data, got a sparse_coo tensor" in by_id["sparse"]
    assert "embeddings must be a dense tensor with data, got a meta tensor (no data)" in by_id["meta"]
    assert "dict without an 'embedding' key (keys [\"'x'\", '1'])" in by_id["mixedkeys"]
    assert by_id["archive"].endswith("archive.npy: not a .npy array file: a zip archive (an .npz or a torch file?)")
    assert by_id["notes"].endswith("notes.npy: not a .npy array file: no .npy header")
    np.testing.assert_array_equal(Store(tmp_path / "s").get("negview"), videos["v1"].astype(np.float16))  # -(-x)


def test_a_reference_csv_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path):
    seg = tmp_path / "segs"
    paths = segment_files(seg, "good", 2)
    text = "video_filename,segment_paths,number_of_segments\n" + f'caf\u00e9,"{json.dumps(paths)}",2\n'.replace('"[', "'[").replace(']"', "]'")
    (tmp_path / "train.csv").write_bytes(text.encode("cp1252"))
    r = lvmae("store", "import", tmp_path / "train.csv", "--out", tmp_path / "s")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path / 'train.csv'}: not UTF-8 text (" in r.stderr and "save it as UTF-8" in r.stderr, r.stderr


def test_reference_csv_with_one_bad_segment_file_fails_that_row_only(tmp_path):
    seg = tmp_path / "segs"
    good, bad = segment_files(seg, "good", 3), segment_files(seg, "bad", 3, seed=1)
    Path(bad[1]).write_bytes(b"not a pickle at all")
    write_reference_csv(tmp_path / "train.csv", [
        {"video_filename": vid, "segment_paths": json.dumps(paths), "number_of_segments": 3}
        for vid, paths in (("good", good), ("bad", bad))])
    r = lvmae("store", "import", tmp_path / "train.csv", "--out", tmp_path / "s")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"failed: bad ({tmp_path / 'train.csv'}#row=1): {bad[1]}: cannot read embeddings (" in r.stderr
    assert Store(tmp_path / "s").video_ids == ["good"]


def test_reference_csv_row_longer_than_the_csv_default_field_limit(tmp_path):
    # A long video: 2,100 segment paths in one field (~180k characters; the csv default limit is 131072).
    seg = tmp_path / "segs"
    one = segment_files(seg, "x", 1)[0]
    paths = [one.replace("/segs/", "/segs/" + "./" * (j % 7)) for j in range(2100)]
    field = json.dumps(paths)
    field += " " * max(0, 180_000 - len(field))  # whitespace around the JSON list is allowed
    assert len(field) > csv.field_size_limit()
    write_reference_csv(tmp_path / "long.csv", [{"video_filename": "long", "segment_paths": field,
                                                  "number_of_segments": 2100}])
    limit = csv.field_size_limit()
    added, _, failures = import_embeddings(tmp_path / "long.csv", tmp_path / "s")
    assert (added, failures) == (1, []) and Store(tmp_path / "s").num_segments("long") == 2100
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


def test_malformed_reference_csv_names_the_file_and_line(tmp_path, monkeypatch):
    import lvmae_fast.store_cli as store_cli

    seg = tmp_path / "segs"
    rows = [{"video_filename": f"v{i}", "segment_paths": json.dumps(segment_files(seg, f"v{i}", 1 + 5 * i)),
             "number_of_segments": 1 + 5 * i} for i in range(2)]
    write_reference_csv(tmp_path / "t.csv", rows)
    limit = csv.field_size_limit()
    monkeypatch.setattr(store_cli, "CSV_FIELD_LIMIT", len(rows[0]["segment_paths"]) + 10)  # row 2 is too long
    with pytest.raises(ValueError, match=r"t\.csv: line 3: malformed CSV \(field larger than field limit"):
        import_embeddings(tmp_path / "t.csv", tmp_path / "s")
    assert csv.field_size_limit() == limit


def test_duplicate_video_ids_in_one_csv_are_reported_not_dropped(tmp_path):
    seg = tmp_path / "segs"
    a1, a2, b = segment_files(seg, "a1", 2), segment_files(seg, "a2", 4, seed=1), segment_files(seg, "b", 1, seed=2)
    csv_path = write_reference_csv(tmp_path / "t.csv", [
        {"video_filename": vid, "segment_paths": json.dumps(paths)} for vid, paths in (("A", a1), ("B", b), ("A", a2))])
    added, skipped, failures = import_embeddings(csv_path, tmp_path / "s")
    assert (added, skipped) == (2, 0)
    assert failures == [f"A ({csv_path}#row=2): video id repeated in the source (first at {csv_path}#row=0); not imported"]
    assert Store(tmp_path / "s").num_segments("A") == 2  # the first row wins; the repeat is not silently mixed in
    # Resume: ids committed by the earlier run are skipped as before; the repeat is still reported.
    added, skipped, failures = import_embeddings(csv_path, tmp_path / "s")
    assert (added, skipped, len(failures)) == (0, 2, 1) and "repeated in the source" in failures[0]
    r = lvmae("store", "import", csv_path, "--out", tmp_path / "s")
    assert r.returncode == 1 and "(2 already present)" in r.stdout
    assert "failed: A (" in r.stderr and "video id repeated in the source" in r.stderr


def test_resume_refuses_a_different_segment_length(tmp_path):
    write_store(tmp_path / "s", random_videos(np.random.default_rng(7), 4, [3]), 4, segment_seconds=5.0)
    with pytest.raises(ValueError, match=r"holds segment_seconds=5\.0; cannot add segment_seconds=2\.0"):
        StoreWriter(tmp_path / "s", 4, segment_seconds=2.0)
    with StoreWriter(tmp_path / "s", 4, segment_seconds=5) as w:  # the same length (int or float) resumes
        w.add("more", np.ones((2, 4), np.float32))
    # The CLI: a resumed import with another --segment-seconds stops with one line and adds nothing.
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "new.npy", np.ones((3, 4), np.float32))
    r = lvmae("store", "import", src, "--out", tmp_path / "s", "--segment-seconds", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: store" in r.stderr and "segment_seconds=5.0; cannot add segment_seconds=2.0" in r.stderr
    assert Store(tmp_path / "s").video_ids == ["v0", "more"]
    r = lvmae("store", "import", src, "--out", tmp_path / "s", "--segment-seconds", "5")
    assert r.returncode == 0, r.stderr
    assert {Store(tmp_path / "s").meta(v)["segment_seconds"] for v in ("v0", "more", "new")} == {5.0}


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`lvmae store info S | head -2`: the pipe closes before the output is written. That printed
    'lvmae store info: error: [Errno 32] Broken pipe'; now nothing."""
    write_store(tmp_path / "s", random_videos(np.random.default_rng(8), 4, [2, 3]), 4)
    proc = subprocess.Popen([sys.executable, "-m", "lvmae_fast", "store", "info", str(tmp_path / "s")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported anything: its first write meets a closed pipe
    assert proc.stderr.read() == b"" and proc.wait(timeout=120) == 1


def test_info_prints_the_embedding_dtype(tmp_path):
    write_store(tmp_path / "s", random_videos(np.random.default_rng(8), 4, [2, 3]), 4)
    r = lvmae("store", "info", tmp_path / "s", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["dtype"] == "float16"
    r = lvmae("store", "info", tmp_path / "s")
    assert r.returncode == 0 and any(line.split() == ["dtype:", "float16"] for line in r.stdout.splitlines())


def test_settings_are_recorded_by_an_empty_store_and_never_mixed(tmp_path):
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((3, 4)).astype(np.float32)
    with StoreWriter(tmp_path / "imported", dim=4) as w:  # e.g. `lvmae store import`: no settings
        w.add("a", emb)
    with pytest.raises(ValueError, match="without recorded settings"):
        StoreWriter(tmp_path / "imported", dim=4, settings={"frames": 8})
    with StoreWriter(tmp_path / "empty", dim=4) as w:  # created, nothing added yet
        pass
    with StoreWriter(tmp_path / "empty", dim=4, settings={"frames": 8}) as w:
        w.add("a", emb)
    with pytest.raises(ValueError, match=r"frames=8 \(now 16\)"):
        StoreWriter(tmp_path / "empty", dim=4, settings={"frames": 16})


def test_one_writer_per_store(tmp_path):
    """A second writer (another job, `store compact`, a concurrent import) is refused while one holds the
    store, since both would take the same next shard number; the lock dies with its process."""
    path = write_store(tmp_path / "s", {"v0": np.ones((3, 4), np.float32)}, 4)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lvmae_fast.store import StoreWriter
        w = StoreWriter({str(path)!r}, 4)
        print("open", flush=True)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ValueError, match=f"open for writing by another process \\(pid {holder.pid}\\)"):
            StoreWriter(path, 4)
        r = lvmae("store", "compact", path)
        assert r.returncode != 0 and "open for writing by another process" in r.stderr
        assert Store(path).video_ids == ["v0"]  # readers are never locked out
    finally:
        holder.kill()
        holder.wait()
    with StoreWriter(path, 4) as w:  # SIGKILL released it
        w.add("v1", np.ones((2, 4), np.float32))
    with StoreWriter(path, 4) as w:  # and so did close()
        assert w.contains("v1")
    assert Store(path).video_ids == ["v0", "v1"]


def test_a_killed_writers_forked_children_do_not_keep_its_lock(tmp_path):
    """A pretrain's DataLoader workers are forks: they shared the lock's open file, so after a SIGKILL of the
    main process the lock stayed held until the workers noticed (seconds), and the --resume meant to follow
    was refused naming the dead pid. The children close their copy at fork; the parent's lock holds."""
    path = write_store(tmp_path / "s", {"v0": np.ones((3, 4), np.float32)}, 4)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from lvmae_fast.store import StoreWriter
        w = StoreWriter({str(path)!r}, 4)
        if os.fork() == 0:   # the child says its pid once fork returned there, i.e. after the at-fork hooks
            print(os.getpid(), flush=True)   # (on a busy machine it may run long after the parent)
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ValueError, match="open for writing by another process"):
            StoreWriter(path, 4)   # the parent (alive) holds it, its child's copy closed or not
        holder.kill()
        holder.wait()
        with StoreWriter(path, 4) as w:   # at once, while the child still runs
            w.add("v1", np.ones((2, 4), np.float32))
        os.kill(child, 0)   # (still alive: raises ProcessLookupError otherwise)
    finally:
        holder.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert Store(path).video_ids == ["v0", "v1"]


def test_a_filesystem_without_flock_writes_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some FUSE mounts (bucket filesystems) answer flock with ENOSYS/EOPNOTSUPP: the store (and a run dir)
    is still written, with a warning that the one-writer guard is off, not refused with a traceback."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        with StoreWriter(tmp_path / "s", dim=4) as w:
            w.add("v0", np.ones((3, 4), np.float32))
    assert Store(tmp_path / "s").video_ids == ["v0"]
    assert "cannot lock .lock (Function not implemented); going on without the one-writer guard" in caplog.text


def test_truncated_shard_is_named_by_verify(tmp_path):
    path = write_store(tmp_path / "s", {"a": np.ones((3, 4), np.float32), "b": np.ones((2, 4), np.float32)}, 4,
                       shard_rows=3)
    index = json.loads((path / "index.json").read_text())
    shard = path / index["shards"][index["videos"][1]["shard"]]["emb"]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 8)  # the last row's bytes gone, header intact
    with pytest.raises(ValueError, match="truncated"):
        Store(path)
    assert verify_store(path).bad_videos == ["b"]
    r = lvmae("store", "verify", path)
    assert r.returncode == 2 and "b" in r.stdout + r.stderr and "truncated" in r.stdout + r.stderr


@pytest.mark.parametrize("damage", ["header_zeroed", "header_paren", "shape_overflow", "empty", "times_zeroed"])
def test_a_damaged_shard_header_is_a_problem_naming_the_file(tmp_path, damage):
    """A shard header zeroed past its magic (power cut, bad copy) raised tokenize.TokenError from numpy's
    parser through verify, info, compact and every reader; an over-long shape overflowed np.prod; other
    header errors said "shard N" without the file (after a compaction N is not the file's number)."""
    path = write_store(tmp_path / "s", {"a": np.ones((3, 4), np.float32), "b": np.ones((2, 4), np.float32)}, 4,
                       shard_rows=3)
    index = json.loads((path / "index.json").read_text())
    shard = index["shards"][index["videos"][1]["shard"]]
    target = path / shard["times" if damage == "times_zeroed" else "emb"]
    data = target.read_bytes()
    if damage in ("header_zeroed", "times_zeroed"):
        damaged = data[:40] + bytes(len(data) - 40)
    elif damage == "header_paren":
        damaged = data.replace(b"}", b"(", 1)
    elif damage == "shape_overflow":  # the header's padding absorbs the longer shape: only the number is wrong
        longer = b"(99999999999999999999, 4)"
        damaged = data.replace(b"(2, 4)", longer, 1).replace(b" " * (len(longer) - 6) + b"\n", b"\n", 1)
        assert len(damaged) == len(data) and damaged != data
    else:
        damaged = b""
    target.write_bytes(damaged)
    with pytest.raises(ValueError, match=re.escape(str(target))):
        Store(path)
    assert verify_store(path).bad_videos == ["b"]
    for command in (("verify",), ("info",)):
        r = lvmae("store", *command, path)
        assert "Traceback" not in r.stderr and str(target) in r.stdout + r.stderr, (command, r.stderr)
        assert r.returncode == (2 if command == ("verify",) else 1), (command, r.returncode)


def test_info_hours_are_the_windows_own_lengths(tmp_path):
    """A kept partial last window (extract --min-last) counted as a whole segment: 4 videos of 7.5 s read
    as 40 s of video."""
    times = np.array([[0, 5], [5, 7.5]], np.float32)
    with StoreWriter(tmp_path / "s", 4, segment_seconds=5.0) as writer:
        for vid in ("a", "b", "c", "d"):
            writer.add(vid, np.ones((2, 4), np.float32), window_times=times)
    r = lvmae("store", "info", tmp_path / "s", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["hours"] == round(30.0 / 3600, 3)


def test_store_files_follow_the_umask(tmp_path):
    import os
    import stat

    path = write_store(tmp_path / "s", {"a": np.ones((3, 4), np.float32)}, 4)
    umask = os.umask(0)
    os.umask(umask)
    for f in [path / "index.json", *(path / "shards").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_import_refuses_non_float_tensors_multi_row_segments_and_extract_stores(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torch.arange(8).reshape(2, 4), src / "ints.pt")
    torch.save({"embedding": torch.ones(2, 4)}, src / "ok.pt")
    added, _, failures = import_embeddings(src, tmp_path / "s")
    assert added == 1 and len(failures) == 1 and "must be floating point, got torch.int64" in failures[0]
    seg = tmp_path / "seg"
    seg.mkdir()
    torch.save({"embedding": torch.ones(2, 4)}, seg / "s0.pt")  # two rows where one embedding belongs
    csv_path = tmp_path / "ref.csv"
    csv_path.write_text('video_filename,segment_paths\nx,"[""seg/s0.pt""]"\n')
    added, _, failures = import_embeddings(csv_path, tmp_path / "s2")
    assert added == 0 and "one embedding [dim] or [1, dim], got shape [2, 4]" in failures[0]
    with pytest.raises(ValueError, match="not a .csv"):
        import_embeddings(src / "ok.pt", tmp_path / "s3")
    extracted = write_store(tmp_path / "ex", {"e": np.ones((2, 4), np.float32)}, 4, settings={"window_seconds": 5.0})
    with pytest.raises(ValueError, match="written by `lvmae extract`"):
        import_embeddings(src, extracted)


def test_index_entry_without_id_is_a_named_problem(tmp_path):
    path = write_store(tmp_path / "s", {"a": np.ones((3, 4), np.float32)}, 4)
    index = json.loads((path / "index.json").read_text())
    del index["videos"][0]["id"]
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index entry without a video id"):
        Store(path)
    r = lvmae("store", "info", path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "without a video id" in r.stderr


def _drop(entry, key):
    del entry[key]


@pytest.mark.parametrize("damage, whole_index", [
    (lambda i: _drop(i["videos"][0], "segment_seconds"), False),  # verify said OK; info/pretrain: KeyError
    (lambda i: _drop(i["videos"][0], "source"), False),
    (lambda i: i["videos"][0].update(n=3.0), False),
    (lambda i: i["videos"].__setitem__(0, "abc"), False),        # AttributeError
    (lambda i: _drop(i["shards"][0], "rows"), False),             # KeyError in verify too
    (lambda i: i["shards"][0].update(emb=5), False),              # TypeError
    (lambda i: i.update(shards=None), True),                      # TypeError
    (lambda i: i.update(videos={}), True),
    (lambda i: i.update(dim="4"), True),
    (lambda i: i.update(segment_seconds="five"), True),
])
def test_a_malformed_index_is_a_problem_for_verify_and_one_line_for_readers(tmp_path, capsys, damage, whole_index):
    from lvmae_fast.cli import main
    from lvmae_fast.store import verify_store

    path = write_store(tmp_path / "s", {"a": np.ones((3, 4), np.float32), "b": np.ones((2, 4), np.float32)}, 4)
    index = json.loads((path / "index.json").read_text())
    damage(index)
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="malformed index"):
        Store(path)
    if whole_index:  # no entry to name: the index itself is refused, by verify too
        with pytest.raises(ValueError, match="malformed index"):
            verify_store(path)
    else:
        assert any("malformed index entry" in p.message for p in verify_store(path).problems)
    capsys.readouterr()
    assert main(["store", "info", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed index" in err[0], err


def test_import_records_absolute_sources(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "a.npy", np.ones((2, 4), np.float32))
    monkeypatch.chdir(tmp_path)
    import_embeddings("src", "s")
    assert Store(tmp_path / "s").meta("a")["source"] == str(tmp_path / "src" / "a.npy")


def test_verify_problem_lines_quote_ids_that_need_it(tmp_path):
    """Per-problem lines printed ids as they are: `  new<newline>line: 1 of 10 rows hold NaN/Inf` read as
    two lines, and trailing spaces vanished. They now JSON-quote such ids, as the summary line does;
    plain ids stay unquoted."""
    rng = np.random.default_rng(5)
    src = tmp_path / "emb"
    src.mkdir()
    ids = ["plain", "  new\nline", "trail ", 'say "hi"', "ok"]
    for i, vid in enumerate(ids):
        np.save(src / f"{vid}.npy", rng.standard_normal((5 + 5 * i, 32)).astype(np.float32))
    r = lvmae("store", "import", src, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for v in index["videos"]:
        if v["id"] != "ok":
            emb = np.load(tmp_path / "s" / index["shards"][v["shard"]]["emb"], mmap_mode="r+")
            emb[v["offset"], 0] = np.nan
            emb.flush()
    r = lvmae("store", "verify", tmp_path / "s")
    assert r.returncode == 2
    lines = r.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(['  plain: 1 of 5 rows hold NaN/Inf', '  "  new\\nline": 1 of 10 rows hold NaN/Inf',
                                         '  "trail ": 1 of 15 rows hold NaN/Inf',
                                         '  "say \\"hi\\"": 1 of 20 rows hold NaN/Inf'])
    assert lines[-1].endswith('bad videos (4): "  new\\nline" plain "say \\"hi\\"" "trail "')


def test_a_full_disk_during_a_commit_or_compaction_keeps_the_store_and_stops_the_import(tmp_path, monkeypatch,
                                                                                     capsys):
    """ENOSPC while a commit writes its shards or journal line: the shards already written for it are
    removed, the committed videos still load, `store import` stops with one line (not a per-video failure
    for a video that is no worse than the others) and a rerun after freeing space completes the store."""
    import errno

    import lvmae_fast.store as store_mod
    from lvmae_fast.atomic import WriteError
    from lvmae_fast.cli import main

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.save(src / f"v{i}.npy", rng.standard_normal((10, 8)).astype(np.float32))
    real_save, calls = np.save, []

    def save(f, arr, *a, **k):  # the emb shard of the 2nd commit is written, then its times shard fails
        calls.append(1)
        if len(calls) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(store_mod.np, "save", save)
    out = tmp_path / "st"
    assert main(["store", "import", str(src), "--out", str(out), "--shard-rows", "20"]) == 1
    err = capsys.readouterr().err
    assert err == (f"lvmae store import: error: could not commit 2 videos to store {out}: No space left on device "
                   "(2 videos committed before are intact; rerunning resumes after them)\n")
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["emb-00000.npy", "times-00000.npy"]
    assert Store(out).video_ids == ["v0", "v1"] and verify_store(out).ok
    monkeypatch.setattr(store_mod.np, "save", real_save)
    assert main(["store", "import", str(src), "--out", str(out), "--shard-rows", "20"]) == 0
    assert Store(out).video_ids == [f"v{i}" for i in range(6)] and verify_store(out).ok

    # A failed journal append (the commit point) of a direct writer: nothing visible, no shard left.
    w = StoreWriter(tmp_path / "j", 8, shard_rows=1000)
    w.add("a", np.ones((3, 8)))
    w.commit()
    w.add("b", np.ones((3, 8)))

    def no_journal(path, record):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod, "_append_journal_line", no_journal)
    with pytest.raises(WriteError, match="could not commit 1 videos to store .*: Input/output error"):
        w.commit()
    assert sorted(p.name for p in (tmp_path / "j" / "shards").iterdir()) == ["emb-00000.npy", "times-00000.npy"]
    assert Store(tmp_path / "j").video_ids == ["a"]
    monkeypatch.undo()
    w.close()  # space is back: the buffered video commits
    assert Store(tmp_path / "j").video_ids == ["a", "b"]

    # compact: the merged shards go, the old index and shards stay.
    with StoreWriter(tmp_path / "c", 8, shard_rows=100) as w:
        for i in range(4):
            w.add(f"c{i}", np.full((3, 8), float(i)))
            w.commit()
    before = sorted(p.name for p in (tmp_path / "c" / "shards").iterdir())

    def full_index(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_atomic_save_json", full_index)
    assert main(["store", "compact", str(tmp_path / "c")]) == 1
    assert "could not compact store" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == before
    assert [float(Store(tmp_path / "c").get(f"c{i}")[0, 0]) for i in range(4)] == [0, 1, 2, 3]


def test_a_directory_sync_failing_after_the_rename_keeps_what_is_already_visible(tmp_path, monkeypatch, caplog):
    """The rename of index.json is done (readers see the new index) when the directory fsync fails: the
    commit must not be reported failed and undone (its shards deleted under the index that names them),
    only warned about."""
    import errno

    import lvmae_fast.atomic as atomic_mod

    def no_dir_sync(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic_mod, "fsync_dir", no_dir_sync)
    with caplog.at_level("WARNING", logger="lvmae_fast.atomic"):
        with StoreWriter(tmp_path / "s", 8) as w:
            w.add("a", np.ones((3, 8)))
            w.commit()   # the first commit writes index.json itself
            w.add("b", np.full((2, 8), 2.0))
    monkeypatch.undo()
    assert Store(tmp_path / "s").video_ids == ["a", "b"] and verify_store(tmp_path / "s").ok
    assert float(Store(tmp_path / "s").get("b")[0, 0]) == 2.0
    assert any("could not sync its directory (Input/output error)" in r.message and "index.json" in r.message
               for r in caplog.records)


def test_verify_during_a_compaction_rereads_the_index_it_checked(tmp_path, monkeypatch):
    # verify checked the index it read first: a compaction that deleted those shards since made a sound
    # store "damaged" (2780 problems in a review's run), where readers re-read the index.
    import lvmae_fast.store as S

    rng = np.random.default_rng(9)
    w = StoreWriter(tmp_path / "s", dim=3, shard_rows=16)
    for vid, emb in random_videos(rng, 3, [5, 1, 7, 2]).items():
        w.add(vid, emb)
        w.commit()
    before = S.load_index(tmp_path / "s")
    assert w.compact() > 0
    w.close()
    reads = iter([before])
    real = S.load_index
    monkeypatch.setattr(S, "load_index", lambda path: next(reads, None) or real(path))
    report = verify_store(tmp_path / "s")
    assert report.ok, [str(p) for p in report.problems[:3]]


def test_a_journal_folded_between_a_readers_two_reads_reads_the_new_snapshot(tmp_path, monkeypatch):
    # is_file() saw the journal, the writer folded it away, read_bytes() raised FileNotFoundError.
    import lvmae_fast.store as S

    rng = np.random.default_rng(10)
    w = StoreWriter(tmp_path / "s", dim=3)
    videos = random_videos(rng, 3, [2, 3, 1])
    for vid, emb in videos.items():
        w.add(vid, emb)
        w.commit()
    journal = tmp_path / "s" / S.JOURNAL_NAME
    assert journal.is_file()
    real_read_bytes = Path.read_bytes
    folded = []

    def read_bytes(self):
        if self == journal and not folded:
            folded.append(True)
            w._fold()  # the writer, between the reader's is_file() and read_bytes()
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert [v["id"] for v in S.load_index(tmp_path / "s")["videos"]] == list(videos) and folded
    w.close()


def test_reference_csv_with_a_short_row_or_a_bom_imports_the_rest_by_their_names(tmp_path):
    seg = tmp_path / "segs"
    paths = segment_files(seg, "a", 2)
    import io

    rows = io.StringIO()
    csv.writer(rows).writerows([["video_filename", "segment_paths", "number_of_segments"],
                                ["a.mp4", json.dumps(paths), 2], ["b.mp4"], ["c.mp4", json.dumps(paths), 2]])
    (tmp_path / "seg.csv").write_text("\ufeff" + rows.getvalue(), encoding="utf-8")
    r = lvmae("store", "import", tmp_path / "seg.csv", "--out", tmp_path / "s")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # a traceback stopped at b.mp4
    assert "b.mp4" in r.stderr and "no segment_paths" in r.stderr
    assert Store(tmp_path / "s").video_ids == ["a.mp4", "c.mp4"]  # the BOM made them row numbers


def test_import_into_an_empty_store_takes_the_arrays_dim(tmp_path):
    StoreWriter(tmp_path / "s", dim=8).close()
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", np.ones((2, 16), np.float32))
    added, skipped, failures = import_embeddings(tmp_path / "d", tmp_path / "s")
    assert (added, skipped, failures) == (1, 0, [])
    assert Store(tmp_path / "s").dim == 16


def test_an_id_from_a_non_utf8_file_name_prints_on_a_strict_utf8_stdout():
    import os

    from lvmae_fast.store import show_id

    shown = show_id(os.fsdecode(b"caf\xe9"))
    assert shown.encode("utf-8") and json.loads(shown) == os.fsdecode(b"caf\xe9")  # escaped, not raw surrogates
    assert show_id("my clip") == '"my clip"' and show_id("café") == "café"


def test_the_docs_numpy_only_reader_reads_a_killed_writers_store_and_refuses_a_damaged_journal(tmp_path, monkeypatch):
    """docs/store.md's reader (json + numpy alone), run as written: a killed writer leaves its journal,
    holding committed videos, which the reader applies (the docs once said the journal exists only while a
    writer is busy); a bad line with lines after it is damage, refused as lvmae_fast refuses it (the
    snippet used to stop there and return part of the store)."""
    from lvmae_fast.store import JOURNAL_NAME

    doc = (Path(REPO) / "docs" / "store.md").read_text()
    snippet = re.search(r"Reading without lvmae_fast:\n\n```python\n(.*?)```", doc, re.S).group(1)
    rng = np.random.default_rng(5)
    videos = random_videos(rng, 4, [2, 3, 1, 4])
    killed_writer_store(tmp_path / "STORE", videos)  # index.json holds the first video, the journal the others
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "docs/store.md", "exec"), scope)
    assert [v["id"] for v in scope["index"]["videos"]] == Store(tmp_path / "STORE").video_ids == list(videos)
    np.testing.assert_array_equal(scope["emb"], Store(tmp_path / "STORE").get(list(videos)[0]))
    journal = tmp_path / "STORE" / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="index.journal line 2 is damaged"):
        exec(compile(snippet, "docs/store.md", "exec"), {})
    journal.write_text("\n".join([*lines, '{"seq": 9, "sh']) + "\n")   # a torn last line: a kill, read past
    scope = {}
    exec(compile(snippet, "docs/store.md", "exec"), scope)
    assert len(scope["index"]["videos"]) == len(videos)


def test_import_takes_suffixes_in_any_case(tmp_path):
    """B.NPY, c.Npy and D.PT were skipped without a word (extract's folder input takes .MP4 alike), and a
    reference CSV named ref.CSV was refused as 'a file but not a .csv'."""
    src = tmp_path / "emb"
    src.mkdir()
    arrays = {name: np.full((2, 4), k, np.float32) for k, name in enumerate(["a", "B", "c", "D"])}
    for name, suffix in (("a", ".npy"), ("B", ".NPY"), ("c", ".Npy")):
        np.save(src / f"{name}.npy", arrays[name])
        (src / f"{name}.npy").rename(src / f"{name}{suffix}")
    torch.save(torch.from_numpy(arrays["D"]), src / "D.PT")
    added, _, failures = import_embeddings(src, tmp_path / "s")
    assert (added, failures) == (4, [])
    store = Store(tmp_path / "s")
    for name, arr in arrays.items():
        np.testing.assert_array_equal(store.get(name), arr.astype(np.float16))
    seg = tmp_path / "seg.pt"
    torch.save({"embedding": torch.ones(4)}, seg)
    with open(tmp_path / "ref.CSV", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["segment_idx", "video_filename", "segment_paths", "number_of_segments", "label", "label_name"])
        writer.writerow([0, "movie", str([str(seg)]), 1, 0, "x"])
    added, _, failures = import_embeddings(tmp_path / "ref.CSV", tmp_path / "r", encoder="languagebind")
    assert (added, failures) == (1, [])


def test_parse_path_list_reads_every_escape_python_writes():
    """pandas writes a list column as str(list): a no-break space, a zero-width space or a carriage
    return in a name comes out as \\xa0, \\u200b, \\r, which were kept literally (file not found). A
    hand-written Windows path Python would not read keeps its backslashes."""
    names = ["clip\xa01_s0.pt", "zw\u200bsp.pt", "cr\rx.pt", "tab\there.pt", "it's.pt", 'q"d.pt', "C:\\x\\y.pt"]
    assert parse_path_list(str(names)) == names
    assert parse_path_list(r"['C:\data\x1.pt']") == ["C:\\data\\x1.pt"]


def test_import_folder_reports_broken_links_and_leaves_hidden_files_out(tmp_path):
    """A dangling link (its target moved) was dropped without a word and the import exited 0; macOS's
    ._a.npy beside a.npy failed the import and a hidden .b.npy became the id '.b'."""
    src = tmp_path / "emb"
    src.mkdir()
    np.save(src / "a.npy", np.ones((2, 4), np.float32))
    (src / "._a.npy").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    np.save(src / ".b.npy", np.ones((2, 4), np.float32))
    (src / "moved.npy").symlink_to(tmp_path / "gone" / "moved.npy")
    added, _, failures = import_embeddings(src, tmp_path / "s")
    assert added == 1 and Store(tmp_path / "s").video_ids == ["a"]
    assert len(failures) == 1 and failures[0].startswith("moved (") and "No such file" in failures[0]


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), 1e39, 1e-300, 0.0])
def test_segment_seconds_must_be_finite_as_stored(tmp_path, seconds):
    """An inf segment length wrote 'Infinity' into index.json, which no reader then opened; 1e39 made every
    default window time inf in float32, 1e-300 every one 0.0."""
    with pytest.raises(ValueError, match=r"segment_seconds \(.*\) finite and >= 0.001"):
        StoreWriter(tmp_path / "s", 4, segment_seconds=seconds)
    with StoreWriter(tmp_path / "s", 4, segment_seconds=3e38) as w:  # finite, but row 2's times overflow
        with pytest.raises(ValueError, match=r"window_times must be finite in float32 .*by default row i covers"):
            w.add("v", np.ones((3, 4), np.float32))


def test_a_killed_writers_index_temp_file_is_removed_by_the_next_writer(tmp_path):
    """A writer killed inside an index write leaves an index-sized .index.json.*.tmp; nothing removed it."""
    with StoreWriter(tmp_path / "s", 4) as w:
        w.add("a", np.ones((2, 4), np.float32))
    stale = tmp_path / "s" / ".index.json.k1ll.tmp"
    stale.write_text('{"videos": [')
    with StoreWriter(tmp_path / "s", 4) as w:
        w.add("b", np.ones((2, 4), np.float32))
    assert not stale.exists() and Store(tmp_path / "s").video_ids == ["a", "b"]


def test_a_job_error_is_not_hidden_by_the_writers_failing_close(tmp_path, monkeypatch, caplog):
    """A full disk stopped an extract job with 'could not save embedded windows ...'; the writer's close
    then failed on the same disk and its 'could not write index.json' was the error shown."""
    import errno

    from lvmae_fast import store as store_module

    w = StoreWriter(tmp_path / "s", 4)
    w.add("a", np.ones((2, 4), np.float32))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_atomic_save_json", full)
    monkeypatch.setattr(StoreWriter, "commit", lambda self: full())
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="the job's own error"):
        with w:
            raise ValueError("the job's own error")
    assert "were not saved (No space left on device); a re-run redoes them" in caplog.text
    monkeypatch.undo()
    with StoreWriter(tmp_path / "s", 4) as again:   # the lock was released
        again.add("b", np.ones((2, 4), np.float32))


def test_compaction_keeps_few_shard_files_open(tmp_path):
    """Compaction gathered views of every small shard into one group, keeping each shard's map (an open
    file) alive: ~1000 shards failed with 'Too many open files' under the default limit of 1024."""
    import resource

    with StoreWriter(tmp_path / "s", 4, shard_rows=1 << 16) as w:
        for k in range(120):
            w.add(f"v{k}", np.full((1, 4), k, np.float32))
            w.commit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))   # fewer than the 240 shard files
    try:
        with StoreWriter(tmp_path / "s", 4) as w:
            w.compact()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    store = Store(tmp_path / "s")
    assert len(store.video_ids) == 120 and all(store.get(f"v{k}")[0, 0] == k for k in range(120))


def test_a_reader_keeps_its_maps_within_the_descriptor_limit(tmp_path):
    """256 maps whatever the limit: under `ulimit -n 64`, store verify of a 125-shard store ran out of
    descriptors. A quarter of the soft limit at most."""
    import resource

    write_store(tmp_path / "s", {f"v{i}": np.full((2, 4), i, np.float32) for i in range(60)}, 4, shard_rows=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))
    try:
        store = Store(tmp_path / "s")
        assert store._map_limit == 12
        assert verify_store(tmp_path / "s").problems == []   # every shard read, within 48 descriptors
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_symlink_loop_in_an_import_folder_is_a_failure_and_the_rest_is_imported(tmp_path):
    """A self-linked loop.npy raised RuntimeError (Path.resolve on a loop) mid-import: the files after it
    were never imported, and every re-run stopped at the same place."""
    src = tmp_path / "src"
    src.mkdir()
    for vid in ("a", "z"):
        np.save(src / f"{vid}.npy", np.ones((3, 4), np.float32))
    (src / "loop.npy").symlink_to("loop.npy")
    r = lvmae("store", "import", src, "--out", tmp_path / "s")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "loop.npy" in r.stderr, r.stderr
    assert Store(tmp_path / "s").video_ids == ["a", "z"]


def _under_file_size_limit(limit_bytes):
    """preexec_fn for a child whose files may grow to limit_bytes (writes past it fail with EFBIG)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


@pytest.mark.parametrize("command", ["import", "compact"])
def test_a_shard_cut_short_by_the_file_size_limit_is_an_error_not_a_committed_store(tmp_path, command):
    """np.save on a real file writes its data with C stdio and ignores the final flush's error: under a
    file-size limit a shard came out up to 4 KiB short without a word, `store import` said "imported 1
    videos" (exit 0) and `store compact` swapped the cut shards in and deleted the intact ones. Now the
    write fails in one line and the store stays as it was (verify passes, a rerun completes)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4 if command == "compact" else 1):
        np.save(src / f"v{k}.npy", rng.standard_normal((63, 32)).astype(np.float32))  # float16 in the store: 4032 bytes
    store = tmp_path / "s"
    args = ["store", "import", src, "--out", store]
    if command == "compact":
        assert lvmae(*args, "--shard-rows", "63").returncode == 0   # one shard per video
        args = ["store", "compact", store, "--shard-rows", "400"]   # one shard of 4 x 4032 bytes: past the limit
        limit = 8192
    else:
        limit = 4096  # the header's 128 bytes + 4032 of data: the last 64 bytes fail to flush
    r = subprocess.run([sys.executable, "-m", "lvmae_fast", *map(str, args)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, preexec_fn=_under_file_size_limit(limit))
    assert r.returncode == 1 and "File too large" in r.stderr and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    if command == "compact" or (store / "index.json").exists():  # a first commit that failed leaves no index
        assert verify_store(store).ok
    r = lvmae(*args)
    assert r.returncode == 0, r.stderr
    assert verify_store(store).ok
    for k in range(4 if command == "compact" else 1):
        np.testing.assert_array_equal(Store(store).get(f"v{k}"), np.load(src / f"v{k}.npy").astype(np.float16))


def test_a_path_that_is_not_utf8_is_printed_escaped_not_an_error(tmp_path):
    """Under a strict UTF-8 stdout (PYTHONIOENCODING=utf-8, or a UTF-8 locale's default) printing a store path
    holding a non-UTF-8 byte raised UnicodeEncodeError: a finished import/extract/pretrain exited 1."""
    import os

    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "a.npy", np.ones((3, 4), np.float32))
    out = os.fsdecode(bytes(tmp_path) + b"/st\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    for args in (["store", "import", src, "--out", out], ["store", "info", out], ["store", "verify", out]):
        r = subprocess.run([sys.executable, "-m", "lvmae_fast", *map(str, args)], capture_output=True, timeout=120,
                           cwd=REPO, env=env)
        assert r.returncode == 0, (args, r.stderr.decode(errors="replace"))
        assert b"st\xff" in r.stdout + r.stderr, (args, r.stdout)  # the name's own byte


def test_a_ctrl_c_numpy_turns_into_a_type_error_is_an_interrupt(tmp_path, monkeypatch, capsys):
    """numpy's fromfile/tofile read a KeyboardInterrupt raised in their os.PathLike check as "not a path" and
    raise TypeError: a Ctrl-C while `store import` read a file made that (good) file a failure and the
    import went on (exit 1); one while a shard was written was a TypeError traceback. Both are interrupts."""
    import lvmae_fast.store_cli as store_cli
    from lvmae_fast.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for vid in ("a", "b"):
        np.save(src / f"{vid}.npy", np.ones((3, 4), np.float32))

    def as_numpy_does(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedReader")

    with monkeypatch.context() as patch:
        patch.setattr(store_cli.np, "load", as_numpy_does)
        assert main(["store", "import", str(src), "--out", str(tmp_path / "s")]) == 130
    assert capsys.readouterr().err.strip() == "lvmae store import: interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(StoreWriter, "commit", as_numpy_does)
        assert main(["store", "import", str(src), "--out", str(tmp_path / "s2")]) == 130
    assert capsys.readouterr().err.strip() == "lvmae store import: interrupted"
    assert main(["store", "import", str(src), "--out", str(tmp_path / "s")]) == 0


def test_a_ctrl_c_while_torch_loads_stops_the_command(monkeypatch, capsys):
    """torch's C start-up imports numpy and clears an error raised there: a Ctrl-C landing in it was lost
    and the command ran to its end (hours, for pretrain). It is noted while the CLI starts."""
    import os

    from lvmae_fast import cli

    real = cli.build_parser

    def swallowing_start_up():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass   # as torch's start-up does
        return real()

    monkeypatch.setattr(cli, "build_parser", swallowing_start_up)
    assert cli.main(["store", "info", "/nonexistent"]) == 130  # not 1: the command did not run
    assert capsys.readouterr().err.strip() == "lvmae: interrupted while starting"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_path_the_terminal_cannot_encode_is_escaped_and_the_streams_come_back(tmp_path):
    """surrogateescape alone (the first fix for non-UTF-8 names) raised on any other character the stream
    cannot encode: under a latin-1 or ASCII stderr an error naming 视频store was lost ("lost sys.stderr")
    where Python's default escapes it. And main() left a Python caller's streams reconfigured."""
    import os

    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    r = subprocess.run([sys.executable, "-m", "lvmae_fast", "store", "info", str(tmp_path / "视频store")],
                       capture_output=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 1 and b"no embedding store at" in r.stderr and b"\\u89c6\\u9891store" in r.stderr, r.stderr
    probe = ("import sys; from lvmae_fast.cli import main; before = sys.stderr.errors; "
             "main(['store', 'info', sys.argv[1]]); assert sys.stderr.errors == before, sys.stderr.errors; "
             "print('caf\\u00e9', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "none")], capture_output=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and r.stderr.strip().endswith(b"caf\\xe9"), r.stderr
