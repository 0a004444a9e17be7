"""Triton kernels (imported as lvmae_fast.kernels): semantic-mask selection and fused masked losses.

Public API (other modules rely on these exact names/signatures):
    semantic_mask(x, cu_seqlens, mask_ratio, inverted=False) -> bool [T]
    masked_mse(pred, target, masked) -> scalar
    masked_mse_rows(pred_rows, target, rows, loss="mse") -> scalar
    use_triton(switch, tensor) -> bool

Every function runs on CUDA tensors (Triton) and on CPU tensors (the Triton interpreter when
TRITON_INTERPRET=1, otherwise the torch reference), and falls back to torch when triton is missing.
Triton is imported lazily so `import lvmae_fast.kernels` works without it. Losses come back in fp32.
"""
from __future__ import annotations

import functools
import numbers
import os

import torch

# Absolute import: this folder sits at the repo top level, where tools that probe for a PyPI package
# named `kernels` (transformers does) may import it as top-level `kernels`; that must not crash them.
from lvmae_fast.loss import LOSS_COSINE_EPS, checked_loss_rows
from lvmae_fast.loss import check_loss_inputs as _check_loss_inputs
from lvmae_fast.masking import require_columns, scale_huge_rows, semantic_mask_torch

__all__ = ["semantic_mask", "masked_mse", "masked_mse_rows", "use_triton", "triton_available", "triton_mode"]

_SWITCHES = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp64 stays on the exact torch path


# ----------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing libs): either way, not usable
        return False
    return True


def triton_mode() -> str | None:
    """'interpret', 'compiled', or None when triton is not importable.

    Triton fixes the mode per process at its first import, from TRITON_INTERPRET at that moment (its
    own @jit helpers behind tl.sum/tl.max are built then); this imports it if nobody has yet."""
    if not triton_available():
        return None
    return "interpret" if _tk().INTERPRETED else "compiled"


def _interpreting() -> bool:
    # TRITON_INTERPRET is read at call time (tests toggle it with monkeypatch), and the interpreter
    # must also be what triton was imported as.
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and triton_mode() == "interpret"


def use_triton(switch: str, tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for `tensor` under the kernels switch auto|triton|torch."""
    if switch not in _SWITCHES:
        raise ValueError(f"unknown kernels switch {switch!r}; choose one of {_SWITCHES}")
    if switch == "torch":
        return False
    if switch == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernels='triton' but triton is not importable: `pip install lvmae_fast[triton]` "
                           "(or use kernels='auto'/'torch')")
    if tensor.is_cuda or _interpreting():
        return True
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernels='triton' on a CPU tensor: TRITON_INTERPRET=1 was set after triton was "
                           "imported in compiled mode; set it before the first import of triton")
    raise RuntimeError("kernels='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
                       "before importing triton (slow; for tests) or use kernels='auto'/'torch'")


def _runs_triton(t: torch.Tensor) -> bool:
    """Implicit dispatch of the public functions: CUDA -> Triton, CPU -> interpreter if enabled, else torch."""
    return t.dtype in _KERNEL_DTYPES and triton_available() and (t.is_cuda or _interpreting())


def _tk():
    from . import _triton  # deferred: imports triton
    return _triton


# ----------------------------------------------------------------------------------------------------
# semantic masking
# ----------------------------------------------------------------------------------------------------
def _check_ratio(mask_ratio) -> float:
    if (isinstance(mask_ratio, torch.Tensor) and mask_ratio.numel() == 1 and mask_ratio.dtype != torch.bool
            and not mask_ratio.is_complex()):
        mask_ratio = mask_ratio.item()  # a 0-d tensor, like a numpy float, is a number (a host read on CUDA)
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):  # numpy floats too
        raise ValueError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return float(mask_ratio)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, T: int, validate: bool) -> int | None:
    """Raise ValueError on malformed offsets; returns the longest video when it was read anyway."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of B+1 offsets, got "
                         f"{type(cu_seqlens).__name__} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (flash-attn convention) or int64, got {cu_seqlens.dtype}")
    if not validate:
        return None
    # One host read (a device sync when cu_seqlens is on CUDA; pass validate=False to skip it).
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    zero = lengths.new_zeros(1)
    first, last, min_len, max_len = torch.cat([cu_seqlens[:1].long(), cu_seqlens[-1:].long(),
                                               torch.cat([lengths, zero]).min().view(1),
                                               torch.cat([lengths, zero]).max().view(1)]).tolist()
    if first != 0 or last != T:
        raise ValueError(f"cu_seqlens must run from 0 to T={T} (x has {T} rows), got {first}..{last}")
    if min_len < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    return max_len


def semantic_mask(x: torch.Tensor, cu_seqlens: torch.Tensor, mask_ratio: float, inverted: bool = False,
                  *, max_seqlen: int | None = None, validate: bool = True, sim_config=None) -> torch.Tensor:
    """bool [T], True = masked: per video the k_i = L_i - max(1, int(L_i * (1 - ratio))) rows with the
    lowest cosine similarity to their predecessor, ties to the lower row (inverted: the rows left after
    keeping the max(1, int(L_i * (1 - ratio))) lowest, ties kept from the lower row, as the reference).

    Equals masking.semantic_mask_torch (same fp32 similarity formula, same tie rule): exactly wherever
    the similarities do not depend on summation order (e.g. integer-valued rows), and for exact copies of
    the previous row (similarity exactly 1.0 in both); two similarities that differ only in the last bit
    (near-duplicate rows) may rank differently than in torch's reduction.
    max_seqlen (host int, optional) only picks a block size; validate=False skips the value checks on
    cu_seqlens and x (host reads) and the rescale of rows of norm >= 2^63 (masking.scale_huge_rows), for
    hot loops that built cu_seqlens themselves from checked, normalised embeddings. sim_config (tuning,
    Triton path only): the similarity kernel's launch configuration, (BLOCK_T, BLOCK_D[, num_warps[,
    num_stages]]) or a _triton.SimConfig; None = the default (bench/kernels.py --sweep-sim compares them)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, d] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be floating point, got {x.dtype}")
    require_columns(x)
    ratio = _check_ratio(mask_ratio)
    if not isinstance(cu_seqlens, torch.Tensor) and hasattr(cu_seqlens, "__len__"):  # list, tuple, numpy array
        try:
            cu_seqlens = torch.as_tensor(cu_seqlens, device=x.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"cu_seqlens must be a 1-D tensor of B+1 offsets: {e}") from None
    longest = _check_cu_seqlens(cu_seqlens, x.shape[0], validate)
    if validate and not bool(torch.isfinite(x).all()):  # a NaN similarity has no rank: refuse, as the model does
        bad = (~torch.isfinite(x).all(1)).nonzero().flatten()[:10].tolist()
        raise ValueError(f"x holds NaN/Inf values (rows {bad})")
    if validate:  # rows of norm >= 2^63 overflow the fp32 squared norm: scaled here, not in the hot paths
        x = scale_huge_rows(x)
    if x.shape[0] >= 2 ** 31:
        raise ValueError(f"x has {x.shape[0]} rows; int32 offsets hold at most 2^31 - 1")
    cu = cu_seqlens.to(x.device, torch.int32, non_blocking=True)  # int64 offsets are accepted, kernels take int32
    if not _runs_triton(x):
        return semantic_mask_torch(x, cu, ratio, inverted=inverted)
    if x.stride(-1) != 1:
        x = x.contiguous()
    # k_i on the device in float64: bit-identical to Python's int(L * (1 - ratio)), no host round trip.
    lengths = (cu[1:] - cu[:-1]).long()
    keep = torch.floor(lengths.double() * (1.0 - ratio)).long().clamp_min(1)
    num_masked = (lengths - keep).to(torch.int32)
    return _tk().semantic_mask(x, cu.contiguous(), num_masked, bool(inverted),
                               max_seqlen=max_seqlen if max_seqlen is not None else longest, sim_config=sim_config)


# ----------------------------------------------------------------------------------------------------
# fused masked losses
# ----------------------------------------------------------------------------------------------------
class _MaskedLoss(torch.autograd.Function):
    """mean over active rows of a per-row loss; pred row i pairs with target row rows[i] (or i), and with
    a mask only rows with mask[i] count. Gradients w.r.t. pred, and w.r.t. target when it requires grad
    (as torch's formula gives: both losses are symmetric in pred and target, so the same kernel with the
    two swapped computes it). Under create_graph the gradient comes from the torch formula."""

    @staticmethod
    def forward(ctx, pred, target, rows, mask, cosine: bool):
        part = _tk().masked_loss_forward(pred, target, rows, mask, cosine)
        # Divide by the active-row count without a host sync: a Python number for the rows path, a
        # device tensor for the mask path (clamped: no active rows -> loss 0, not NaN).
        count_t = None if mask is None else mask.sum().float().clamp_min(1.0)
        ctx.save_for_backward(pred, target, rows, mask, count_t)
        ctx.count, ctx.cosine = float(pred.shape[0]), cosine
        return part.sum() / (ctx.count if count_t is None else count_t)

    @staticmethod
    def backward(ctx, grad_out):
        pred, target, rows, mask, count_t = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the gradient must itself be differentiable, so it
            # comes from the torch formula (same values; the kernel's gradient is first-order only).
            wrt = [t for t, needed in zip((pred, target), ctx.needs_input_grad[:2]) if needed]
            loss = _loss_torch(pred, target, rows, None if mask is None else mask != 0, ctx.cosine)
            got = iter(torch.autograd.grad(loss, wrt, grad_out, create_graph=True))
            return (*(next(got) if needed else None for needed in ctx.needs_input_grad[:2]), None, None, None)
        count = ctx.count if count_t is None else count_t
        scale = (grad_out.float() / count).reshape(1).contiguous()  # read by the kernel: no host sync
        grad = grad_target = None
        if ctx.needs_input_grad[0]:
            grad = _tk().masked_loss_backward(pred, target, rows, mask, scale, ctx.cosine)
        if ctx.needs_input_grad[1]:
            if rows is None:  # row i of target pairs with row i of pred
                grad_target = _tk().masked_loss_backward(target, pred, None, mask, scale, ctx.cosine)
            else:  # gathered target rows (fp32: repeated rows add up before one rounding)
                g_rows = _tk().masked_loss_backward(target.index_select(0, rows).float(), pred, None, None,
                                                    scale, ctx.cosine)
                grad_target = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
                grad_target = grad_target.index_add_(0, rows, g_rows).to(target.dtype)
        return grad, grad_target, None, None, None


def _row_loss_torch(pred: torch.Tensor, tgt: torch.Tensor, loss: str) -> torch.Tensor:
    acc = torch.promote_types(pred.dtype, torch.float32)
    p, t = pred.to(acc), tgt.to(acc)
    if loss == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=LOSS_COSINE_EPS)
    return (p - t).pow(2).mean(-1)


def _loss_torch(pred, target, rows, masked, cosine: bool) -> torch.Tensor:
    """The torch path of masked_mse (masked bool [N]) / masked_mse_rows (rows [N])."""
    loss = "cosine" if cosine else "mse"
    if rows is not None:
        # A half-precision target that needs a gradient is gathered in fp32, so a repeated row's gradients
        # add up before one rounding, as in the kernel path (in fp16 one of them alone could overflow to inf).
        if target.requires_grad:
            target = target.to(torch.promote_types(target.dtype, torch.float32))
        return _row_loss_torch(pred, target.index_select(0, rows), loss).mean()
    # Unmasked rows are never read (as in the kernel): zeroing them with torch.where, not multiplying
    # their loss by 0, keeps a NaN/Inf there out of the loss and the gradient (NaN * 0 = NaN), with
    # no host sync (indexing the masked rows would need their count on the host).
    keep = masked[:, None]
    per_row = _row_loss_torch(torch.where(keep, pred, 0), torch.where(keep, target, 0), loss)
    return per_row.sum() / masked.sum().clamp_min(1)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """fp32 scalar: mean over dims of (pred - target)^2, then mean over rows where masked (0 if none).
    pred/target [T, d], masked bool [T]; differentiable w.r.t. pred (unmasked rows get zero grad) and,
    when it requires grad, target (as torch's formula)."""
    _check_loss_inputs(pred, target, "mse")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool or masked.shape != pred.shape[:1]:
        raise ValueError(f"masked must be a bool tensor of shape [{pred.shape[0]}], got "
                         f"{getattr(masked, 'dtype', type(masked))} {tuple(getattr(masked, 'shape', ()))}")
    masked = masked.to(pred.device)
    if not _runs_triton(pred) or pred.shape[0] == 0:
        return _loss_torch(pred, target, None, masked, False)
    return _MaskedLoss.apply(_rowmajor(pred), _rowmajor(target), None,
                             masked.contiguous().view(torch.uint8), False)


def masked_mse_rows(pred_rows: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
                    loss: str = "mse") -> torch.Tensor:
    """fp32 scalar: mean over the Tm predicted rows of the per-row loss against target[rows].

    pred_rows [Tm, d] (decoder output for masked rows only), target [T, d] (read in place, never
    gathered), rows int64 [Tm]. loss "mse" (mean over dims of squared error) or "cosine" (1 - cos).
    Differentiable w.r.t. pred_rows (and target, when it requires grad). Tm == 0 gives a zero loss that
    still back-propagates."""
    _check_loss_inputs(pred_rows, target, loss)
    rows = checked_loss_rows(pred_rows, target, rows)
    if pred_rows.shape[0] == 0:
        return pred_rows.sum().float() * 0.0
    if not _runs_triton(pred_rows):
        return _loss_torch(pred_rows, target, rows, None, loss == "cosine")
    return _MaskedLoss.apply(_rowmajor(pred_rows), _rowmajor(target), rows.contiguous(), None,
                             loss == "cosine")
