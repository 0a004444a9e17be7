"""A synthetic embedding corpus with long-range structure, for the demo, tests and benchmarks.

Each video has a small cast of "scenes" drawn from a corpus-wide bank of themes (so videos share
structure), and a motif of scenes with per-scene durations that repeats through the whole video
(A A A B B C C C C A A A B B ...). A masked stretch is therefore predictable from its neighbours and from
the motif's other repetitions far away. On top: a slow random-walk drift and per-segment noise.
Lengths are log-uniform, with a few videos of 1-4 segments to exercise the short-video policy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_save_npy


def synthetic_video(rng: np.random.Generator, themes: np.ndarray, n: int) -> np.ndarray:
    dim = themes.shape[1]
    cast = rng.choice(len(themes), size=rng.integers(2, 6), replace=False)
    motif = rng.integers(0, len(cast), size=rng.integers(2, 5))
    durations = rng.integers(2, 10, size=len(motif))
    scene_of_row = np.repeat(motif, durations)
    scene_of_row = np.resize(scene_of_row, n)  # cycle the motif through the whole video
    base = themes[cast[scene_of_row]]
    drift = np.cumsum(rng.standard_normal((n, dim)), 0) * (0.3 / np.sqrt(max(n, 1)))
    noise = rng.standard_normal((n, dim)) * 0.15
    return (base + drift / np.sqrt(dim) + noise / np.sqrt(dim)).astype(np.float32)


def synthetic_corpus(num_videos: int, dim: int, seed: int = 0, min_segments: int = 1,
                     max_segments: int = 400, num_themes: int = 24) -> dict[str, np.ndarray]:
    """{video_id: float32 [n_segments, dim]}."""
    rng = np.random.default_rng(seed)
    themes = rng.standard_normal((num_themes, dim))
    themes /= np.linalg.norm(themes, axis=1, keepdims=True)
    lengths = np.exp(rng.uniform(np.log(min_segments), np.log(max_segments + 1), size=num_videos)).astype(int)
    lengths = np.clip(lengths, min_segments, max_segments)
    return {f"video{i:05d}": synthetic_video(rng, themes, int(n)) for i, n in enumerate(lengths)}


def write_corpus(corpus: dict[str, np.ndarray], directory, dtype=np.float16) -> Path:
    """<video_id>.npy files, the layout `lvmae store import` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for video_id, emb in corpus.items():
        atomic_save_npy(directory / f"{video_id}.npy", emb.astype(dtype))  # a failed write names the file
    return directory
