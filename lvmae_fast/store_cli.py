"""`lvmae store import|info|verify|compact`: fill an embedding store from arrays on disk, describe it, check it.

Import sources:
- a directory of `<video_id>.npy` or `<video_id>.pt` arrays [n_segments, dim] (float16/32; a .pt may hold
  a tensor or {'embedding': tensor});
- the amazon-science/lv-mae preprocessed layout: a CSV whose `segment_paths` column lists one `.pt` file
  per segment holding {'embedding': tensor [dim]}; the video id comes from `video_filename` (or
  `video_id`, else the row number). The list is parsed as JSON or as a Python list of string literals
  by a small parser of our own: CSV fields are never evaluated.
Import resumes: videos already in the store are skipped. Files that fail validation (unreadable or
corrupt files, wrong shapes, a video id repeated within the source) are reported and skipped; the exit
code is then 1 and everything valid is committed.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from .atomic import WriteError
from .interrupts import caused_by_interrupt
from .store import (MIN_SEGMENT_SECONDS, Store, StoreWriter, load_index, segment_seconds_ok, show_id, stored_embeddings,
                    summarize, verify_store)

_PY_STRING = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""
_PY_LIST = re.compile(rf"^\[\s*(?:(?:{_PY_STRING})\s*(?:,\s*(?:{_PY_STRING})\s*)*,?\s*)?\]$", re.S)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}
# A reference CSV row lists one path per segment: a 3-hour video at 5 s segments is ~180k characters in one
# field, past the csv module's default limit of 128 KiB. Raised for that read only (the limit is global).
CSV_FIELD_LIMIT = 1 << 30


def _python_string(literal: str) -> str:
    """One quoted string literal as Python reads it (repr writes \\xa0, \\u200b, \\r for such characters in
    names). A hand-written one Python would not read (a Windows path: 'C:\\data\\x1.pt') keeps its unknown
    escapes as written."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "invalid escape sequence": kept as written, as below
            return ast.literal_eval(literal)
    except (SyntaxError, ValueError):
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), literal[1:-1])


def parse_path_list(text: str) -> list[str]:
    """A JSON list of strings, or a Python list repr of string literals (what pandas writes for a list)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if not _PY_LIST.match(text):
            raise ValueError(f"segment_paths is neither a JSON list nor a list of quoted strings: {text[:80]!r}") from None
        value = [_python_string(s) for s in re.findall(_PY_STRING, text)]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"segment_paths must be a list of paths, got {text[:80]!r}")
    return value


def _cannot_read(path: Path, err: BaseException) -> ValueError:
    # Loaders raise many types for a corrupt file (pickle.UnpicklingError, EOFError, RuntimeError, ...) and
    # torch's messages run over many lines: one line naming the file is what an import report needs.
    first = (str(err).strip().splitlines() or [""])[0]
    return ValueError(f"{path}: cannot read embeddings ({type(err).__name__}: {first[:200]})")


def _load_torch_embedding(path: Path):
    import torch  # only .pt sources need torch here

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never a blind pickle load
    except Exception as err:
        raise _cannot_read(path, err) from err
    if isinstance(obj, dict):
        if "embedding" not in obj:  # keys as text: sorting {1: .., 'x': ..} itself was a TypeError
            raise ValueError(f"{path}: dict without an 'embedding' key (keys {sorted(map(repr, obj))[:5]})")
        obj = obj["embedding"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor or {{'embedding': tensor}}, got {type(obj).__name__}")
    if not obj.is_floating_point():  # .float() would silently turn ids, masks or complex values into "embeddings"
        raise ValueError(f"{path}: embeddings must be floating point, got {obj.dtype}")
    if obj.layout != torch.strided or obj.device.type == "meta":  # no values to convert (a TypeError stopped the import)
        what = "a meta tensor (no data)" if obj.device.type == "meta" else f"a {str(obj.layout).replace('torch.', '')} tensor"
        raise ValueError(f"{path}: embeddings must be a dense tensor with data, got {what}")
    return obj.detach().to("cpu", torch.float32).resolve_neg().numpy()  # a negated view is valid data too


NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


def _not_npy(path: Path) -> str | None:
    """What a file named .npy is instead, or None: np.load reads a zip (.npz, a torch file) as an archive
    (a 1-D object array, "got [1]") and anything else as a pickle ("contains pickled data")."""
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head == NPY_MAGIC or not head:  # (an empty file: np.load's own message)
        return None
    return "a zip archive (an .npz or a torch file?)" if head.startswith(ZIP_MAGIC[:len(head)]) else "no .npy header"


def load_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            instead = _not_npy(path)
            if instead is None:
                return np.load(path, allow_pickle=False)
        except Exception as err:
            if caused_by_interrupt(err):  # numpy turns a Ctrl-C while it reads into a TypeError
                raise KeyboardInterrupt from err
            raise _cannot_read(path, err) from err
        raise ValueError(f"{path}: not a .npy array file: {instead}")
    return _load_torch_embedding(path)


def iter_directory(src: Path):
    """(video_id, source path, loader) for each <video_id>.npy / .pt in a directory, sorted by id."""
    # Sorted by (id, suffix): of an id with both a .npy and a .pt, the .npy is imported and the .pt is
    # reported as a repeated id (import_embeddings), like any other repeat.
    # Hidden names left out, as extract's folder inputs do (macOS's ._clip.npy beside clip.npy); a broken
    # link is listed, so its failure is reported rather than the video dropped without a word.
    files = sorted((p for p in src.iterdir() if p.suffix.lower() in (".npy", ".pt") and not p.name.startswith(".")
                    and (p.is_file() or not p.exists())),
                   key=lambda p: (p.stem, p.suffix.lower()))   # any case, as extract's folder input
    for p in files:
        yield p.stem, os.path.realpath(p), (lambda p=p: load_array(p))  # source: absolute, wherever the import ran


def _one_segment(arr: np.ndarray, path: Path) -> np.ndarray:
    """A reference segment file holds one embedding: [d] or [1, d]; anything else is not flattened."""
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1):
        return arr.reshape(-1)
    raise ValueError(f"{path}: a segment file must hold one embedding [dim] or [1, dim], got shape {list(arr.shape)}")


def iter_reference_csv(csv_path: Path):
    """(video_id, source, loader) per row of an amazon-science/lv-mae segments CSV."""
    old_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # pandas' utf-8-sig and Excel write a BOM
            reader = csv.DictReader(f)
            try:
                rows = list(reader)
            except csv.Error as err:
                # reader.reader: DictReader.line_num only advances after a good row
                raise ValueError(f"{csv_path}: line {reader.reader.line_num}: malformed CSV ({err})") from None
            except UnicodeDecodeError as err:  # e.g. a cp1252 CSV as Excel saves it
                raise ValueError(f"{csv_path}: not UTF-8 text ({err}); save it as UTF-8") from None
    finally:
        csv.field_size_limit(old_limit)
    if rows and "segment_paths" not in rows[0]:
        raise ValueError(f"{csv_path}: no `segment_paths` column (columns: {sorted(rows[0])})")
    for i, row in enumerate(rows):
        video_id = row.get("video_filename") or row.get("video_id") or str(i)

        def load(row=row, video_id=video_id):
            if row.get("segment_paths") is None:  # csv.DictReader's filler for a row cut short
                raise ValueError("no segment_paths (the row ends before that column)")
            paths = [Path(p) if Path(p).is_absolute() else csv_path.parent / p for p in parse_path_list(row["segment_paths"])]
            if row.get("number_of_segments") not in (None, "") and int(row["number_of_segments"]) != len(paths):
                raise ValueError(f"number_of_segments={row['number_of_segments']} but {len(paths)} segment paths")
            if not paths:
                raise ValueError("no segments")
            segs = [_one_segment(load_array(p), p) for p in paths]
            if len({s.shape for s in segs}) > 1:
                raise ValueError(f"segments have mixed dims {sorted({s.shape[0] for s in segs})}")
            return np.stack(segs)

        yield video_id, f"{os.path.realpath(csv_path)}#row={i}", load


def import_embeddings(src, out, encoder: str = "unknown", segment_seconds: float = 5.0,
                      shard_rows: int | None = None) -> tuple[int, int, list[str]]:
    """Import into `out` (created or resumed). Returns (added, skipped as already present, failures)."""
    if isinstance(src, str) and not src.strip():  # Path("") is the current folder
        raise ValueError("the import source is an empty string (an unset shell variable?); give a directory "
                         "of <video_id>.npy/.pt files or a reference segments CSV")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"import source {src} does not exist")
    if src.is_file() and src.suffix.lower() != ".csv":
        raise ValueError(f"import source {src} is a file but not a .csv: give a directory of <video_id>.npy/.pt "
                         "files or a reference segments CSV")
    items = iter_reference_csv(src) if src.is_file() else iter_directory(src)
    writer, added, skipped, failures = None, 0, 0, []
    seen: dict[str, str] = {}  # video id -> its first source in this run
    kwargs = {"shard_rows": shard_rows} if shard_rows else {}
    try:
        if (out / "index.json").exists():  # resume: the existing store fixes dim; encoder and segment_seconds must match
            index = load_index(out)
            if index.get("settings"):  # an extraction job's store: its rows were made one known way
                raise ValueError(f"store {out} was written by `lvmae extract` (settings {index['settings']}); "
                                 "import into another store so one store never mixes embeddings made two ways")
            if index["videos"]:  # a store holding no video yet takes the first valid array's dim, as a new one
                writer = StoreWriter(out, index["dim"], encoder=encoder, segment_seconds=segment_seconds, **kwargs)
        for video_id, source, load in items:
            if video_id in seen:  # checked before the resume skip: the first copy may be in the store by now
                failures.append(f"{video_id} ({source}): video id repeated in the source (first at {seen[video_id]}); "
                                f"not imported")
                continue
            seen[video_id] = source
            if writer is not None and writer.contains(video_id):
                skipped += 1
                continue
            try:
                emb = load()
                if writer is None:  # only a file the store would take may fix a new store's dim
                    stored_embeddings(video_id, emb)
            except (ValueError, OSError, RuntimeError) as err:
                failures.append(f"{video_id} ({source}): {err}")
                continue
            if writer is None:  # the first valid array fixes the store's dim. A store that cannot be
                # created (--out a file or another folder, bad settings) stops the import: not one failure per video
                writer = StoreWriter(out, emb.shape[1], encoder=encoder, segment_seconds=segment_seconds, **kwargs)
            try:
                writer.add(video_id, emb, source_path=source)
                added += 1
            except WriteError:
                # add() commits once a shard fills: a full disk stops the import (one line from the CLI);
                # it is no fault of this video, and the next ones would fail the same way.
                raise
            except (ValueError, OSError, RuntimeError) as err:
                failures.append(f"{video_id} ({source}): {err}")
    finally:
        if writer is not None:
            writer.close()
    return added, skipped, failures


def _check_shard_rows(shard_rows) -> None:
    if shard_rows is not None and shard_rows < 1:
        raise ValueError(f"--shard-rows must be >= 1, got {shard_rows}")


def _run_import(args) -> int:
    # Settings are checked once here, before any file is read (not reported again for every video).
    if not segment_seconds_ok(args.segment_seconds):
        raise ValueError(f"--segment-seconds must be a finite number of seconds >= {MIN_SEGMENT_SECONDS:g}, got "
                         f"{args.segment_seconds}")
    _check_shard_rows(args.shard_rows)
    added, skipped, failures = import_embeddings(args.src, args.out, encoder=args.encoder,
                                                 segment_seconds=args.segment_seconds, shard_rows=args.shard_rows)
    if added + skipped == 0 and not failures:
        if Path(args.src).is_file():
            raise ValueError(f"{args.src} holds no video rows (a reference segments CSV: a header with a "
                             f"`segment_paths` column, then one row per video)")
        raise ValueError(f"{args.src} holds no <video_id>.npy/.pt files")
    if added + skipped:
        print(f"imported {added} videos into {args.out} ({skipped} already present)")
    else:  # not "imported 0 videos into OUT": no store is made when every file failed
        print(f"imported nothing into {args.out}: every file failed")
    for line in failures:
        print(f"  failed: {line}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} videos failed and were not imported", file=sys.stderr)
    return 1 if failures else 0


def _run_info(args) -> int:
    info = summarize(Store(args.store))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    return 0


def _run_verify(args) -> int:
    report = verify_store(args.store)
    if report.ok:
        print(f"{args.store}: OK ({report.num_videos} videos)")
        return 0
    for problem in report.problems:
        print(f"  {problem}")
    bad = report.bad_videos
    print(f"{args.store}: {len(report.problems)} problems; bad videos ({len(bad)}): {' '.join(map(show_id, bad))}")
    return 2


def _run_compact(args) -> int:
    _check_shard_rows(args.shard_rows)
    index = load_index(args.store)
    kwargs = {"shard_rows": args.shard_rows} if args.shard_rows else {}
    with StoreWriter(args.store, dim=index["dim"], encoder=index["encoder"],
                     segment_seconds=index["segment_seconds"], **kwargs) as writer:
        merged = writer.compact()
    after = len(load_index(args.store)["shards"])
    print(f"{args.store}: merged {merged} small shards; {after} shards now")
    return 0


def register(sub) -> None:
    store = sub.add_parser("store", help="embedding store: import, info, verify, compact")
    store_sub = store.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)

    p = store_sub.add_parser("import", help="import <video_id>.npy/.pt arrays (or a reference segments CSV) into a store")
    p.add_argument("src", help="directory of <video_id>.npy/.pt arrays [n_segments, dim], or a reference CSV")
    p.add_argument("--out", required=True, help="store directory (created, or resumed if it exists)")
    p.add_argument("--encoder", default="unknown",
                   help="name of the short-video encoder that made the embeddings (default 'unknown'; a store "
                        "holds one encoder's embeddings, so a resumed import must give the same name)")
    p.add_argument("--segment-seconds", type=float, default=5.0,
                   help="seconds of video per embedding row (default 5; must match a resumed store)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows (segments) per shard file (default 65536)")
    p.set_defaults(func=_run_import)

    p = store_sub.add_parser("info", help="describe a store")
    p.add_argument("store", help="store directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_info)

    p = store_sub.add_parser("verify", help="check dims, dtypes, NaN/Inf and index vs shards; exit 2 and name bad videos")
    p.add_argument("store", help="store directory")
    p.set_defaults(func=_run_verify)

    p = store_sub.add_parser("compact", help="merge small shards (e.g. left by an interrupted extraction) into full ones")
    p.add_argument("store", help="store directory")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per merged shard (default 65536)")
    p.set_defaults(func=_run_compact)
