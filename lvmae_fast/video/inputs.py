"""INPUT -> [(video_id, path)]: a folder (recursive), a glob, or a .txt/.csv list of videos.

Video ids (the store key, stable across re-runs so resume works):
- folder: the path relative to the folder, without its extension ("sub/clip");
- glob: relative to the glob's fixed leading directory, same form;
- list: a `video_id` column when the CSV has one, else the file stem.
Two files with one id (clip.mp4 and clip.webm, say): the first keeps it, the others are reported by
`lvmae extract` as failures (rename them, or give a `video_id` column) and the job goes on.
List files: .txt = one path per line ('#' comments); .csv = header with a `path` column (optional
`video_id`), or headerless first column. Relative paths resolve against the list file's folder.
"""
from __future__ import annotations

import csv
import glob
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                  ".3gp", ".ogv"}
LIST_SUFFIXES = {".txt", ".csv", ".lst"}


def _id_from(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.with_suffix("").as_posix()


def list_videos(spec) -> list[tuple[str, str]]:
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        return [(_id_from(p, path), str(p)) for p in files]
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _from_list(path)
    if path.is_file():
        return [(path.stem, str(path))]
    if glob.has_magic(spec):
        fixed = []
        for part in Path(spec).parts:  # the leading folders without wildcards are the id root
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        # The user chose the pattern: every file it matches is an input (non-videos fail with a reason).
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        return [(_id_from(p, root), str(p)) for p in files]
    raise FileNotFoundError(f"input {spec!r} is not a folder, a glob, a video or a .txt/.csv list")


def _from_list(list_file: Path) -> list[tuple[str, str]]:
    base = list_file.parent
    rows: list[tuple[str | None, str]] = []
    if list_file.suffix.lower() == ".csv":
        with open(list_file, newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" starts with a BOM
            table = [r for r in csv.reader(fh) if r and r[0].strip() and not r[0].startswith("#")]
        header = [c.strip().lower() for c in table[0]] if table else []
        if "path" in header:
            p_col = header.index("path")
            id_col = header.index("video_id") if "video_id" in header else None
            rows = [(r[id_col].strip() if id_col is not None else None, r[p_col].strip()) for r in table[1:]]
        else:
            rows = [(None, r[0].strip()) for r in table]
    else:
        for line in list_file.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append((None, line))
    out = []
    for vid, p in rows:
        full = Path(p) if Path(p).is_absolute() else base / p
        out.append((vid or Path(p).stem, str(full)))
    return out
