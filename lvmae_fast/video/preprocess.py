"""Frames -> encoder input, in torch on whatever device the frames are on (GPU frames stay on GPU).

CLIP-style: resize the shorter side to the encoder's resize size (its processor's `size`; the crop size
when it states none) with the encoder's filter (bilinear or bicubic), centre crop to the encoder's input
size, scale to [0,1], normalise with the encoder's mean/std. Shared by every decoder backend. Two styles,
as the encoders' own preprocessing: `transformers` (its image processors: an antialiased resize, the
crop offset floor((H - size) / 2)) and `pytorchvideo` (LanguageBind's video transform: pytorchvideo's
ShortSideScale, which does not antialias, and torchvision's CenterCropVideo, offset round((H - size) / 2)).
The resized size is transformers' (get_resize_output_image_size), torchvision's and pytorchvideo's: the
long side truncated, int(size * long / short), so the crop window sits where the encoders' own
processors put it (rounding made 640x480 299 pixels wide instead of 298, half a pixel off across the crop).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Shapes: N windows, T frames, H/W pixels, C=3 channels.


# Frames converted to float at a time: the full-resolution float32 copy is the peak of preprocessing
# (a 1080p frame is 25 MB in fp32), so it is bounded per chunk instead of growing with the batch.
CHUNK_FRAMES = 8
RESAMPLE_MODES = ("bilinear", "bicubic")
STYLES = ("transformers", "pytorchvideo")


def frames_to_input(frames_NTHWC: torch.Tensor, size: int, mean, std,
                    dtype: torch.dtype = torch.float32, resample: str = "bilinear",
                    resize: int | tuple[int, int] | None = None, style: str = "transformers") -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> dtype [N, T, 3, size, size], normalised. `resize`: the shorter side
    before the crop (an int; None = `size`), or an exact (height, width) as a processor's
    `size: {height, width}`. `style`: one of STYLES (see above)."""
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    N, T, H, W, C = frames_NTHWC.shape
    resized = resized_shape(H, W, size if resize is None else resize, style)
    if min(resized) < size:
        raise ValueError(f"resize to {resized[0]}x{resized[1]} is smaller than the {size}x{size} crop")
    flat = frames_NTHWC.reshape(N * T, H, W, C)
    out = torch.cat([_chunk_to_input(flat[i:i + CHUNK_FRAMES], size, mean, std, dtype, resample, resized, style)
                     for i in range(0, N * T, CHUNK_FRAMES)])
    return out.reshape(N, T, C, size, size)


def resized_shape(H: int, W: int, size: int | tuple[int, int], style: str = "transformers") -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the longer int(size * long / short) as transformers
    computes it, or floor(long / short * size) as pytorchvideo's ShortSideScale does (the two differ by a
    pixel at some sizes: 224x488, 392x854); a (height, width) pair is returned as it is."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    if style == "pytorchvideo":
        return (size, int(math.floor(W / H * size))) if H <= W else (int(math.floor(H / W * size)), size)
    return (size, int(size * W / H)) if H <= W else (int(size * H / W), size)


def _chunk_to_input(frames_FHWC: torch.Tensor, size: int, mean, std, dtype: torch.dtype,
                    resample: str, resized: tuple[int, int], style: str) -> torch.Tensor:
    H, W = frames_FHWC.shape[1:3]
    x = frames_FHWC.permute(0, 3, 1, 2).float().div_(255.0)
    new_h, new_w = resized
    if (new_h, new_w) != (H, W):
        x = F.interpolate(x, size=(new_h, new_w), mode=resample, align_corners=False,
                          antialias=style == "transformers")
        if resample == "bicubic":
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots at edges; the processors' PIL/uint8 resize clips
    if style == "transformers":
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:  # torchvision's CenterCropVideo: Python's round, half to even
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    return x.to(dtype)
