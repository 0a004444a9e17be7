"""`tiny`: a small random-init video transformer. MEANINGLESS embeddings, for tests and the CPU demo.

Deterministic: parameters come from a private RNG seeded with `seed`, so every run (and resume)
of the same seed produces the same embeddings on CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import VideoEncoder, captions


class TinyVideoEncoder(VideoEncoder):
    name = "tiny"

    def __init__(self, dim: int = 64, image_size: int = 32, patch: int = 8, width: int = 64, depth: int = 2,
                 heads: int = 4, max_frames: int = 64, seed: int = 0):
        super().__init__()
        self.dim, self.image_size, self.max_frames = dim, image_size, max_frames
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
            n_patches = (image_size // patch) ** 2
            self.space_pos = nn.Parameter(torch.randn(1, 1, n_patches, width) * 0.02)
            self.time_pos = nn.Parameter(torch.randn(1, max_frames, 1, width) * 0.02)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
            self.proj = nn.Linear(width, dim)
            # Text tower: mean of byte embeddings -> same width -> same projection space.
            self.text_embed = nn.EmbeddingBag(256, width, mode="mean")
            self.text_proj = nn.Linear(width, dim)
        self.eval()

    def check_frames(self, T: int) -> None:
        if T > self.max_frames:  # time_pos has max_frames rows
            raise ValueError(f"encoder 'tiny' takes at most {self.max_frames} frames per window, got T={T}")

    def encode_video(self, pixels_NTCHW: torch.Tensor) -> torch.Tensor:
        N, T, C, H, W = pixels_NTCHW.shape
        x = self.patch_embed(pixels_NTCHW.reshape(N * T, C, H, W))      # [N*T, w, h', w']
        x = x.flatten(2).transpose(1, 2).reshape(N, T, -1, x.shape[1])  # [N, T, P, w]
        x = x + self.space_pos + self.time_pos[:, :T]
        x = self.blocks(x.reshape(N, -1, x.shape[-1]))
        return self.proj(self.norm(x.mean(dim=1)))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = self.text_proj.weight.device
        texts = captions(texts)
        if not texts:  # torch.cat takes no empty list
            return torch.empty(0, self.dim, device=device, dtype=self.text_proj.weight.dtype)
        ids = [torch.tensor(list(t.encode("utf-8")) or [0], dtype=torch.long) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        emb = self.text_embed(torch.cat(ids).to(device), offsets.to(device))
        return self.text_proj(emb)


def build_tiny(weights=None, seed: int = 0, **_) -> TinyVideoEncoder:
    model = TinyVideoEncoder(seed=seed)
    if weights:  # optional: a state dict saved from this class (safetensors), for reproducibility checks
        from pathlib import Path

        from safetensors.torch import load_file
        path = Path(weights)
        path = path / "tiny.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tiny encoder weights not found: {path}")
        model.load_state_dict(load_file(str(path)))
    return model
