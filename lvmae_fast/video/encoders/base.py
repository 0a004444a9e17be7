"""What every frozen short-video encoder provides: a video tower and a text tower in one space."""
from __future__ import annotations

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# X-CLIP's and InternVideo2's published preprocessing normalises with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoEncoder(nn.Module):
    """Subclasses set the attributes below and implement the two towers.

    name: registry name (recorded in the store); dim: embedding width; image_size: square input side;
    mean/std: per-channel normalisation of [0,1] pixels; resample: the resize filter of its image
    processor (bilinear or bicubic); resize: the shorter side before the centre crop (None: image_size),
    or an exact (height, width); preprocess_style: video/preprocess.py's STYLES, as its own preprocessing;
    num_frames: frames per window the model requires (None: any T works).
    """
    name: str = "unknown"
    dim: int
    image_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resample: str = "bilinear"
    resize: int | tuple[int, int] | None = None
    preprocess_style: str = "transformers"
    num_frames: int | None = None

    def encode_video(self, pixels_NTCHW: torch.Tensor) -> torch.Tensor:
        """Normalised frames [N, T, 3, S, S] -> [N, dim] window embeddings."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> [len(texts), dim] in the same space as encode_video."""
        raise NotImplementedError

    def check_frames(self, T: int) -> None:
        if self.num_frames is not None and T != self.num_frames:
            raise ValueError(f"encoder {self.name!r} needs {self.num_frames} frames per window, got T={T}")


def captions(texts) -> list[str]:
    """encode_text's input as a list; one string is refused (list("a dog") would embed each character)."""
    if isinstance(texts, str):
        raise ValueError("encode_text takes a list of captions, got one string: pass [text]")
    return list(texts)


def pooled(output) -> torch.Tensor:
    """transformers < 5 returns a tensor from get_*_features, 5.x a ModelOutput with pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def channel_stats(value, key: str, source) -> tuple[float, float, float]:
    """A per-channel mean or std as three floats, checked when the checkpoint loads (a wrong length failed
    mid-job in preprocess.py). A single number means every channel, as transformers' processors take it."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if number(value):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(number(v) for v in value):
        raise ValueError(f"{source}: {key}={value!r} is not supported (three numbers, one per RGB channel, "
                         "or one number for all)")
    if key.endswith("std") and not all(v > 0 for v in value):
        raise ValueError(f"{source}: {key}={list(value)!r} must be positive (frames are divided by it)")
    return tuple(float(v) for v in value)
