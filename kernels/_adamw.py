"""Triton kernel of lvmae_fast.master_adamw: one AdamW update over flat fp32 master weights and moments,
reading low-precision gradients and writing the low-precision weight copy the forward uses.

Per element it reads the gradient (bf16: 2 bytes), the master weight and both moments (12) and writes
those three (12) and the bf16 copy (2): 28 bytes, where fused AdamW over fp32 parameters under autocast
moves 28 for the update plus ~24 around it (the forward's weight cast, the backward's gradient cast,
the norm pass and clipping's rescale of fp32 gradients). Clipping is a scale read by the kernel, and a
skipped step (found_inf) writes nothing, both from device scalars, so a captured step needs no host sync.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton import _jit


def _master_adamw_body(grad_ptr, master_ptr, m_ptr, v_ptr, low_ptr, n,
                       lr_ptr, step_size_ptr, bc2_sqrt_ptr, scale_ptr, skip_ptr,
                       one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                       HAS_LOW: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.AdamW's update (decoupled decay, then lerp/addcmul moments, then addcdiv) in fp32,
    in torch's operation order, 1 - beta rounded from double as torch does, so the two agree to rounding."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    skip = tl.load(skip_ptr + tl.zeros([BLOCK], tl.int32))       # vectors: the interpreter's masks must be
    keep = keep & (skip == 0.0)
    lr = tl.load(lr_ptr).to(tl.float32)
    step_size = tl.load(step_size_ptr)
    bc2_sqrt = tl.load(bc2_sqrt_ptr)
    scale = tl.load(scale_ptr)
    g = tl.load(grad_ptr + offs, mask=keep, other=0.0).to(tl.float32) * scale
    p = tl.load(master_ptr + offs, mask=keep, other=0.0)
    m = tl.load(m_ptr + offs, mask=keep, other=0.0)
    v = tl.load(v_ptr + offs, mask=keep, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + one_minus_beta1 * (g - m)                             # torch's lerp_ with weight < 0.5
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(master_ptr + offs, p, mask=keep)
    tl.store(m_ptr + offs, m, mask=keep)
    tl.store(v_ptr + offs, v, mask=keep)
    if HAS_LOW:
        # bf16 = fp32 rounded to nearest even, as torch's .to(bfloat16), by hand on the bits: Triton's
        # interpreter truncates in .to() (and rounds ties up with fp_downcast_rounding="rtne").
        bits = p.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN stays NaN (quiet, sign kept): rounding 0x7FFFFFFF, the GPU's NaN, would carry into -0.0.
        bits = tl.where(p != p, (bits >> 16) | 0x40, rounded)
        tl.store(low_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=keep)


master_adamw_kernel = _jit(_master_adamw_body)
BLOCK = 1024


def master_adamw(grad, master, m, v, low, lr, step_size, bc2_sqrt, scale, skip,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place on flat contiguous buffers of n elements: master, m, v fp32; grad any float dtype; low
    (the model's bf16 weights, flat) or None. lr, step_size, bc2_sqrt, scale, skip: 1-element device tensors."""
    n = master.numel()
    if n == 0:
        return
    master_adamw_kernel[(triton.cdiv(n, BLOCK),)](
        grad, master, m, v, low if low is not None else master, n, lr, step_size, bc2_sqrt, scale, skip,
        1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), float(weight_decay), HAS_LOW=low is not None, BLOCK=BLOCK,
        num_warps=4)
