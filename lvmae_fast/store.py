"""Embedding store: one d-dim embedding per S-second segment per video, written once, read many times.

Layout (numpy + json are enough to read it; see docs/store.md)::

    STORE/
      index.json                 the committed index snapshot; written atomically (temp file + rename)
      index.journal              commits since the snapshot, one fsynced JSON line each (see load_index)
      shards/emb-00000.npy       float16 [rows, dim]: one contiguous matrix, np.load(..., mmap_mode="r")
      shards/times-00000.npy     float32 [rows, 2]: start/end seconds of each row's window
      shards/...                 one pair per shard

    index.json = {"format": "lvmae-embedding-store", "version": 1, "dim": 1024, "encoder": "languagebind",
                  "segment_seconds": 5.0, "dtype": "float16",
                  "shards": [{"emb": "shards/emb-00000.npy", "times": "shards/times-00000.npy", "rows": 8123}],
                  "videos": [{"id": "abc", "shard": 0, "offset": 0, "n": 120, "segment_seconds": 5.0,
                              "source": "/data/abc.mp4"}, ...]}

Video v's embeddings are rows [offset, offset + n) of shard `shard` (a video never spans shards), so a
random crop is one contiguous slice of a memory map. Reading without this package::

    index = json.load(open("STORE/index.json"))
    v = index["videos"][0]
    shard = index["shards"][v["shard"]]
    emb = np.load("STORE/" + shard["emb"], mmap_mode="r")[v["offset"]: v["offset"] + v["n"]]

Writers (StoreWriter) buffer videos and write whole shards, each via temp file + rename, then commit
them with one journal line (the first commit writes index.json; once the journal outgrows the snapshot, and on close
the journal is folded into a new index.json). The numpy-only snippet above ignores the journal: it is
exact only for stores whose last writer closed; a busy or killed writer's journal holds committed
videos, and docs/store.md shows how to apply it. A shard that no committed index names is garbage from a killed
writer: readers never see it and the next writer deletes it. Re-opening a store with StoreWriter
resumes (dim, encoder and segment_seconds must match the store): `contains(video_id)` tells an importer what to skip.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import (WRITE_ERRORS, append_whole, atomic_save_npy, atomic_write_text, remove_stale_temps, write_error,
                     write_reason)

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
JOURNAL_NAME = "index.journal"
# The writer folds the journal into a new index.json once the journal is as large as the snapshot: the
# snapshot at least doubles between folds, so a job's total index writes stay linear in its size.
FOLD_MIN_BYTES = 1 << 16
SHARD_DIR = "shards"
STORE_FORMAT, STORE_VERSION = "lvmae-embedding-store", 1
EMB_DTYPE, TIMES_DTYPE = np.dtype(np.float16), np.dtype(np.float32)
DEFAULT_SHARD_ROWS = 1 << 16  # 128 MiB per shard at d=1024 in float16
# Seconds per row, at least: a millisecond (per-frame embeddings at any frame rate fit). Far below, float32
# window times read 0 for every row (1e-300), and an extract window count or a crop's duration / seconds
# left int64.
MIN_SEGMENT_SECONDS = 1e-3


def segment_seconds_ok(seconds) -> bool:
    """Seconds per row a new store, an import or an extraction accepts (StoreWriter also bounds them by
    float32's largest, as window times are stored)."""
    return math.isfinite(seconds) and seconds >= MIN_SEGMENT_SECONDS
# Memory maps a Store keeps open (each holds a file descriptor and a kernel mapping). An extracted store
# has about one shard per commit, so an unbounded cache runs out of descriptors on large stores. A quarter
# of the process's descriptor limit at most (`ulimit -n 64`: `store verify` of 125 shards ran out).
MAX_OPEN_MAPS = 256


def _max_open_maps() -> int:
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):   # not Unix
        return MAX_OPEN_MAPS
    return MAX_OPEN_MAPS if soft == resource.RLIM_INFINITY else max(8, min(MAX_OPEN_MAPS, soft // 4))


def _atomic_save_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))  # ASCII: no locale's encoding matters


def _remove_files(paths) -> None:
    """Best effort (after a failed write, whose error is the one to report)."""
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def _append_journal_line(path: Path, record: dict) -> None:
    # One line, fsynced: the commit point. A kill mid-write leaves a torn last line that readers ignore;
    # a failed append (ENOSPC, EIO) leaves no line behind: a retried commit would append after it, and
    # readers stop at the torn or repeated line, hiding every later commit.
    with open(path, "ab", buffering=0) as f:
        append_whole(f, json.dumps(record, separators=(",", ":")).encode() + b"\n", sync=True)


def read_npy_header(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a .npy file without reading or mapping its data; a file shorter than its
    header says (cut by a full disk or a bad copy) is refused, since mapping it fails only later."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = reader[version](f)
        except Exception as err:  # noqa: BLE001 - numpy's parser raises ValueError, TokenError, SyntaxError...
            raise ValueError(f"{path}: not a readable .npy header ({err})") from None
        data_start = f.tell()
        size = os.fstat(f.fileno()).st_size
    if fortran_order:
        raise ValueError(f"{path}: Fortran-ordered array; shards must be C-contiguous")
    needed = math.prod(int(n) for n in shape) * dtype.itemsize  # Python ints: a damaged shape cannot overflow
    if size - data_start < needed:
        raise ValueError(f"{path}: truncated: holds {size - data_start} data bytes, its header needs {needed}")
    return shape, dtype


def default_window_times(n: int, segment_seconds: float) -> np.ndarray:
    """[n, 2] float32: row i covers [i*S, (i+1)*S) seconds."""
    starts = np.arange(n, dtype=np.float64) * segment_seconds
    return np.stack([starts, starts + segment_seconds], 1).astype(TIMES_DTYPE)


class _StaleSnapshot(Exception):
    """The journal starts after the index.json we read: a writer folded it between our two reads."""


# Reads of index.json + journal before a reader gives up on a writer that keeps folding under it.
SNAPSHOT_READS = 5


def load_index(path) -> dict:
    """The committed index: the index.json snapshot plus the journal lines committed after it."""
    index_path = Path(path) / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"no embedding store at {path} ({INDEX_NAME} missing); "
                                f"create one with `lvmae store import`")
    for _ in range(SNAPSHOT_READS):
        index = _read_snapshot(index_path)
        try:
            records = read_journal(Path(path) / JOURNAL_NAME, after=index["journal_seq"])
        except _StaleSnapshot:
            continue  # the writer replaced index.json after we read it: read both again
        for record in records:
            index["shards"].extend(record["shards"])
            index["videos"].extend(record["videos"])
            index["journal_seq"] = record["seq"]
        return index
    raise ValueError(f"{Path(path) / JOURNAL_NAME} starts after {index_path} in {SNAPSHOT_READS} reads of both "
                     f"(a writer folding it each time, or a journal that is not this snapshot's)")


def _read_snapshot(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path} is not valid JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        raise ValueError(f"{index_path} is not an lvmae embedding store index")
    if index.get("version") != STORE_VERSION:
        raise ValueError(f"{index_path}: store version {index.get('version')} is not supported (expected {STORE_VERSION})")
    for key in ("dim", "encoder", "segment_seconds", "shards", "videos"):
        if key not in index:
            raise ValueError(f"{index_path}: missing key {key!r}")
    if not (isinstance(index["shards"], list) and isinstance(index["videos"], list) and _is_count(index["dim"])
            and index["dim"] >= 1 and _is_seconds(index["segment_seconds"])):
        raise ValueError(f"{index_path}: malformed index (shards and videos must be lists, dim an int >= 1, "
                         f"segment_seconds a number > 0)")
    index.setdefault("journal_seq", 0)
    if not _is_count(index["journal_seq"]) or index["journal_seq"] < 0:
        raise ValueError(f"{index_path}: malformed index (journal_seq must be an int >= 0, "
                         f"got {index['journal_seq']!r})")
    return index


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_seconds(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def read_journal(path: Path, after: int) -> list[dict]:
    """Journal records with seq after+1, after+2, ... in order. Reading stops at a last line that is torn
    (a writer killed mid-append: nothing after it was committed). A bad line with more lines after it is
    damage, not a kill, and a ValueError: the lines after it may be committed videos, which a writer
    folding the journal up to the bad line would drop (and delete their shards)."""
    if not path.is_file():
        return []  # none since the snapshot (or folded before we looked: our snapshot is then an earlier commit)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _StaleSnapshot from None  # folded between the two calls: into a newer index.json than ours
    records, expected = [], after + 1
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        problem = None
        try:
            record = json.loads(line)
        except ValueError:
            problem = "not JSON"
        else:
            if not (isinstance(record, dict) and {"seq", "shards", "videos"} <= set(record) and _is_count(record["seq"])
                    and isinstance(record["shards"], list) and isinstance(record["videos"], list)):
                problem = "not a journal record"
            elif record["seq"] <= after:  # already folded into the snapshot (a fold killed before truncating)
                continue
            elif number == 1 and record["seq"] > expected:  # a newer snapshot's journal
                raise _StaleSnapshot
            elif record["seq"] != expected:
                problem = f"seq {record['seq']} where {expected} was next"
        if problem is not None:
            following = sum(1 for rest in lines[number:] if rest.strip())
            if following:
                raise ValueError(f"{path}: line {number} is damaged ({problem}) and {following} more line(s) "
                                 f"follow it, so it is no write cut short by a kill; the store is refused so that "
                                 f"no writer drops the videos recorded after it (restore the file from a backup)")
            break
        records.append(record)
        expected += 1
    return records


LAYOUT_KEYS = ("shard", "offset")  # where a video's rows sit: compaction moves them, content stays


def index_fingerprint(index: dict) -> str:
    """sha256 of what the store holds: header, settings and each video's id, length, segment length
    and source, in order. Independent of the snapshot/journal split and of the shard layout, so a
    compacted store (same videos, fewer shards) keeps its fingerprint and runs trained on it resume."""
    content = {k: v for k, v in index.items() if k not in ("journal_seq", "shards")}
    content["videos"] = [{k: v for k, v in e.items() if k not in LAYOUT_KEYS} for e in index["videos"]]
    return _sha256_json(content)


def layout_fingerprint(index: dict) -> str:
    """The fingerprint checkpoints recorded before 2026-11-26 (shard names and offsets included)."""
    return _sha256_json({k: v for k, v in index.items() if k != "journal_seq"})


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# Files a writer creates in shards/: shards and their atomic-write temps (atomic.py names them
# .<name>.<random>.tmp). A killed writer's leftovers are these; nothing else there is deleted.
OWN_SHARD_FILE = re.compile(r"^\.?(emb|times)-\d{5,}\.npy(\.[^/]*\.tmp)?$")
# What a store directory may hold before its first commit (a writer killed before it, or an extraction
# job's failures and saved windows): anything else means --out names someone else's directory.
PRE_INDEX_ENTRIES = frozenset({SHARD_DIR, JOURNAL_NAME, "failures.jsonl", "partial"})


def refuse_foreign_directory(path: Path) -> None:
    """A new store goes into a new or empty directory, or one a killed writer left: a writer deletes
    unreferenced files in shards/ and partial/, so it must never start in a directory that is not a store."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"store path {path} is a file, not a directory")
    if not path.is_dir():
        return
    foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in PRE_INDEX_ENTRIES)
    shard_dir = path / SHARD_DIR
    if shard_dir.is_dir():
        foreign += sorted(f"{SHARD_DIR}/{p.name}" for p in shard_dir.iterdir() if not OWN_SHARD_FILE.match(p.name))
    if foreign:
        raise ValueError(f"{path} is not an embedding store and not empty (it holds {', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}); write the store to a new or empty directory")


_HELD_LOCKS: "weakref.WeakSet[WriterLock]" = weakref.WeakSet()


def _close_held_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file: the flock would outlive a SIGKILLed
    # parent until every worker had noticed and exited, refusing the --resume meant to follow. Closing the
    # child's copy leaves the parent's lock in place (it holds its own descriptor). A raw descriptor: a
    # Python file object's close takes a lock that another thread of the parent may have held at the fork.
    for lock in list(_HELD_LOCKS):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class WriterLock:
    """One writer per store: an exclusive flock on STORE/.lock, held from open to close.

    Two writers would pick the same next shard number and replace each other's committed shards, and
    their journals would interleave; the lock turns that into a clear error. The kernel drops it when
    the process dies, so a killed job never leaves a stale lock behind; forked children do not hold it
    (_close_held_locks_in_child). (No-op where fcntl is missing.)"""

    NAME = ".lock"

    def __init__(self, store_path: Path, busy: str | None = None):
        """busy: the refusal when another process holds the lock ({path}, {holder} filled in); default a store's."""
        self._fd: int | None = None
        store_path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        self._fd = os.open(store_path / self.NAME, os.O_RDWR | os.O_CREAT, 0o666)
        _HELD_LOCKS.add(self)   # from here: a fork while the flock is being taken must not keep it either
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 256).decode(errors="replace").strip()
            self.release()
            busy = busy or ("store {path} is open for writing by another process ({holder}); one writer per store "
                            "at a time: wait for it to finish, or write to another store")
            raise ValueError(busy.format(path=store_path, holder=holder or "unknown")) from None
        except OSError as err:  # a filesystem without flock (some FUSE mounts: ENOSYS, EOPNOTSUPP; ENOLCK)
            self.release()
            log.warning("%s: cannot lock %s (%s); going on without the one-writer guard", store_path, self.NAME,
                        err.strerror or err)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD_LOCKS.discard(self)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self):  # a writer dropped without close() (an error path) unlocks, as a file object would
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the process exit drops the lock anyway
            pass


def stored_embeddings(video_id: str, emb, dim: int | None = None) -> np.ndarray:
    """One video's embeddings [n, dim] as the store keeps them (float16, C order), or ValueError naming
    what is wrong. dim None: any width (an import checks the file that is to fix a new store's)."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise ValueError(f"video {video_id!r}: embeddings must have shape [n, {dim or 'dim'}], got {list(emb.shape)}")
    if emb.shape[0] < 1:
        raise ValueError(f"video {video_id!r}: no segments (n=0); a video needs at least one embedding")
    if emb.shape[1] < 1:
        raise ValueError(f"video {video_id!r}: embeddings of width 0")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"video {video_id!r}: embeddings must be floating point, got {emb.dtype}")
    with np.errstate(over="ignore"):
        # C order always: astype keeps a Fortran-ordered input's layout, and shards must be C-contiguous.
        emb16 = np.ascontiguousarray(emb.astype(EMB_DTYPE))
    # Checked after the cast: float32 values beyond float16's range (65504) would become Inf.
    if not np.isfinite(emb16).all():
        bad = np.flatnonzero(~np.isfinite(emb16).all(1))
        raise ValueError(f"video {video_id!r}: non-finite embedding values (NaN/Inf, or beyond float16 range) "
                         f"in rows {bad[:10].tolist()}")
    return emb16


class StoreWriter:
    """Create or resume a store; add videos; commit atomically. See the module docstring for the layout."""

    def __init__(self, path, dim: int, encoder: str = "unknown", segment_seconds: float = 5.0,
                 shard_rows: int = DEFAULT_SHARD_ROWS, settings: dict | None = None):
        """settings: how the embeddings were made (e.g. extraction window seconds, frames, sampling rule),
        recorded in the index; resuming with different settings is refused, so one store never mixes
        embeddings made two ways."""
        # segment_seconds finite in float32, as window times are stored: an inf one wrote "Infinity" into
        # index.json, which no reader then opened ("malformed index").
        if int(dim) < 1 or shard_rows < 1 or not (segment_seconds_ok(segment_seconds)
                                                  and segment_seconds < float(np.finfo(TIMES_DTYPE).max)):
            raise ValueError(f"dim ({dim}), shard_rows ({shard_rows}) must be > 0 and segment_seconds ({segment_seconds}) "
                             f"finite and >= {MIN_SEGMENT_SECONDS:g}")
        self.path, self.dim, self.encoder = Path(path), int(dim), str(encoder)
        self._closed = True  # until the lock is held and the index read: close() then only unlocks
        if not (self.path / INDEX_NAME).exists():
            refuse_foreign_directory(self.path)  # before the lock file: leave a foreign directory untouched
        self._lock = WriterLock(self.path)
        try:
            self._open(settings, segment_seconds, shard_rows)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, settings, segment_seconds, shard_rows) -> None:
        remove_stale_temps(self.path, (INDEX_NAME,))   # a killed writer's index-sized temp file (lock held)
        self.segment_seconds, self.shard_rows = float(segment_seconds), int(shard_rows)
        settings = json.loads(json.dumps(settings)) if settings is not None else None  # as it reads back from JSON
        record_settings, replaced_seq = False, None
        existing = load_index(self.path) if (self.path / INDEX_NAME).exists() else None
        if existing is not None and not existing["videos"] and not existing["shards"]:
            # Nothing stored yet (a job that stopped before its first video, on an encoder config it then
            # fixed, say): there is nothing to keep consistent with, so the store takes this writer's header.
            log.info("store %s holds no videos yet: taking dim %d, encoder %r and these settings", self.path,
                     self.dim, self.encoder)
            replaced_seq, existing = existing["journal_seq"], None
        if existing is not None:
            # Refused as readers refuse it: a damaged entry (a file name or key garbled in the journal) would
            # make the intact shard it should name look unreferenced, and _remove_uncommitted_files would
            # delete the only copy of those videos.
            problems = check_structure(self.path, existing)
            if problems:
                raise inconsistent(self.path, problems, ", so it is not opened for writing")
            self._index = existing
            if self._index["dim"] != self.dim or self._index["encoder"] != self.encoder:
                raise ValueError(f"store {self.path} holds embeddings of encoder {self._index['encoder']!r} "
                                 f"(dim {self._index['dim']}); these are from encoder {self.encoder!r} (dim {self.dim}): "
                                 + ("write them to another store (or give the store's encoder name if they come from it)"
                                    if self._index["encoder"] != self.encoder else
                                    "same encoder name, other width: write them to another store"))
            stored = self._index.get("settings")
            if settings is not None and stored is not None and stored != settings:
                differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
                raise ValueError(f"store {self.path} was written with other settings: "
                                 + ", ".join(f"{k}={stored.get(k)!r} (now {settings.get(k)!r})" for k in differ)
                                 + "; use the same settings or another store")
            if settings is not None and stored is None:
                if self._index["videos"]:  # made some other way (e.g. imported): unknown how
                    raise ValueError(f"store {self.path} holds {len(self._index['videos'])} videos made without recorded "
                                     "settings (imported?); extract into another store so one store never mixes "
                                     "embeddings made two ways")
                record_settings = True  # an empty store takes the first settings it is given
            # Checked after settings, whose message names the extraction knob (window_seconds) behind it.
            if float(self._index["segment_seconds"]) != self.segment_seconds:
                raise ValueError(f"store {self.path} holds segment_seconds={float(self._index['segment_seconds'])}; "
                                 f"cannot add segment_seconds={self.segment_seconds} (one store, one segment length: "
                                 f"use {float(self._index['segment_seconds'])} or another store)")
        else:
            self._index = {"format": STORE_FORMAT, "version": STORE_VERSION, "dim": self.dim, "encoder": self.encoder,
                           "segment_seconds": self.segment_seconds, "dtype": EMB_DTYPE.name, "shards": [], "videos": [],
                           "journal_seq": 0}
            if settings is not None:
                self._index["settings"] = settings
            if replaced_seq is not None:  # commits append to the journal: the snapshot must hold the new header
                self._index["journal_seq"] = replaced_seq
                _atomic_save_json(self.path / INDEX_NAME, self._index)
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if (self.path / JOURNAL_NAME).exists():
            self._fold()
        if record_settings:  # in the snapshot now: commits only append journal lines of videos
            self._index["settings"] = settings
            _atomic_save_json(self.path / INDEX_NAME, self._index)
        self._remove_uncommitted_files()
        # Shard files are numbered by a counter, not by list position: compact() removes shards from the
        # list, and a position-derived name could then collide with a file the index still names.
        numbers = [int(m.group(1)) for sh in self._index["shards"] if (m := re.search(r"(\d+)\.npy$", sh["emb"]))]
        self._next_shard_number = max(numbers, default=-1) + 1
        self._committed_ids = {v["id"] for v in self._index["videos"]}
        self._pending: list[tuple[dict, np.ndarray, np.ndarray]] = []  # (video entry, emb f16, times f32)
        self._pending_ids: set[str] = set()
        self._pending_rows = 0
        self._closed = False

    def _remove_uncommitted_files(self) -> None:
        # Shards written by a killed writer after its last index commit: unreachable, so safe to delete.
        # Only files named as this module names them: anything else in shards/ is not ours to remove.
        referenced = {Path(s[k]).name for s in self._index["shards"] for k in ("emb", "times")}
        for f in (self.path / SHARD_DIR).iterdir():
            if f.name not in referenced and OWN_SHARD_FILE.match(f.name) and f.is_file():
                f.unlink()

    def __len__(self) -> int:
        return len(self._committed_ids) + len(self._pending)

    def contains(self, video_id: str) -> bool:
        return video_id in self._committed_ids or video_id in self._pending_ids

    def sources(self) -> dict[str, str]:
        """video id -> the source path recorded when it was added ("" if none), for committed videos."""
        return {v["id"]: v["source"] for v in self._index["videos"]}

    def add(self, video_id: str, emb: np.ndarray, source_path: str = "", window_times: np.ndarray | None = None) -> None:
        """Buffer one video's embeddings [n, dim]; written at the next commit (or when a shard fills up)."""
        if self._closed:
            raise ValueError("store writer is closed")
        if not isinstance(video_id, str) or not video_id:
            raise ValueError(f"video id must be a non-empty string, got {video_id!r}")
        if self.contains(video_id):
            raise ValueError(f"video {video_id!r} is already in the store")
        emb16 = stored_embeddings(video_id, emb, self.dim)
        n = emb16.shape[0]
        with np.errstate(over="ignore"):  # checked as stored: a value beyond float32 becomes inf there
            times = (default_window_times(n, self.segment_seconds) if window_times is None
                     else np.asarray(window_times, dtype=np.float64))
            stored = times.astype(TIMES_DTYPE) if times.shape == (n, 2) else times
        if times.shape != (n, 2) or not np.isfinite(stored).all() or (stored[:, 1] < stored[:, 0]).any():
            given = "" if window_times is not None else f" (by default row i covers i * {self.segment_seconds} s)"
            raise ValueError(f"video {video_id!r}: window_times must be finite in float32 [n={n}, 2] (start, "
                             f"end) with end >= start, got shape {list(times.shape)}{given}")
        times = np.ascontiguousarray(stored)
        entry = {"id": video_id, "n": int(n), "segment_seconds": self.segment_seconds, "source": str(source_path)}
        self._pending.append((entry, emb16, times))
        self._pending_ids.add(video_id)
        self._pending_rows += n
        if self._pending_rows >= self.shard_rows:
            self.commit()

    def commit(self) -> None:
        """Write every buffered video into new shards, then the index that makes them visible."""
        if not self._pending:
            return
        groups, current, rows = [], [], 0
        for item in self._pending:  # pack videos into shards of at most shard_rows rows (big videos alone)
            n = item[0]["n"]
            if current and rows + n > self.shard_rows:
                groups.append(current)
                current, rows = [], 0
            current.append(item)
            rows += n
        groups.append(current)
        # The live index is only extended once everything is on disk (and never copied: O(new videos) per commit).
        new_shards, new_videos, written = [], [], []
        index = self._index
        try:
            for group in groups:
                shard_id = len(self._index["shards"]) + len(new_shards)
                shard = self._write_shard(np.concatenate([e for _, e, _ in group]),
                                          np.concatenate([t for _, _, t in group]), written)
                offset = 0
                for entry, _, _ in group:
                    new_videos.append({**entry, "shard": shard_id, "offset": offset})
                    offset += entry["n"]
                new_shards.append(shard)
            # atomic_write fsynced shards/ after each rename: the shards are durable before the index names them.
            journaled = (self.path / INDEX_NAME).exists()
            if not journaled:
                _atomic_save_json(self.path / INDEX_NAME, {**index, "shards": index["shards"] + new_shards,
                                                           "videos": index["videos"] + new_videos})
            else:
                # Append-only journal line (O(new videos)) instead of rewriting the whole index per commit:
                # an extraction job commits after every encoder batch, for tens of thousands of videos.
                _append_journal_line(self.path / JOURNAL_NAME,
                                     {"seq": index["journal_seq"] + 1, "shards": new_shards, "videos": new_videos})
        except WRITE_ERRORS as err:
            # Disk full or I/O error: nothing of this commit is visible; its shards are removed now (not
            # left for the next writer) and the videos stay buffered, so a later commit may retry them.
            self._remove_unindexed(written)
            raise write_error(f"could not commit {len(self._pending)} videos to store {self.path}", err, self.path,
                              f" ({len(self._committed_ids)} videos committed before are intact; rerunning "
                              f"resumes after them)") from err
        if journaled:
            index["journal_seq"] += 1
        index["shards"].extend(new_shards)
        index["videos"].extend(new_videos)
        self._committed_ids.update(self._pending_ids)
        self._pending, self._pending_ids, self._pending_rows = [], set(), 0
        journal = self.path / JOURNAL_NAME
        if journal.exists() and journal.stat().st_size >= max(FOLD_MIN_BYTES, (self.path / INDEX_NAME).stat().st_size):
            self._fold()

    def _remove_unindexed(self, written: list) -> None:
        """After a failed commit or compaction: remove the shard files it wrote, except any the index on
        disk names (a journal line whose failed append could not be cut back off is visible)."""
        try:
            index = load_index(self.path)
            named = {Path(sh[k]).name for sh in index["shards"] for k in ("emb", "times")}
        except FileNotFoundError:
            named = set()
        except Exception:  # noqa: BLE001 - unreadable now: keep them; the next writer sorts them out
            return
        _remove_files([p for p in written if p.name not in named])

    def _write_shard(self, emb: np.ndarray, times: np.ndarray, written: list) -> dict:
        """written: each file is appended once on disk, so a failed commit or compaction can remove them."""
        number = self._next_shard_number
        self._next_shard_number += 1
        emb_name, times_name = f"{SHARD_DIR}/emb-{number:05d}.npy", f"{SHARD_DIR}/times-{number:05d}.npy"
        atomic_save_npy(self.path / emb_name, emb)
        written.append(self.path / emb_name)
        atomic_save_npy(self.path / times_name, times)
        written.append(self.path / times_name)
        return {"emb": emb_name, "times": times_name, "rows": int(emb.shape[0])}

    def compact(self) -> int:
        """Merge shards of fewer than shard_rows/2 rows into full-size shards; returns how many small
        shards were merged away. An extraction job commits after every encoder batch, which leaves about
        one small shard per commit: many files, and two header reads per shard whenever a Store opens.
        Crash-safe like a commit: merged shards get fresh names, one atomic index.json switches to them,
        and only then are the old files deleted (a kill in between leaves files the next writer removes).
        Video order, ids, embeddings and window times are unchanged."""
        self.commit()
        if (self.path / JOURNAL_NAME).exists():
            self._fold()
        index = self._index
        small = [i for i, sh in enumerate(index["shards"]) if sh["rows"] < self.shard_rows // 2]
        if len(small) < 2:
            return 0
        small_set = set(small)
        kept = [i for i in range(len(index["shards"])) if i not in small_set]
        position = {old: new for new, old in enumerate(kept)}
        shards = [index["shards"][i] for i in kept]
        videos = [dict(v) for v in index["videos"]]
        moved = [v for v in videos if v["shard"] in small_set]
        for v in videos:
            if v["shard"] not in small_set:
                v["shard"] = position[v["shard"]]
        groups, current, rows = [], [], 0
        for v in moved:  # same packing rule as commit()
            if current and rows + v["n"] > self.shard_rows:
                groups.append(current)
                current, rows = [], 0
            current.append(v)
            rows += v["n"]
        groups.append(current)
        @functools.lru_cache(maxsize=8)  # one map per shard, not per video (a shard holds many short ones)
        def shard_map(shard: int, kind: str) -> np.ndarray:
            return np.load(self.path / index["shards"][shard][kind], mmap_mode="r")

        def rows(v: dict, kind: str) -> np.ndarray:  # v still holds its old shard/offset here
            # A copy: a view would keep its shard's map (an open file) alive until the group is written,
            # and a group gathers up to shard_rows rows from as many small shards ("Too many open files"
            # at the end of an extract job of ~1000 batches).
            return np.array(shard_map(v["shard"], kind)[v["offset"]: v["offset"] + v["n"]])

        written = []
        try:
            for group in groups:
                emb = np.concatenate([rows(v, "emb") for v in group])
                times = np.concatenate([rows(v, "times") for v in group])
                shard_id, offset = len(shards), 0
                for v in group:
                    v["shard"], v["offset"] = shard_id, offset
                    offset += v["n"]
                shards.append(self._write_shard(emb, times, written))
            _atomic_save_json(self.path / INDEX_NAME, {**index, "shards": shards, "videos": videos})
        except WRITE_ERRORS as err:
            # The old index and shards are untouched (the store reads as before); the merged copies go.
            self._remove_unindexed(written)
            raise write_error(f"could not compact store {self.path}", err, self.path,
                              f" (the store is unchanged: {len(index['videos'])} videos in "
                              f"{len(index['shards'])} shards)") from err
        old_files = [self.path / index["shards"][i][k] for i in small for k in ("emb", "times")]
        self._index = {**index, "shards": shards, "videos": videos}
        for f in old_files:
            f.unlink()
        return len(small)

    def _fold(self) -> None:
        """Write the merged index as the new snapshot, then drop the journal. A kill in between is
        harmless: readers skip journal lines whose seq the snapshot already covers."""
        self._index = load_index(self.path)
        _atomic_save_json(self.path / INDEX_NAME, self._index)
        (self.path / JOURNAL_NAME).unlink()

    def close(self) -> None:
        try:
            if not self._closed:
                self.commit()
                # An empty store still gets an index, so it reads as a (valid, empty) store.
                if not (self.path / INDEX_NAME).exists():
                    _atomic_save_json(self.path / INDEX_NAME, self._index)
                if (self.path / JOURNAL_NAME).exists():  # a finished store is one index.json
                    self._fold()
                self._closed = True
        finally:
            if self._closed:
                self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Every buffered video passed validation in add(), so committing on an exception keeps only
        # complete videos; a re-run resumes after them.
        try:
            self.close()
        except WRITE_ERRORS as err:
            if exc_type is None:
                raise
            # The job's own error (a full disk, say) is what the user must see, not this second one that
            # follows from it (the same disk, when committing what was buffered): log it, let the first go on.
            log.warning("store %s: the videos buffered since the last commit were not saved (%s); "
                        "a re-run redoes them", self.path, write_reason(err, self.path))
            if not self._closed:
                self._closed = True
                self._lock.release()


class Store:
    """Read-only view of a committed store. get()/window_times() return memory-mapped slices.
    `fingerprint` (sha256 of the index) identifies the exact committed content, for resume checks."""

    def __init__(self, path):
        self.path = Path(path)
        index, problems = checked_index(self.path)
        if problems:
            raise inconsistent(self.path, problems)
        self.fingerprint = index_fingerprint(index)
        self.layout_fingerprint = layout_fingerprint(index)
        self.dim, self.encoder = int(index["dim"]), str(index["encoder"])
        self.dtype = str(index.get("dtype", EMB_DTYPE.name))  # shards are checked to hold EMB_DTYPE
        self.segment_seconds = float(index["segment_seconds"])
        self._shards = index["shards"]
        self._entries = {v["id"]: v for v in index["videos"]}
        self.video_ids = [v["id"] for v in index["videos"]]
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()  # LRU, at most _map_limit
        self._map_limit = _max_open_maps()

    def __len__(self) -> int:
        return len(self.video_ids)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._entries

    def __getstate__(self):
        # DataLoader workers re-open the memory maps themselves instead of pickling them.
        return {**self.__dict__, "_maps": OrderedDict()}

    def _entry(self, video_id: str) -> dict:
        try:
            return self._entries[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in store {self.path}") from None

    def _map(self, shard: int, kind: str) -> np.ndarray:
        key = (shard, kind)
        if key in self._maps:
            self._maps.move_to_end(key)
        else:
            # An evicted map closes once no slice handed out from it is alive.
            while len(self._maps) >= self._map_limit:
                self._maps.popitem(last=False)
            self._maps[key] = np.load(self.path / self._shards[shard][kind], mmap_mode="r")
        return self._maps[key]

    def num_segments(self, video_id: str) -> int:
        return int(self._entry(video_id)["n"])

    def get(self, video_id: str) -> np.ndarray:
        """float16 [n, dim] memory-mapped rows of one video (slice it further before copying)."""
        return self._rows(video_id, "emb")

    def window_times(self, video_id: str) -> np.ndarray:
        """float32 [n, 2] start/end seconds of each row's window."""
        return self._rows(video_id, "times")

    def _rows(self, video_id: str, kind: str) -> np.ndarray:
        def rows():
            v = self._entry(video_id)
            return self._map(v["shard"], kind)[v["offset"]: v["offset"] + v["n"]]
        return self.despite_compaction(rows)

    def despite_compaction(self, read):
        """read(), again after re-reading the index when a shard it opens is gone: compacted while we
        read, the same videos now live in other shards. `read` must look shards up on each call."""
        try:
            return read()
        except FileNotFoundError:
            self._reload()
            return read()

    def _reload(self) -> None:
        """Re-read the index after a compaction moved the rows; every video this reader knows must
        still be there with the same length, else the store changed under it."""
        index = load_index(self.path)
        entries = {v["id"]: v for v in index["videos"]}
        changed = [vid for vid in self.video_ids if vid not in entries or entries[vid]["n"] != self._entries[vid]["n"]]
        if changed:
            raise ValueError(f"store {self.path} changed while being read (videos {changed[:5]} differ); reopen it")
        self._shards, self._entries = index["shards"], {vid: entries[vid] for vid in self.video_ids}
        self._maps.clear()

    def meta(self, video_id: str) -> dict:
        v = self._entry(video_id)
        return {"id": v["id"], "shard": v["shard"], "offset": v["offset"], "n": v["n"],
                "segment_seconds": v["segment_seconds"], "source": v["source"], "encoder": self.encoder, "dim": self.dim}


def show_id(video_id: str) -> str:
    """A video id in a line of output: as is, or JSON-quoted when it holds whitespace, quotes or
    unprintable characters (an id may be any file stem, e.g. `my clip`, even one with a newline), so
    lists and `ID: problem` lines stay unambiguous."""
    plain = video_id and video_id.isprintable() and not any(c.isspace() or c in "\"'" for c in video_id)
    if plain:
        return video_id
    # An id from a file name that is not UTF-8 holds surrogate escapes, which a strict stdout cannot write.
    return json.dumps(video_id, ensure_ascii=any("\ud800" <= c <= "\udfff" for c in video_id))


@dataclass
class Problem:
    """One thing wrong with a store; video_id is None for store-level problems."""
    video_id: str | None
    message: str

    def __str__(self) -> str:
        return f"{show_id(self.video_id)}: {self.message}" if self.video_id is not None else self.message


def check_structure(path, index: dict) -> list[Problem]:
    """Cheap checks (headers only, no data read): shard files, dtypes, dims, index vs shard sizes."""
    path, problems = Path(path), []
    shard_rows: dict[int, int] = {}  # shards whose headers are sound -> actual rows
    for i, shard in enumerate(index["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("emb"), str) and isinstance(shard.get("times"), str)
                and _is_count(shard.get("rows"))):
            problems.append(Problem(None, f"shard {i}: malformed index entry {shard!r}"))
            continue
        try:
            emb_shape, emb_dtype = read_npy_header(path / shard["emb"])
            times_shape, times_dtype = read_npy_header(path / shard["times"])
        except (OSError, ValueError) as err:
            problems.append(Problem(None, f"shard {i}: cannot read: {err}"))
            continue
        bad = []
        if emb_dtype != EMB_DTYPE:
            bad.append(f"dtype {emb_dtype}, expected {EMB_DTYPE}")
        if len(emb_shape) != 2 or emb_shape[1] != index["dim"]:
            bad.append(f"shape {list(emb_shape)}, expected [rows, {index['dim']}]")
        if emb_shape[:1] != (shard["rows"],):
            bad.append(f"{emb_shape[0] if emb_shape else 0} rows on disk, index says {shard['rows']}")
        if times_dtype != TIMES_DTYPE or times_shape != (emb_shape[0] if emb_shape else -1, 2):
            bad.append(f"window times {times_dtype} {list(times_shape)} do not match the embeddings")
        if bad:
            problems.append(Problem(None, f"shard {i} ({shard['emb']}): " + "; ".join(bad)))
        if emb_shape and len(emb_shape) == 2 and emb_shape[1] == index["dim"] and emb_dtype == EMB_DTYPE:
            shard_rows[i] = int(emb_shape[0])
    spans: dict[int, list[tuple[int, int, str]]] = {}
    seen: set = set()
    for v in index["videos"]:
        if not isinstance(v, dict):
            problems.append(Problem(None, f"malformed index entry {v!r}"))
            continue
        vid, shard, offset, n = v.get("id"), v.get("shard"), v.get("offset"), v.get("n")
        if isinstance(vid, str) and vid:
            if vid in seen:
                problems.append(Problem(vid, "appears twice in the index"))
            seen.add(vid)
        else:
            problems.append(Problem(None, f"index entry without a video id: {v}"))
            continue
        # segment_seconds and source too: Store.meta, `store info` and the sampler read them.
        if not (all(_is_count(x) for x in (shard, offset, n)) and _is_seconds(v.get("segment_seconds"))
                and isinstance(v.get("source"), str)):
            problems.append(Problem(vid, f"malformed index entry {v}"))
            continue
        if n < 1:
            problems.append(Problem(vid, f"has {n} segments"))
        elif not 0 <= shard < len(index["shards"]):
            problems.append(Problem(vid, f"points to shard {shard}, but the store has {len(index['shards'])} shards"))
        elif shard not in shard_rows:
            problems.append(Problem(vid, f"lives in unreadable or mismatched shard {shard}"))
        elif offset < 0 or offset + n > shard_rows[shard]:
            problems.append(Problem(vid, f"rows [{offset}, {offset + n}) point past shard {shard} ({shard_rows[shard]} rows)"))
        else:
            spans.setdefault(shard, []).append((offset, offset + n, vid))
    for shard, rows in spans.items():
        rows.sort()
        for (_, end_a, a), (start_b, _, b) in zip(rows, rows[1:]):
            if start_b < end_a:
                problems.append(Problem(b, f"rows overlap video {a!r} in shard {shard}"))
    return problems


def scan_nonfinite(store: Store, chunk_rows: int = 1 << 16) -> dict[str, int]:
    """{video_id: number of rows with NaN/Inf} over the whole store (one sequential read of every shard)."""
    return store.despite_compaction(lambda: _scan_nonfinite(store, chunk_rows))


def _scan_nonfinite(store: Store, chunk_rows: int) -> dict[str, int]:
    bad: dict[str, int] = {}
    by_shard: dict[int, list[dict]] = {}
    for vid in store.video_ids:
        v = store._entry(vid)
        by_shard.setdefault(v["shard"], []).append(v)
    for shard, videos in by_shard.items():
        emb = store._map(shard, "emb")
        bad_rows = [start + np.flatnonzero(~np.isfinite(emb[start: start + chunk_rows]).all(1))
                    for start in range(0, emb.shape[0], chunk_rows)]
        bad_rows = np.concatenate(bad_rows) if bad_rows else np.zeros(0, np.int64)
        if bad_rows.size == 0:
            continue
        for v in videos:
            count = int(np.count_nonzero((bad_rows >= v["offset"]) & (bad_rows < v["offset"] + v["n"])))
            if count:
                bad[v["id"]] = count
    return bad


@dataclass
class VerifyReport:
    num_videos: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_videos(self) -> list[str]:
        return sorted({p.video_id for p in self.problems if p.video_id is not None})

    @property
    def ok(self) -> bool:
        return not self.problems


def inconsistent(path, problems: list[Problem], consequence: str = "") -> ValueError:
    """The error a reader or writer raises for a store check_structure finds problems in (the first five)."""
    return ValueError(f"store {path} is inconsistent ({len(problems)} problems; run `lvmae store verify`)"
                      f"{consequence}: " + "; ".join(str(p) for p in problems[:5]))


def checked_index(path) -> tuple[dict, list[Problem]]:
    """The index and its structural problems (check_structure), read again while they may come from a
    compaction that replaced the shards after the index was read (then the index has changed too)."""
    index = load_index(path)
    problems = check_structure(path, index)  # includes ids that appear twice or are missing
    for _ in range(SNAPSHOT_READS):
        if not problems:
            break
        again = load_index(path)
        if again == index:
            break
        index, problems = again, check_structure(path, again)
    return index, problems


def verify_store(path) -> VerifyReport:
    """Every check a reader relies on, reporting (not raising) what is wrong and which videos it hits."""
    index, problems = checked_index(path)
    report = VerifyReport(num_videos=len(index["videos"]))
    report.problems += problems
    if report.problems:
        return report  # the data scan needs sound shards
    store = Store(path)
    for vid, count in scan_nonfinite(store).items():
        report.problems.append(Problem(vid, f"{count} of {store.num_segments(vid)} rows hold NaN/Inf"))
    for vid in store.video_ids:
        times = store.window_times(vid)
        if not np.isfinite(times).all() or (times[:, 1] < times[:, 0]).any():
            report.problems.append(Problem(vid, "window times are non-finite or end before they start"))
    return report


def summarize(store: Store) -> dict:
    """Numbers for `lvmae store info`."""
    lengths = np.array([store.num_segments(v) for v in store.video_ids], dtype=np.int64)
    size = store.despite_compaction(
        lambda: sum((store.path / s[k]).stat().st_size for s in store._shards for k in ("emb", "times")))
    # The windows' own lengths: a kept partial last window (extract --min-last) is not a whole segment.
    hours = float(sum(float(np.nansum(t[:, 1] - t[:, 0], dtype=np.float64))
                      for t in map(store.window_times, store.video_ids))) / 3600
    return {
        "path": str(store.path), "videos": len(store), "dim": store.dim, "dtype": store.dtype, "encoder": store.encoder,
        "segment_seconds": store.segment_seconds, "segments": int(lengths.sum()), "hours": round(hours, 3),
        "shards": len(store._shards), "bytes_on_disk": int(size),
        "segments_per_video": ({"min": int(lengths.min()), "median": float(np.median(lengths)),
                                "max": int(lengths.max())} if len(lengths) else None),
    }
