"""Baseline: a faithful re-implementation of the amazon-science/lv-mae training step (padded).

What the reference does, and this copies: pad every video to the batch's max length, per-sample
random masking via noise + argsort (keep = int(L * (1 - ratio)), padded key mask), plain-math attention
(scores -> key-padding mask -> softmax), a per-sample Python loop to build the decoder input (unshuffle
+ mask tokens), decoder over the padded full length, prediction for every position, masked MSE.
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

    def forward(self, x, key_valid):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        attn = attn.masked_fill(~key_valid[:, None, None, :], float("-inf")).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, key_valid):
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class ReferencePaddedMAE(nn.Module):
    def __init__(self, config):
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
        self.register_buffer("pos_embed", sincos_table(c.embed_dim, c.max_len)[None], persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_table(c.decoder_embed_dim, c.max_len)[None], persistent=False)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, lengths, mask_ratio):
        """x [B, N, d] zero-padded, lengths [B] (host ints)."""
        B, N, _ = x.shape
        device = x.device
        h = self.input_proj(x) + self.pos_embed[:, 1:N + 1]
        keep = [max(1, int(n * (1 - mask_ratio))) for n in lengths]
        max_keep = max(keep)
        # Per-sample masking (reference: noise + argsort, padded positions sorted last).
        noise = torch.rand(B, N, device=device)
        pad = torch.arange(N, device=device)[None] >= torch.tensor(lengths, device=device)[:, None]
        noise = noise.masked_fill(pad, 2.0)
        ids_shuffle = noise.argsort(1)
        ids_keep = ids_shuffle[:, :max_keep]
        h_vis = torch.gather(h, 1, ids_keep[..., None].expand(-1, -1, h.shape[-1]))
        enc_valid = torch.arange(max_keep, device=device)[None] < torch.tensor(keep, device=device)[:, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        h = torch.cat([cls, h_vis], 1)
        enc_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), enc_valid], 1)
        for blk in self.blocks:
            h = blk(h, enc_valid)
        e = self.decoder_embed(self.norm(h))
        # Per-sample decoder input: visible tokens back in place, mask tokens elsewhere (reference loop).
        dec_in = []
        masked = torch.zeros(B, N, dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            full = self.mask_token[0].to(e.dtype).expand(n, -1).clone()
            full[ids_keep[i, :keep[i]]] = e[i, 1:keep[i] + 1]
            row = torch.cat([e[i, :1], full, e.new_zeros(N - n, e.shape[-1])], 0)
            dec_in.append(row)
            masked[i, ids_shuffle[i, keep[i]:n]] = True
        y = torch.stack(dec_in) + self.decoder_pos_embed[:, :N + 1]
        dec_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), ~pad], 1)
        for blk in self.decoder_blocks:
            y = blk(y, dec_valid)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        per_token = ((pred.float() - x.float()) ** 2).mean(-1)
        return (per_token * masked).sum() / masked.sum().clamp_min(1)


def pad_batch(seqs):
    """[B, N, d] zero-padded + host lengths, as the reference's collate does."""
    lengths = [s.shape[0] for s in seqs]
    x = seqs[0].new_zeros(len(seqs), max(lengths), seqs[0].shape[1])
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
    return x, lengths
