"""Baseline: a faithful re-implementation of the amazon-science/lv-mae training step (padded).

What the reference does, and this copies (data/CombinedData.py, models_mae.py, engine_pretrain.py):
- its DataLoader workers mask each sample (noise + argsort, keep = int(L * (1 - ratio))) and pad it to
  `num_patches` (256 in the paper's runs) whatever the batch's lengths: the encoder runs the visible
  tokens padded to num_patches + CLS rows, the decoder num_patches + CLS rows, with key-padding masks;
  the batch goes to the device each step (non_blocking, from pinned memory);
- the encoder adds each sample's shuffled positional embeddings in a Python loop, slicing by the
  sample's length held on the device (a host sync per sample), and the decoder builds each sample's
  input (visible tokens, mask tokens, unshuffle, CLS, positions, padding) in a Python loop too;
- plain-math attention (scores -> key-padding mask -> softmax), prediction for every row, masked MSE;
- the step: fp16 autocast, loss.item() (the non-finite check), GradScaler backward, unscale, the gradient
  norm (one norm per parameter, stacked; MAE's NativeScalerWithGradNormCount without clipping), step,
  update, zero_grad, torch.cuda.synchronize().
Before 2026-11-27 this padded to the batch's longest sequence and skipped the step's extra host work:
about half the reference's compute at batch 16-64, so the packed/padded ratios of earlier runs are low.
Used only by bench/pretrain.py as the "padded" column; never by the library.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lvmae_fast.model import sincos_table


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        attn = attn.masked_fill(key_padding[:, None, None, :], float("-inf")).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, key_padding):
        x = x + self.attn(self.norm1(x), key_padding)
        return x + self.mlp(self.norm2(x))


class ReferencePaddedMAE(nn.Module):
    def __init__(self, config, num_patches: int):
        super().__init__()
        c = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.input_proj = nn.Linear(c.in_dim, c.embed_dim) if c.in_dim != c.embed_dim else nn.Identity()
        self.blocks = nn.ModuleList(RefBlock(c.embed_dim, c.num_heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(RefBlock(c.decoder_embed_dim, c.decoder_num_heads) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.in_dim)
        self.register_buffer("pos_embed", sincos_table(c.embed_dim, num_patches)[None], persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_table(c.decoder_embed_dim, num_patches)[None], persistent=False)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, b: dict):
        """b: reference_batch's tensors on the device, except `visible` (host ints, as the reference keeps
        its masked_length on the host)."""
        visible_x, length = b["visible_x"], b["length"]
        B, N, _ = visible_x.shape
        h = self.input_proj(visible_x)
        # Per sample: the positional embeddings of its positions in shuffled order, padded to N.
        pos = []
        for i in range(B):
            L = length[i]  # a device scalar: slicing by it syncs with the host, as in the reference
            rows = self.pos_embed[0, 1:][b["ids_shuffle"][i, :L]]
            pos.append(torch.cat([rows, rows.new_zeros(N - rows.shape[0], rows.shape[1])]))
        h = h + torch.stack(pos)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        h = torch.cat([cls, h], 1)
        for blk in self.blocks:
            h = blk(h, b["enc_padding"])
        e = self.decoder_embed(self.norm(h))
        # Per sample: visible tokens then mask tokens, unshuffled, CLS in front, positions, padded to N + 1.
        rows, padding = [], []
        for i in range(B):
            L, keep = length[i], b["visible"][i]
            seq = torch.cat([e[i, 1:keep + 1], self.mask_token[0].expand(int(L) - keep, -1)])
            seq = seq[b["ids_restore"][i, :L]]
            seq = torch.cat([e[i, :1], seq]) + self.decoder_pos_embed[0, :seq.shape[0] + 1]
            rows.append(torch.cat([seq, seq.new_zeros(N + 1 - seq.shape[0], seq.shape[1])]))
            padding.append(torch.arange(N + 1, device=e.device) >= seq.shape[0])
        y = torch.stack(rows)
        dec_padding = torch.stack(padding)
        for blk in self.decoder_blocks:
            y = blk(y, dec_padding)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        per_token = ((pred - b["target"]) ** 2).mean(-1)
        return (per_token * b["mask"]).sum() / b["mask"].sum()


def reference_batch(seqs, mask_ratio: float, num_patches: int, generator: torch.Generator | None = None) -> dict:
    """What the reference's DataLoader hands its step, built on the host: each sample masked (noise +
    argsort) and padded to num_patches. CPU tensors (pinned by the caller where it copies to a GPU);
    `visible` is a list of host ints."""
    B, d = len(seqs), seqs[0].shape[1]
    out = {"visible_x": torch.zeros(B, num_patches, d), "target": torch.zeros(B, num_patches, d),
           "mask": torch.zeros(B, num_patches), "ids_shuffle": torch.zeros(B, num_patches, dtype=torch.long),
           "ids_restore": torch.zeros(B, num_patches, dtype=torch.long),
           "enc_padding": torch.zeros(B, num_patches + 1, dtype=torch.bool),
           "length": torch.zeros(B, dtype=torch.long), "visible": []}
    for i, s in enumerate(seqs):
        L = s.shape[0]
        if L > num_patches:
            raise ValueError(f"a sequence of {L} segments does not fit the reference's {num_patches} patches")
        keep = max(1, int(L * (1 - mask_ratio)))
        shuffle = torch.rand(L, generator=generator).argsort()
        out["ids_shuffle"][i, :L], out["ids_restore"][i, :L] = shuffle, shuffle.argsort()
        out["visible_x"][i, :keep] = s[shuffle[:keep]].float()
        out["target"][i, :L] = s.float()
        out["mask"][i, shuffle[keep:]] = 1.0
        out["enc_padding"][i, keep + 1:] = True
        out["length"][i] = L
        out["visible"].append(keep)
    return out
