"""Encoder registry: name -> builder(weights=DIR|None, seed=...) -> VideoEncoder (eval mode, on CPU).

Weights always come from a local path; transformers runs with the hub offline.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .base import VideoEncoder

SAMPLE_BYTES = 1 << 20


def _tiny(**kw):
    from .tiny import build_tiny
    return build_tiny(**kw)


def _clip_mean(**kw):
    from .hf import build_clip_mean
    return build_clip_mean(**kw)


def _xclip(**kw):
    from .hf import build_xclip
    return build_xclip(**kw)


def _languagebind(**kw):
    from .languagebind import build_languagebind
    return build_languagebind(**kw)


def _internvideo2(**kw):
    from .internvideo2 import build_internvideo2
    return build_internvideo2(**kw)


ENCODERS = {"tiny": _tiny, "clip-mean": _clip_mean, "xclip": _xclip, "languagebind": _languagebind,
            "internvideo2": _internvideo2}


def build_encoder(name: str, weights=None, seed: int = 0) -> VideoEncoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")
    try:
        encoder = ENCODERS[name](weights=weights, seed=seed)
    except (ValueError, OSError, ImportError):  # already one line naming the problem (or the extra)
        raise
    except Exception as err:  # noqa: BLE001 - a cut file, a config that does not fit the weights...
        if not weights:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"encoder {name!r}: cannot load the checkpoint at {weights}: {type(err).__name__}"
                         + (f": {first}" if first else "")) from None
    encoder.name = name
    for p in encoder.parameters():
        p.requires_grad_(False)
    # eval() by hand: a tower loaded from torch.export (internvideo2's .pt2) refuses train(False) itself.
    for module in encoder.modules():
        module.training = False
    return encoder


# Files of a checkpoint dir that do not decide its video embeddings: adding the tokenizer files (or the
# InternVideo2 text tower) that encode_text asks for must not refuse the resume of an extract job.
TEXT_ONLY_FILES = frozenset({"vocab.json", "vocab.txt", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                             "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "spiece.model",
                             "sentencepiece.bpe.model", "text_tower.pt", "text_tower.pt2"})
FINGERPRINT_VERSION = "v2:"


def _checkpoint_files(weights) -> tuple[Path, list[Path]]:
    root = Path(weights)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return root, files


def weights_fingerprint(weights) -> str | None:
    """A short content id of a local checkpoint (file or directory), recorded in the store's settings so
    a resumed job never mixes embeddings of two checkpoints under one encoder name: every byte of every
    file that can change the video embeddings (not tokenizer files, docs or dot-files). Reading all of
    it costs seconds for multi-GB weights, once per job, and the model load reads the same files next.
    (Until 2026-11-27 it read 1 MiB at three places per file, which a fine-tune of a few layers can miss:
    legacy_weights_fingerprint.)"""
    if not weights:
        return None
    root, files = _checkpoint_files(weights)
    digest = hashlib.sha256()
    for f in files:
        name = f.relative_to(root) if root.is_dir() else Path(f.name)
        if root.is_dir() and (f.name in TEXT_ONLY_FILES or f.suffix.lower() == ".md"
                              or any(part.startswith(".") for part in name.parts)):
            continue
        digest.update(f"{name.as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                digest.update(chunk)
    return FINGERPRINT_VERSION + digest.hexdigest()[:16]


def legacy_weights_fingerprint(weights) -> str | None:
    """The fingerprint stores written before 2026-11-27 record (names, sizes and 1 MiB at the start,
    middle and end of every file), so that their jobs still resume with the same checkpoint."""
    if not weights:
        return None
    root, files = _checkpoint_files(weights)
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
