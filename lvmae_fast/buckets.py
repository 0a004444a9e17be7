"""Shape buckets for packed batches: pad a PackedBatch so that batches of similar size share one shape.

A CUDA graph replays fixed shapes, but packed batches change size every step (ragged crops, ragged
masks). Rounding the visible and masked token counts up to a few sizes per octave makes a handful of
shapes cover a whole run. The padding is one extra *dummy video* appended after the real ones:
- it is a sequence of its own in both varlen streams, so attention never mixes it with real tokens;
- its masked rows get loss weight 0 and every real masked row 1/Tm, so the loss (and therefore every
  gradient) equals the unpadded batch's: the dummy's outputs receive zero gradient, and nothing else
  depends on them;
- its rows are zero vectors, so nothing non-finite can enter (0 * NaN would poison the sum).
max_seqlen of each stream is rounded up too (an upper bound is all the varlen kernels need).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .packing import PackedBatch

BUCKETS_PER_OCTAVE = 8      # worst-case padding 1/8 of the tokens; ~6% on average
MIN_BUCKET = 16
SEQLEN_MULTIPLE = 64


def bucket_size(n: int, per_octave: int = BUCKETS_PER_OCTAVE, minimum: int = MIN_BUCKET) -> int:
    """Smallest bucket >= n: multiples of 2^(floor(log2 n)) / per_octave, never finer than `minimum`."""
    if n <= 0:
        return 0
    step = max(minimum, (1 << (n.bit_length() - 1)) // per_octave)
    return -(-n // step) * step


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shape_key(batch: PackedBatch) -> tuple[int, ...]:
    """Everything a captured step's shapes depend on: videos, visible rows, masked rows, stream max lengths."""
    return (len(batch.lengths), int(batch.visible_rows.shape[0]), int(batch.masked_rows.shape[0]),
            batch.enc_max_seqlen, batch.dec_max_seqlen)


def pad_to_bucket(batch: PackedBatch, per_octave: int = BUCKETS_PER_OCTAVE) -> PackedBatch:
    """The same batch plus one dummy video, sized so that (visible, masked) rows land on bucket sizes.

    The dummy always has >= 1 visible row (the encoder needs one per video), so a batch's visible
    count is bucketed from Tv + 1. Works on CPU (DataLoader workers) and CUDA alike; the returned
    batch carries row_weights and padding_videos=1."""
    if batch.padding_videos:
        raise ValueError("batch is already padded")
    lengths = list(batch.lengths)
    Tv, Tm = int(batch.visible_rows.shape[0]), int(batch.masked_rows.shape[0])
    pad_visible = bucket_size(Tv + 1, per_octave) - Tv
    pad_masked = bucket_size(Tm, per_octave) - Tm
    pad_rows = pad_visible + pad_masked
    x = torch.cat([batch.x, batch.x.new_zeros(pad_rows, batch.x.shape[1])])
    masked = torch.cat([batch.masked, torch.arange(pad_rows, device=batch.x.device) >= pad_visible])
    enc_lengths = (batch.enc_cu_seqlens[1:] - batch.enc_cu_seqlens[:-1]).tolist()  # CLS + visible per video
    keep = [e - 1 for e in enc_lengths] + [pad_visible]
    all_lengths = lengths + [pad_rows]
    cu = torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + pad_rows])
    padded = PackedBatch.from_mask(x, cu, all_lengths, masked, keep=keep)
    weights = torch.zeros(Tm + pad_masked, dtype=batch.x.dtype, device=batch.x.device)  # x: fp32 (or fp64 in tests)
    weights[:Tm] = 1.0 / Tm if Tm else 0.0
    # Dummy positions may run past the positional table; real ones never exceed the longest real video.
    real_max = max(lengths)
    return replace(padded, max_seqlen=real_max,
                   enc_pos=padded.enc_pos.clamp_max(real_max), dec_pos=padded.dec_pos.clamp_max(real_max),
                   enc_max_seqlen=round_up(padded.enc_max_seqlen, SEQLEN_MULTIPLE),
                   dec_max_seqlen=round_up(padded.dec_max_seqlen, SEQLEN_MULTIPLE),
                   row_weights=weights, padding_videos=1)

