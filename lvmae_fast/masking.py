"""Token masking over packed batches (torch reference implementation; Triton versions live in kernels/).

Every strategy reduces to "per video, mask the k_i rows with the lowest score, ties to the lower row":
- random: scores are uniform noise (MAE);
- semantic (paper, default): scores are the cosine similarity of each embedding with its predecessor,
  so the most distinct segments (lowest similarity) are masked;
- semantic_inverted (amazon-science/lv-mae code): the most redundant segments are masked. As the
  reference's importance_masking does it: the keep_i rows of lowest similarity are kept (ties to the
  lower row, a stable ascending sort) and the rest masked, so among tied rows the higher ones go.
The first token of a video has no predecessor; its similarity is defined as 0.0 (as the reference code
does). A zero vector has similarity 0.0 with anything (no NaN). The formula is dot / sqrt(max(|a|^2 |b|^2,
1e-16)) in fp32 (|a| |b| clamped at 1e-8, as F.cosine_similarity's eps; where |a|^2 |b|^2 overflows, the two
roots' product), so an exact copy of the previous row has similarity exactly 1.0 (copies of different rows
tie, and the row rule below decides), and for rows of tiny norm (|a| |b| < 1e-8) the value is dot / 1e-8
(near 0, ordered by the dot product); rows of huge norm (>= 2^63) are scaled by a power of two to a norm
in [0.5, 1) first by the public, validating kernels.semantic_mask (scale_huge_rows: their true cosine).
k_i = L_i - keep_i with keep_i = max(1, int(L_i * (1 - ratio))) (an empty video masks nothing).
Exact ties (equal scores) go to the lower row, here and in the Triton kernel. The reference breaks ties by
torch.argsort order (not stable): on CPU it keeps the lower rows of a tie for L <= 16, as semantic_inverted
does, and an unspecified order beyond. Its own short-video tiling (x8 / x3 copies of a crop, L <= 12)
makes exact ties, and there semantic_inverted masks the copies the reference masks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .packing import keep_counts, video_of_rows

MASKING_STRATEGIES = ("random", "semantic", "semantic_inverted")
COSINE_EPS = 1e-8
FP32_MAX = float(torch.finfo(torch.float32).max)
# Rows whose fp32 norm reaches 2^63 (squared norm 2^126, or overflowed to inf: |x| ~ 1e19 and up, fp32 or
# bf16) would give inf/inf = NaN similarities. scale_huge_rows scales each to a norm in [0.5, 1) by a power
# of two (exact; cosine is scale-invariant) before the similarity is taken; the public kernels.semantic_mask
# does it when validating, so neither the hot loop's torch path nor the Triton kernels pay for it. (A fixed
# 2^-80 left a 1e19 row at norm ~1e-5, whose product with a small neighbour's norm fell under COSINE_EPS:
# the clamp then shrank their cosine.)
BIG_NORM = 2.0 ** 63


def scale_huge_rows(x_Td: torch.Tensor) -> torch.Tensor:
    """x unchanged when no row can reach BIG_NORM; else fp32 x with those rows scaled by 2^-e to a norm
    in [0.5, 1) (e from the row's float64 norm, which cannot overflow). One pass (a row's norm is at most
    its max |value| * sqrt(d)), plus a norm pass in the rare case."""
    if x_Td.numel() == 0:
        return x_Td
    if float(x_Td.abs().amax()) * x_Td.shape[1] ** 0.5 < BIG_NORM:
        return x_Td
    x = x_Td.float()
    norm = x.double().norm(dim=-1)
    exponent = torch.frexp(norm).exponent
    scale = torch.where(norm >= BIG_NORM, torch.ldexp(torch.ones_like(norm), -exponent), 1.0)
    return x * scale.float()[:, None]


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """fp32 square root correctly rounded, as the kernels' sqrt_rn: torch's CPU sqrt is not always (sqrt(162.0)
    1 ulp low), so exact ties of integer-valued rows were broken there. Through float64: rounding twice is
    harmless for sqrt (53 >= 2 x 24 + 2 bits)."""
    return x.double().sqrt().float()


def adjacent_cosine(x_Td: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """fp32 [T]: cos(x_t, x_{t-1}) inside each video; 0.0 for each video's first row and for zero vectors."""
    x = x_Td.float()
    T = x.shape[0]
    # One spare slot: the start offset of a trailing empty video is T (empty videos are masking-level
    # no-ops, as in the kernel; the packed batch builder rejects them).
    sim = torch.zeros(T + 1, dtype=torch.float32, device=x.device)
    if T > 1:
        # Dot products and squared norms in one reduction, so each row's are summed alike: a row equal to its
        # predecessor then has dot == |a|^2 == |b|^2, and sqrt(fl(r * r)) == r makes its cosine exactly 1.0
        # (|a| |b| from two roots is 1 ulp off for about half of all r: exact copies ranked by rounding).
        products = torch.empty(2 * T - 1, x.shape[1], dtype=x.dtype, device=x.device)
        torch.mul(x[1:], x[:-1], out=products[:T - 1])
        torch.mul(x, x, out=products[T - 1:])
        sums = products.sum(-1)
        dot, sq = sums[:T - 1], sums[T - 1:]
        prod = sq[1:] * sq[:-1]
        denom = torch.where(prod <= FP32_MAX, _sqrt_rn(prod.clamp_min(COSINE_EPS * COSINE_EPS)),
                            _sqrt_rn(sq[1:]) * _sqrt_rn(sq[:-1]))  # the product overflows at norms of ~2^32 and up
        sim[1:T] = (dot.double() / denom.double()).float()  # correctly rounded, as the kernel's div_rn
    sim[cu_seqlens[:-1].long()] = 0.0
    return sim[:T]


def mask_lowest(scores_T: torch.Tensor, cu_seqlens: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
    """bool [T]: per video, True for the num_masked[b] rows with the lowest score (ties: lower row first)."""
    T = scores_T.shape[0]
    video_T = video_of_rows(cu_seqlens, T)
    # Two stable sorts = lexicographic sort by (video, score, row) without a per-video loop.
    by_score = torch.sort(scores_T, stable=True).indices
    order = by_score[torch.sort(video_T[by_score], stable=True).indices]
    rank_sorted = torch.arange(T, device=scores_T.device) - cu_seqlens.long()[video_T[order]]
    masked = torch.empty(T, dtype=torch.bool, device=scores_T.device)
    masked[order] = rank_sorted < num_masked.to(scores_T.device)[video_T[order]]
    return masked


def _keep_and_masked(cu_seqlens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [B] each: rows kept and rows masked per video."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    keep = keep_counts(lengths, mask_ratio)
    counts = torch.tensor([keep, [n - k for n, k in zip(lengths, keep)]], dtype=torch.int64, device=cu_seqlens.device)
    return counts[0], counts[1]


def random_mask(cu_seqlens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    device = device if device is not None else cu_seqlens.device
    T = int(cu_seqlens[-1])
    noise = torch.rand(T, generator=generator, device=generator.device if generator is not None else device)
    return mask_lowest(noise.to(device), cu_seqlens.to(device), _keep_and_masked(cu_seqlens, mask_ratio)[1].to(device))


def require_columns(x_Td: torch.Tensor) -> None:
    """Semantic masking ranks cosines: embeddings of no dims have none (every one would tie at 0)."""
    if x_Td.shape[-1] == 0:
        raise ValueError("x has d=0 columns: the cosine similarity semantic masking ranks is undefined")


def semantic_mask_torch(x_Td: torch.Tensor, cu_seqlens: torch.Tensor, mask_ratio: float,
                        inverted: bool = False) -> torch.Tensor:
    """Paper semantics (mask lowest adjacent similarity); inverted=True reproduces the reference code."""
    require_columns(x_Td)
    sim = adjacent_cosine(x_Td, cu_seqlens)
    keep, num_masked = (n.to(x_Td.device) for n in _keep_and_masked(cu_seqlens, mask_ratio))
    if inverted:  # the reference keeps the lowest similarities and masks the rest (module docstring)
        return ~mask_lowest(sim, cu_seqlens, keep)
    return mask_lowest(sim, cu_seqlens, num_masked)


def make_mask(strategy: str, x_Td: torch.Tensor, cu_seqlens: torch.Tensor, mask_ratio: float,
              generator: torch.Generator | None = None, kernels: str = "auto",
              max_seqlen: int | None = None) -> torch.Tensor:
    """Dispatch one masking strategy. kernels='triton'/'auto' routes semantic masking to kernels/.
    max_seqlen (host int) comes from a caller that built cu_seqlens itself: the kernel then skips its
    validating read of cu_seqlens, so masking on CUDA needs no host sync."""
    if strategy not in MASKING_STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {MASKING_STRATEGIES}")
    if strategy == "random":
        return random_mask(cu_seqlens, mask_ratio, generator=generator, device=x_Td.device)
    inverted = strategy == "semantic_inverted"
    if kernels != "torch":
        from . import kernels as K  # local import: triton is optional
        if K.use_triton(kernels, x_Td):
            return K.semantic_mask(x_Td, cu_seqlens, mask_ratio, inverted=inverted, max_seqlen=max_seqlen,
                                   validate=max_seqlen is None)
    return semantic_mask_torch(x_Td, cu_seqlens, mask_ratio, inverted=inverted)


def masked_counts(masked_T: torch.Tensor, cu_seqlens: torch.Tensor) -> list[int]:
    video_T = video_of_rows(cu_seqlens, masked_T.shape[0])
    return torch.bincount(video_T[masked_T], minlength=cu_seqlens.shape[0] - 1).tolist()




def build_masked_batch(x_Td: torch.Tensor, cu_seqlens: torch.Tensor, lengths: Sequence[int], strategy: str,
                       mask_ratio: float, generator: torch.Generator | None = None, kernels: str = "auto"):
    """Mask a packed batch and build its PackedBatch (works on CPU in DataLoader workers or on CUDA).
    `lengths` (host ints) are checked first: an empty batch or a zero-length video is a ValueError."""
    from .packing import PackedBatch, check_lengths

    lengths = check_lengths(lengths, int(x_Td.shape[0]))
    masked = make_mask(strategy, x_Td, cu_seqlens, mask_ratio, generator=generator, kernels=kernels,
                       max_seqlen=max(lengths))
    return PackedBatch.from_mask(x_Td, cu_seqlens, lengths, masked, keep=keep_counts(lengths, mask_ratio))
