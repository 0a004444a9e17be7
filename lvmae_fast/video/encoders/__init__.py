"""Encoder registry: name -> builder(weights=DIR|None, seed=...) -> VideoEncoder (eval mode, on CPU).

Weights always come from a local path; transformers runs with the hub offline.
"""
from __future__ import annotations

from .base import VideoEncoder


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
    encoder = ENCODERS[name](weights=weights, seed=seed)
    encoder.name = name
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()
