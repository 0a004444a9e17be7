"""Window embeddings of videos not finished yet, kept beside the store so a killed job loses at most
the encoder batch in flight, however long the video.

The store only ever holds complete videos (it commits a video once all its windows are embedded). An
hours-long video spans many encoder batches, so after each batch the windows it added to unfinished
videos are written here, one small file per video per batch:

    STORE/partial/<key>/meta.json          video id, source path, size and mtime, window count, dim,
                                           and how the embeddings were made (encoder, window settings;
                                           `decoded_by`: the decoder of its windows, which
                                           --decoder hybrid keeps when it resumes the video)
    STORE/partial/<key>/chunk-000007.npz   windows int64 [k], emb float32 [k, d], stood_in bool [k]
                                           (a window with a frame the decoder stood in for)

(<key> is a hash of the video id: ids may contain '/'.) Every file is written atomically (temp file,
fsync, rename), so a kill leaves whole chunks or none. A resumed job loads the chunks of a video whose
source file (absolute path, size, mtime) and settings are unchanged, and the decoders skip those
windows; anything else discards them. So does a saved window with a stood-in frame (damaged data): a
resumed decode counts damage only in the windows it decodes, so the video's damage budget
(decode_pyav.MAX_MISSING) would start over, and a kill could turn one pass's refusal into an accepted
video. Such a video starts over instead. Once a video is committed to the store
its folder is removed; folders of videos the store already holds are removed when a job starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, atomic_write_text, write_error

log = logging.getLogger(__name__)

PARTIAL_DIR = "partial"
_OWN_FOLDER = re.compile(r"^[0-9a-f]{20}$")  # the folder names _folder() makes


def _source(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class PartialVideos:
    def __init__(self, store_dir, dim: int, settings: dict | None = None):
        """settings: everything that decides a window's embedding (encoder, window options, seed);
        saved windows made with other settings are never mixed in."""
        self.root = Path(store_dir) / PARTIAL_DIR
        self.dim = int(dim)
        self.settings = json.loads(json.dumps(settings or {}))  # as it reads back from JSON
        self._chunks: dict[str, int] = {}  # video id -> next chunk number
        self._decoders: dict[str, str] = {}  # video id -> decoded_by of the progress loaded

    def _folder(self, video_id: str) -> Path:  # named as _OWN_FOLDER matches
        # surrogatepass: a file name that is not UTF-8 reaches its id as surrogate escapes (os.fsdecode).
        return self.root / hashlib.sha1(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]

    def _meta(self, video_id: str, path: str, num_windows: int) -> dict:
        return {"video_id": video_id, **_source(path), "num_windows": int(num_windows), "dim": self.dim,
                "settings": self.settings}

    def load(self, video_id: str, path: str, num_windows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(emb float32 [n, d], filled bool [n]) saved by an earlier run, or None. Progress made on
        another version of the file (size, mtime, window count or dim differ) is discarded."""
        folder = self._folder(video_id)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            saved = json.loads(meta_file.read_text())
            current = self._meta(video_id, path, num_windows)
            decoded_by = saved.pop("decoded_by", "")  # not a setting: which decoder a hybrid run used
        except (OSError, ValueError, AttributeError):
            saved, current, decoded_by = None, {}, ""
        if saved != current:
            log.info("discarding saved progress of %s: the file or the settings changed", video_id)
            self.drop(video_id)
            return None
        emb = np.zeros((num_windows, self.dim), np.float32)
        filled = np.zeros(num_windows, bool)
        chunks = sorted(folder.glob("chunk-*.npz"))
        stood_in = False
        for chunk in chunks:
            with np.load(chunk) as data:
                windows, values = data["windows"], data["emb"]
                stood_in |= "stood_in" in data.files and bool(data["stood_in"].any())
            emb[windows] = values
            filled[windows] = True
        self._chunks[video_id] = len(chunks)
        if stood_in:
            log.info("starting %s over: its saved windows hold stood-in frames (damaged data), which the whole "
                     "video's damage budget must count", video_id)
            self.drop(video_id)
            return None
        if filled.all() or not filled.any():  # nothing to resume from (or nothing left to decode)
            self.drop(video_id)
            return None
        self._decoders[video_id] = str(decoded_by)
        return emb, filled

    def saved_decoder(self, video_id: str) -> str:
        """The `decoded_by` recorded with the progress `load` returned for this video ("" if none)."""
        return self._decoders.get(video_id, "")

    def save(self, video_id: str, path: str, num_windows: int, windows: np.ndarray, emb: np.ndarray,
             decoded_by: str = "", stood_in: np.ndarray | None = None) -> None:
        """Append the embeddings of `windows` (window indices of this video) as one chunk. A failed write
        (disk full) leaves the chunks saved before as they were (no temp file) and says which video.
        decoded_by: recorded with the video's first chunk of this run (see saved_decoder). stood_in:
        bool per window, True where a frame was stood in for (see the module docstring)."""
        stood_in = np.zeros(len(windows), bool) if stood_in is None else np.asarray(stood_in, bool)
        try:
            self._save(video_id, path, num_windows, windows, emb, decoded_by, stood_in)
        except OSError as err:
            saved = self._chunks.get(video_id, 0)
            raise write_error(f"could not save embedded windows of video {video_id} under {self.root}", err,
                              self.root, f" ({saved} chunks saved before are kept; rerunning resumes from them)") from err

    def _save(self, video_id: str, path: str, num_windows: int, windows: np.ndarray, emb: np.ndarray,
              decoded_by: str, stood_in: np.ndarray) -> None:
        folder = self._folder(video_id)
        if video_id not in self._chunks:
            if folder.exists():  # left by an older job on another version of this file
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            meta = json.dumps({**self._meta(video_id, path, num_windows), "decoded_by": decoded_by})
            atomic_write_text(folder / "meta.json", meta)
            self._chunks[video_id] = 0
        number = self._chunks[video_id]

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, windows=np.asarray(windows, np.int64), emb=np.asarray(emb, np.float32), stood_in=stood_in)

        atomic_write(folder / f"chunk-{number:06d}.npz", write)
        self._chunks[video_id] = number + 1

    def drop(self, video_id: str, path: str | None = None) -> None:
        """Remove a video's saved windows; with `path`, only if they were saved for that file (another
        file claiming the same id must not discard them)."""
        folder = self._folder(video_id)
        if path is not None:
            try:
                if json.loads((folder / "meta.json").read_text())["path"] != os.path.realpath(path):
                    return
            except (OSError, ValueError, KeyError):
                pass
        self._chunks.pop(video_id, None)
        shutil.rmtree(folder, ignore_errors=True)

    def remove_committed(self, committed) -> None:
        """Remove the folders of videos the store already holds (a kill between commit and cleanup)."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if not _OWN_FOLDER.match(folder.name):  # only the folders _folder() names are ours
                continue
            try:
                video_id = json.loads((folder / "meta.json").read_text())["video_id"]
            except (OSError, ValueError, KeyError):
                shutil.rmtree(folder, ignore_errors=True)  # no readable meta: a folder a kill left half-made
                continue
            if committed(video_id):
                shutil.rmtree(folder, ignore_errors=True)
