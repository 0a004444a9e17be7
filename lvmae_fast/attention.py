"""Varlen self-attention behind one switch: attn_impl = auto | flash | torch_varlen | sdpa.

Inputs are packed rows q/k/v [T, H, Dh] with int32 cu_seqlens [B+1] and a Python-int max_seqlen;
attention never crosses a sequence boundary. All backends compute softmax(q k^T / sqrt(Dh)) v.
- flash:        flash_attn.flash_attn_varlen_func (CUDA, fp16/bf16; optional extra [flash]).
- torch_varlen: torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16, torch >= 2.10).
- sdpa:         any device/dtype: rows scattered into [B, H, max_seqlen, Dh] blocks with a key-padding
                mask, one batched SDPA call, gathered back (the CPU / fp32 path).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
ATTN_IMPLS = ("auto", "flash", "torch_varlen", "sdpa")


@functools.lru_cache(maxsize=None)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_impls(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run on this device/dtype, fastest first."""
    impls = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_varlen() is not None:
            impls.append("flash")
        if _torch_varlen() is not None:
            impls.append("torch_varlen")
    impls.append("sdpa")
    return impls


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str, device_type: str, dtype: torch.dtype) -> None:
    log.info("attention: attn_impl=%s -> %s (%s, %s)", requested, chosen, device_type, dtype)


def resolve_impl(attn_impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")
    possible = available_impls(device, dtype)
    if attn_impl == "auto":
        chosen = possible[0]
    elif attn_impl in possible:
        chosen = attn_impl
    elif attn_impl == "flash" and _flash_varlen() is None:
        raise RuntimeError("attn_impl='flash' needs flash-attn: pip install 'lvmae_fast[flash]' (CUDA source build)")
    else:
        raise RuntimeError(f"attn_impl={attn_impl!r} needs a CUDA device and fp16/bf16 activations "
                           f"(got {device.type}, {dtype}); use attn_impl='sdpa' or 'auto'")
    _log_choice(attn_impl, chosen, device.type, dtype)
    return chosen


def _padded_layout(cu_seqlens: torch.Tensor, total: int, max_seqlen: int):
    """Row -> flat slot in a [B, max_seqlen] block, plus the key-padding mask [B, max_seqlen]."""
    from .packing import video_of_rows

    cu = cu_seqlens.long()
    video = video_of_rows(cu_seqlens, total)
    slot = video * max_seqlen + (torch.arange(total, device=cu.device) - cu[video])
    lengths = cu[1:] - cu[:-1]
    key_valid = torch.arange(max_seqlen, device=cu.device)[None, :] < lengths[:, None]
    return slot, key_valid


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, layout=None):
    T, H, Dh = q.shape
    B = cu_seqlens.shape[0] - 1
    slot, key_valid = layout if layout is not None else _padded_layout(cu_seqlens, T, max_seqlen)

    def to_blocks(t):
        blocks = t.new_zeros(B * max_seqlen, H, Dh).index_copy(0, slot, t)
        return blocks.view(B, max_seqlen, H, Dh).transpose(1, 2)

    out = F.scaled_dot_product_attention(to_blocks(q), to_blocks(k), to_blocks(v), attn_mask=key_valid[:, None, None, :])
    return out.transpose(1, 2).reshape(B * max_seqlen, H, Dh)[slot]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, attn_impl: str = "auto", layout=None, resolved=False):
    """q, k, v: [T, H, Dh] packed; returns [T, H, Dh]. resolved=True: attn_impl is already a concrete
    backend (the model resolves once per step, outside any torch.compile region)."""
    impl = attn_impl if resolved else resolve_impl(attn_impl, q.device, q.dtype)
    if impl == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0)
    if impl == "torch_varlen":
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, layout=layout)
