"""INPUT -> [(video_id, path)]: a folder (recursive), a glob, or a .txt/.csv list of videos.

Video ids (the store key, stable across re-runs so resume works):
- folder: the path relative to the folder, without its extension ("sub/clip"); hidden files and folders
  (".Trash-1000/", "._clip.mp4") are left out, as a glob leaves them out;
- glob: relative to the glob's fixed leading directory, same form;
- list: a `video_id` column when the CSV has one, else the file stem.
Two files with one id (clip.mp4 and clip.webm, say): the first keeps it, the others are reported by
`lvmae extract` as failures (rename them, or give a `video_id` column) and the job goes on.
List files: .txt = one path per line ('#' comments); .csv = header with a `path` column (optional
`video_id`), or headerless first column (a first row of header-like names without `path`, e.g.
"video_id,file", is refused rather than read as a video). In a CSV, '#' lines are comments before its
first row and, in a headerless one, anywhere; below a header every row is data (an id "#7" is an id). A '#' line naming an
existing file is still a comment, with a warning (list it as "./#name"). Relative paths resolve
against the list file's folder. Lists are UTF-8 (a BOM is fine); a CSV is comma-separated.
Links: a folder input does not follow links to folders (Path.rglob), a glob does (glob.glob); every name
a listing finds is an input of its own, also two links to one file. A broken link is an input too: the
job lists it as failed, with the reason.
"""
from __future__ import annotations

import csv
import glob
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Folder inputs take files with these suffixes (any case): camera (AVCHD .mts/.m2ts, .mxf, .dv), disc
# (.vob), web and container formats FFmpeg demuxes. A glob or a list takes any file.
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                  ".flv", ".f4v", ".wmv", ".asf", ".3gp", ".3g2", ".ogv", ".mxf", ".vob", ".dv", ".ivf", ".nut",
                  ".m2v", ".y4m"}
LIST_SUFFIXES = {".txt", ".csv", ".lst"}


def _id_from(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.with_suffix("").as_posix()


def _is_input_file(p: Path) -> bool:
    # A broken link to a video is an input too: the job lists it as failed, with the reason; so is a path
    # the system will not even look up (ENAMETOOLONG), which stopped the whole job before its first video.
    try:
        return p.is_file() or (p.is_symlink() and not p.exists())
    except OSError:
        return True


def list_videos(spec) -> list[tuple[str, str]]:
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        return [(_id_from(p, path), str(p)) for p in _folder_videos(path)]
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
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _is_input_file(Path(p)))
        return [(_id_from(p, root), str(p)) for p in files]
    raise FileNotFoundError(f"input {spec!r} is not a folder, a glob, a video or a .txt/.csv list")


def _folder_videos(root: Path) -> list[Path]:
    """Video files under `root`, sorted; hidden files and folders left out, folder links not followed. A
    folder that cannot be listed (a path past PATH_MAX, no permission) is logged and left out: Path.rglob
    raised there and the whole job stopped before its first video."""
    def unlisted(err: OSError) -> None:
        log.warning("cannot list the folder %s (%s): its videos are left out", err.filename, err.strerror or err)

    files = []
    for folder, subfolders, names in os.walk(root, onerror=unlisted):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(folder, name) for name in names if not name.startswith(".")
                  and Path(name).suffix.lower() in VIDEO_SUFFIXES and _is_input_file(Path(folder, name))]
    return sorted(files)


# Header cells that look meant as ids but are not the `video_id` column ids come from.
_ID_LIKE = re.compile(r"(video)?[ _-]?id|name|key", re.IGNORECASE)
# First-row cells that say the row is a header (one without the `path` column paths are read from).
_HEADER_LIKE = re.compile(r"(video|file)?[ _-]?(id|name|key|path|file|filename|url|uri|location)s?|videos?|files?",
                          re.IGNORECASE)


def _listed_path_exists(base: Path, entry: str) -> bool:
    """Whether a list entry names something that exists (a relative one against the list's folder; an
    absolute one replaces `base` in the join)."""
    try:
        return (base / entry).exists()
    except OSError:   # e.g. a name too long to look up
        return False


def _reads_as_header(base: Path, cells: list[str]) -> bool:
    """A headerless CSV's first row whose cells name columns ('video_id', 'file'...), not a video."""
    if cells[0] and _listed_path_exists(base, cells[0]):
        return False  # a video named 'video' is still a video
    return any(_HEADER_LIKE.fullmatch(c) for c in cells)


def _from_list(list_file: Path) -> list[tuple[str, str]]:
    try:
        return _read_list(list_file)
    except UnicodeDecodeError as err:   # PowerShell 5's `> list.txt` writes UTF-16, Excel a code page
        raise ValueError(f"{list_file}: a list file must be UTF-8 text ({err.reason} at byte {err.start}: "
                         "UTF-16 or a legacy code page? save it as UTF-8)") from None


def _read_list(list_file: Path) -> list[tuple[str, str]]:
    base = list_file.parent
    rows = _csv_rows(list_file) if list_file.suffix.lower() == ".csv" else _txt_rows(list_file)
    out = []
    for vid, p in rows:
        full = Path(p) if Path(p).is_absolute() else base / p
        out.append((vid or Path(p).stem, str(full)))
    return out


def _txt_rows(list_file: Path) -> list[tuple[None, str]]:
    """(None, path) per line of a .txt list; '#' lines are comments."""
    rows = []
    for number, raw in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = _listed_name(list_file.parent, raw)
        if line.startswith("#") and (list_file.parent / line).is_file():   # `ls > list.txt` of a "#1 clip.mp4"
            log.warning("%s, line %d: %r is a comment ('#' lines are skipped), though a file of that name "
                        "exists: list it as './%s' to extract it", list_file, number, line, line)
        elif line and not line.startswith("#"):
            rows.append((None, line))
    return rows


def _listed_name(base: Path, entry: str) -> str:
    """A list entry with its surrounding blanks cut (an editor's stray spaces), unless a file is named
    with them (" lead.mp4", "trail.mp4 "), which the cut entry would miss."""
    cut = entry.strip()
    if cut != entry and cut and _listed_path_exists(base, entry):
        return entry
    return cut


def _csv_rows(list_file: Path) -> list[tuple[str | None, str]]:
    """(video id or None, path) per data row of a .csv list (module docstring)."""
    with open(list_file, newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" starts with a BOM
        reader = csv.reader(fh)
        table = []   # (line number the row starts on, stripped cells, is a '#' line) of rows with content
        ended = 0    # the line the last row ended on (a quoted cell may span lines)
        try:
            for row in reader:
                start, ended = ended + 1, reader.line_num
                cells = [_listed_name(list_file.parent, c) for c in row]
                first = next((c for c in cells if c), None)  # pandas' to_csv starts its header with ""
                if first is not None and (table or not first.startswith("#")):  # comments before the first row
                    table.append((start, cells, first.startswith("#")))
        except csv.Error as err:   # e.g. an unclosed quote running into the field size limit
            raise ValueError(f"{list_file}, line {reader.line_num}: not a valid CSV ({err})") from None
    header = [c.lower() for c in table[0][1]] if table else []
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        raise ValueError(f"{list_file}: its first row {table[0][1][0]!r} is one cell holding a ';' or a tab: "
                         "a list CSV is comma-separated (save it with commas, or as a .txt list of paths)")
    if "path" in header:
        p_col = header.index("path")
        id_col = header.index("video_id") if "video_id" in header else None
        if id_col is None:
            for cell in (c for c in table[0][1] if _ID_LIKE.fullmatch(c)):
                log.warning("%s: column %r is not used for ids: they come from a 'video_id' column, else "
                            "each file's name", list_file, cell)
        table = table[1:]
    elif table and _reads_as_header(list_file.parent, table[0][1]):
        # Read as headerless, the header's first cell became a video that failed, and every other row
        # was extracted under ids from file names: a run that looks fine with the ids the user did not ask for.
        raise ValueError(f"{list_file}: its first row looks like a header (columns: "
                         f"{', '.join(repr(c) for c in table[0][1])}) but has no 'path' column: name the column "
                         "of video paths 'path' (ids from an optional 'video_id' column), or leave the header out "
                         "(a headerless CSV takes paths from its first column)")
    else:  # headerless: '#' lines are comments, as in a .txt list
        p_col, id_col = 0, None
        table = [row for row in table if not row[2]]
    rows: list[tuple[str | None, str]] = []
    for line, cells, _ in table:
        p = cells[p_col] if p_col < len(cells) else ""
        if not p:
            raise ValueError(f"{list_file}, line {line}: no path in column {p_col + 1}"
                             + (" ('path')" if header and "path" in header else ""))
        # A quote opened and never closed swallows the rows after it into one cell; a file whose name
        # holds a newline (csv.writer quotes it) is a real path.
        if "\n" in p and not (list_file.parent / p).exists():
            raise ValueError(f"{list_file}, line {line}: a path cell spans lines (a quote that is never "
                             "closed?)")
        vid = cells[id_col] if id_col is not None and id_col < len(cells) else ""
        rows.append((vid or None, p))  # an empty video_id: the file's stem, as without the column
    return rows
