"""`internvideo2`: InternVideo2 towers exported as TorchScript (its model code is not on PyPI).

InternVideo2 needs OpenGVLab's repository code to instantiate; we do not vendor it. Export once where
that code is installed, then point --weights at the directory:
  video_tower.pt   torch.jit.save of a module: float [N, T, 3, S, S] -> [N, dim]
                   (or video_tower.pt2 / text_tower.pt2: torch.export.save of the same towers)
  text_tower.pt    torch.jit.save of a module: (input_ids [n, L], attention_mask [n, L]) -> [n, dim]
  internvideo2.json {"dim": 512, "image_size": 224, "num_frames": 8, "mean": [...], "std": [...]}
  tokenizer files for the text tower (AutoTokenizer-loadable, e.g. the BERT tokenizer it uses)
Anything else raises a ValueError explaining this layout. Unverified against real InternVideo2 exports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import read_json
from .base import IMAGENET_MEAN, IMAGENET_STD, VideoEncoder, channel_stats
from .hf import HFTextTower

LAYOUT = ("expected --weights DIR with video_tower.pt, text_tower.pt (TorchScript exports of the "
          "InternVideo2 towers) and internvideo2.json {dim, image_size, num_frames, mean, std}; see "
          "lvmae_fast/video/encoders/internvideo2.py")


def _count(meta: dict, key: str, default, meta_file: Path, optional: bool = False) -> int | None:
    """An int >= 1 of internvideo2.json, checked when it loads ("num_frames": "8", a string, was compared
    with T and refused every window: "needs 8 frames per window, got T=8"); None = any, where optional."""
    value = meta.get(key, default)
    if value is None and optional:
        return None
    if key not in meta and default is None:
        raise ValueError(f"{meta_file}: no {key!r}; {LAYOUT}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{meta_file}: {key}={value!r} is not supported (an integer >= 1"
                         + (", or null for any" if optional else "") + ")")
    return value


def _load_tower(file: Path):
    if file.suffix == ".pt2":  # torch.export archive (TorchScript is deprecated in recent torch)
        return torch.export.load(str(file)).module()
    return torch.jit.load(str(file), map_location="cpu").eval()


class InternVideo2Encoder(VideoEncoder):
    name = "internvideo2"
    # Its test transform: Resize((image_size, image_size), BICUBIC), the whole frame squashed to a square,
    # no crop (a centre crop of the short side dropped 44% of a 16:9 frame's width).
    resample = "bicubic"

    def __init__(self, weights):
        super().__init__()
        if not weights:
            raise ValueError(f"encoder 'internvideo2' needs --weights DIR: {LAYOUT}")
        path = Path(weights)
        meta_file = path / "internvideo2.json"
        video_file = next((f for f in (path / "video_tower.pt2", path / "video_tower.pt") if f.is_file()), None)
        if not meta_file.is_file() or video_file is None:
            raise ValueError(f"internvideo2 checkpoint not loadable from {path}: {LAYOUT}")
        meta = read_json(meta_file)
        self.dim = _count(meta, "dim", None, meta_file)
        self.image_size = _count(meta, "image_size", 224, meta_file)
        self.resize = (self.image_size, self.image_size)
        self.num_frames = _count(meta, "num_frames", None, meta_file, optional=True)
        # Checked here: a wrong length failed only mid-job, in preprocess.py. ImageNet's: its default.
        self.mean = channel_stats(meta["mean"], "mean", meta_file) if "mean" in meta else IMAGENET_MEAN
        self.std = channel_stats(meta["std"], "std", meta_file) if "std" in meta else IMAGENET_STD
        self.video_tower = _load_tower(video_file)
        text_file = next((f for f in (path / "text_tower.pt2", path / "text_tower.pt") if f.is_file()), None)
        self.text_tower = _load_tower(text_file) if text_file is not None else None
        self.text = HFTextTower(path, self.name)

    def encode_video(self, pixels_NTCHW):
        return self.video_tower(pixels_NTCHW)

    def encode_text(self, texts):
        if self.text_tower is None:
            raise ValueError(f"internvideo2: no text_tower.pt; {LAYOUT}")
        if not texts:  # the tokenizer takes no empty batch
            return torch.empty(0, self.dim)
        device = next(iter(self.text_tower.parameters()), torch.empty(0)).device
        # Padded to 40 tokens, as InternVideo2 tokenises (an export traced at that length takes no other).
        batch = self.text.tokenize(texts, device, 40, padding="max_length")
        return self.text_tower(batch["input_ids"], batch["attention_mask"])


def build_internvideo2(weights=None, **_):
    return InternVideo2Encoder(weights)
