"""Shape buckets for packed batches: pad a PackedBatch so that batches of similar size share one shape.

A CUDA graph replays fixed shapes, but packed batches change size every step (ragged crops, ragged
masks, and with token budgets a varying video count). Rounding the visible and masked token counts
up to 8 sizes per octave, and the video count to 4 per octave, makes a handful of shapes cover a
whole run. The padding is made of *dummy videos* appended after the real ones:
- each is a sequence of its own in both varlen streams, so attention never mixes it with real tokens;
- their masked rows get loss weight 0 and every real masked row 1/Tm, so the loss (and therefore
  every gradient) equals the unpadded batch's: dummy outputs receive zero gradient, and nothing else
  depends on them;
- their rows are zero vectors, so nothing non-finite can enter (0 * NaN would poison the sum).
Each stream's max_seqlen is rounded up too (an upper bound is all varlen kernels need).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .packing import PackedBatch, cu_seqlens_from_lengths, keep_counts

BUCKETS_PER_OCTAVE = 8      # worst-case padding 1/8 of the tokens; ~6% on average
VIDEO_BUCKETS_PER_OCTAVE = 4  # video counts: at most B/4 + 1 dummies (cheap rows, but the sdpa path pays B*S^2)
MIN_BUCKET = 16
MIN_SEQLEN_BUCKET = 64


def bucket_size(n: int, per_octave: int = BUCKETS_PER_OCTAVE, minimum: int = MIN_BUCKET) -> int:
    """Smallest bucket >= n: multiples of 2^(floor(log2 n)) / per_octave, never finer than `minimum`."""
    if n <= 0:
        return 0
    step = max(minimum, (1 << (n.bit_length() - 1)) // per_octave)
    return -(-n // step) * step


def seqlen_bucket(n: int, floor: int = 0) -> int:
    """The floor when n fits under it, else the next power of two >= n (at least MIN_SEQLEN_BUCKET)."""
    return floor if n <= floor else max(MIN_SEQLEN_BUCKET, 1 << (n - 1).bit_length())


def shape_key(batch: PackedBatch) -> tuple[int, ...]:
    """Everything a captured step's shapes depend on: videos, visible rows, masked rows, stream max lengths."""
    return (len(batch.lengths), int(batch.visible_rows.shape[0]), int(batch.masked_rows.shape[0]),
            batch.enc_max_seqlen, batch.dec_max_seqlen)


def seqlen_floors(crop_cap: int, mask_ratio: float) -> dict[str, int]:
    """pad_to_bucket's attention max_seqlen floors for crops of at most `crop_cap` segments: the decoder
    stream holds up to crop_cap + 1 rows (CLS), the encoder's up to the cap's visible count + 1."""
    return {"min_seqlen": crop_cap + 1, "enc_min_seqlen": keep_counts([crop_cap], mask_ratio)[0] + 1}


def pad_to_bucket(batch: PackedBatch, per_octave: int = BUCKETS_PER_OCTAVE, min_seqlen: int = 0,
                  enc_min_seqlen: int | None = None) -> PackedBatch:
    """The same batch plus dummy videos, sized so that the video count and the (visible, masked) row
    counts land on bucket sizes.

    The video count, which varies a lot with token-budget batches, is rounded up to 4 sizes per
    octave (at least one dummy is always added, to hold the padding rows); the padding rows are
    spread evenly over the dummies (each has >= 1 visible row, as the encoder needs), so that dummies
    rarely set max_seqlen. Each stream's max_seqlen becomes its floor when it fits, else a power of
    two: min_seqlen for the decoder stream, enc_min_seqlen (default: min_seqlen) for the encoder's. The
    sampler passes its crop cap + 1 and the cap's visible count + 1 (CLS), so that part of the shape
    stays fixed without inflating it: a floor of 257 on the encoder's at most 129 rows (mask ratio 0.5)
    would widen its attention grid by half (3 query blocks of 128 instead of 2). Works on CPU
    (DataLoader workers) and CUDA alike; the result carries row_weights and padding_videos."""
    if batch.padding_videos:
        raise ValueError("batch is already padded")
    lengths = list(batch.lengths)
    B, Tv, Tm = len(lengths), int(batch.visible_rows.shape[0]), int(batch.masked_rows.shape[0])
    num_dummies = bucket_size(B + 1, VIDEO_BUCKETS_PER_OCTAVE, minimum=1) - B   # >= 1
    pad_visible = bucket_size(Tv + num_dummies, per_octave) - Tv
    pad_masked = bucket_size(Tm, per_octave) - Tm
    dummy_visible, dummy_masked = _spread(pad_visible, num_dummies), _spread(pad_masked, num_dummies)
    dummy_lengths = [v + m for v, m in zip(dummy_visible, dummy_masked)]
    device = batch.x.device
    x = torch.cat([batch.x, batch.x.new_zeros(pad_visible + pad_masked, batch.x.shape[1])])
    # Each dummy's rows: its visible rows first, then its masked rows.
    pattern = [m for v, n in zip(dummy_visible, dummy_masked) for m in [False] * v + [True] * n]
    masked = torch.cat([batch.masked, torch.tensor(pattern, dtype=torch.bool, device=device)])
    enc_lengths = (batch.enc_cu_seqlens[1:] - batch.enc_cu_seqlens[:-1]).tolist()  # CLS + visible per video
    keep = [e - 1 for e in enc_lengths] + dummy_visible
    cu = torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1] + cu_seqlens_from_lengths(dummy_lengths, device)[1:]])
    padded = PackedBatch.from_mask(x, cu, lengths + dummy_lengths, masked, keep=keep)
    weights = torch.zeros(Tm + pad_masked, dtype=batch.x.dtype, device=device)  # x: fp32 (or fp64 in tests)
    weights[:Tm] = 1.0 / Tm if Tm else 0.0
    # Dummy positions may run past the positional table; real ones never exceed the longest real video.
    real_max = max(lengths)
    return replace(padded, max_seqlen=real_max,
                   enc_pos=padded.enc_pos.clamp_max(real_max), dec_pos=padded.dec_pos.clamp_max(real_max),
                   # max_seqlen only sizes the varlen attention grid (blocks past a sequence's end exit
                   # at once), so a coarse bound costs little there and keeps the number of shapes down.
                   enc_max_seqlen=seqlen_bucket(padded.enc_max_seqlen,
                                                min_seqlen if enc_min_seqlen is None else enc_min_seqlen),
                   dec_max_seqlen=seqlen_bucket(padded.dec_max_seqlen, min_seqlen),
                   row_weights=weights, padding_videos=num_dummies)


def _spread(total: int, parts: int) -> list[int]:
    """total split into `parts` near-equal counts, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]
