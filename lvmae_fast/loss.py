"""Masked reconstruction loss: per-token mean over dims, then mean over masked tokens (as the reference).

The model decodes only the masked rows, so the loss takes pred_rows [Tm, d] plus the row ids of their
targets in x [T, d]. With kernels='auto' on CUDA (or 'triton'), the fused Triton kernel reads targets in
place and writes the gradient directly; otherwise this torch path runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("mse", "cosine")
# The reference's cosine loss is nn.CosineSimilarity(dim=-1, eps=1e-6) (models_mae.py); each norm is
# clamped to eps. Only near-zero predictions or targets feel it, but converted models must match.
LOSS_COSINE_EPS = 1e-6


def standardise_targets(target: torch.Tensor) -> torch.Tensor:
    """MAE's norm_pix_loss: each target token to zero mean / unit variance over its dims."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + 1e-6).sqrt()


def check_loss_inputs(pred: torch.Tensor, target: torch.Tensor, loss: str) -> None:
    """pred [N, d] against target [T, d] rows: ValueError naming what does not fit (both loss paths)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if not isinstance(pred, torch.Tensor) or pred.dim() != 2:
        raise ValueError(f"pred must be [N, d], got shape {tuple(getattr(pred, 'shape', ()))}")
    if not isinstance(target, torch.Tensor) or target.dim() != 2:
        raise ValueError(f"target must be [T, d], got shape {tuple(getattr(target, 'shape', ()))}")
    if pred.shape[1] != target.shape[1]:
        raise ValueError(f"pred dim {pred.shape[1]} != target dim {target.shape[1]}")
    if pred.shape[1] == 0:  # a mean over no dims would be a silent NaN
        raise ValueError("pred and target have d=0 columns: the loss is undefined")
    if pred.device != target.device:
        raise ValueError(f"pred on {pred.device} but target on {target.device}")


def checked_loss_rows(pred_rows: torch.Tensor, target: torch.Tensor, rows) -> torch.Tensor:
    """`rows` (the target row of each predicted row) on pred's device, ValueError when they do not fit."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.shape[0] != pred_rows.shape[0]:
        raise ValueError(f"rows must be a 1-D index tensor of length {pred_rows.shape[0]}, got "
                         f"{tuple(getattr(rows, 'shape', ()))}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rows must be int64 (or int32), got {rows.dtype}")
    rows = rows.to(pred_rows.device)
    if not rows.is_cuda and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= target.shape[0]):
        raise ValueError(f"rows index out of range [0, {target.shape[0]})")  # checked where it is free
    return rows


def masked_reconstruction_loss(pred_rows: torch.Tensor, x_Td: torch.Tensor, masked_rows: torch.Tensor,
                               loss: str = "mse", norm_targets: bool = False, kernels: str = "torch",
                               row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """row_weights [Tm] (shape-bucketed batches): sum(w * per-row loss) replaces the plain mean, so
    padding rows (w = 0) drop out; the torch path computes it (a bucketed step runs as a CUDA graph,
    where the extra launches cost nothing)."""
    check_loss_inputs(pred_rows, x_Td, loss)
    masked_rows = checked_loss_rows(pred_rows, x_Td, masked_rows)
    if norm_targets and x_Td.shape[1] < 2:
        raise ValueError(f"norm_targets needs embeddings of 2 or more dims, got {x_Td.shape[1]}: "
                         "the variance of one value is undefined")
    if row_weights is not None and row_weights.shape != (pred_rows.shape[0],):
        raise ValueError(f"row_weights has shape {tuple(row_weights.shape)}, expected ({pred_rows.shape[0]},)")
    if pred_rows.shape[0] == 0:
        # Nothing masked (ratio 0 or only 1-token videos): zero loss that still back-propagates.
        return pred_rows.sum() * 0.0
    # Accumulate in at least fp32 (bf16/fp16 activations are upcast; fp64 stays fp64 for exact tests).
    acc_dtype = torch.promote_types(pred_rows.dtype, torch.float32)
    if kernels != "torch" and row_weights is None:
        from . import kernels as K
        if K.use_triton(kernels, pred_rows):
            # The kernel reads target rows in place, so it gets the full (standardised) matrix.
            target = standardise_targets(x_Td.to(acc_dtype)) if norm_targets else x_Td
            return K.masked_mse_rows(pred_rows, target, masked_rows, loss=loss)
    pred = pred_rows.to(acc_dtype)
    tgt = x_Td.index_select(0, masked_rows).to(acc_dtype)
    if norm_targets:  # per-row, so standardising only the masked rows gives the same values
        tgt = standardise_targets(tgt)
    if loss == "cosine":
        per_row = 1.0 - F.cosine_similarity(pred, tgt, dim=-1, eps=LOSS_COSINE_EPS)
    else:
        per_row = (pred - tgt).pow(2).mean(-1)
    return per_row.mean() if row_weights is None else (per_row * row_weights.to(acc_dtype)).sum()
