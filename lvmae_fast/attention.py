"""Varlen self-attention behind one switch: attn_impl = auto | flash | fa4 | torch_varlen | sdpa.

Inputs are packed rows q/k/v [T, H, Dh] with int32 cu_seqlens [B+1] and a Python-int max_seqlen;
attention never crosses a sequence boundary. All backends compute softmax(q k^T / sqrt(Dh)) v.
- flash:        flash_attn.flash_attn_varlen_func (CUDA, fp16/bf16; optional extra [flash]).
- fa4:          flash_attn.cute.flash_attn_varlen_func, FlashAttention-4 (CuTe DSL kernels compiled at
                first use; Hopper and Blackwell paths; optional extra [fa4], wheels only, no CUDA build).
- torch_varlen: torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16, torch >= 2.10; FlashAttention-2
                kernels inside torch).
- sdpa:         any device/dtype: rows scattered into [B, H, max_seqlen, Dh] blocks with a key-padding
                mask, one batched SDPA call, gathered back (the CPU / fp32 path).
"""
from __future__ import annotations

import functools
import logging
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
ATTN_IMPLS = ("auto", "flash", "fa4", "torch_varlen", "sdpa")


@functools.lru_cache(maxsize=None)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _fa4_varlen():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError) as err:  # also a CuTe DSL whose CUDA libraries do not load
        log.debug("fa4 unavailable: %s", err)
        return None
    return flash_attn_varlen_func


def _fa4_attention(q, k, v, cu_seqlens, max_seqlen: int):
    out = _fa4_varlen()(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in the 4.0 betas


_fa4_opaque_call = None


def _fa4_opaque():
    """_fa4_attention behind torch.compiler.disable (FA4 launches its own JIT-compiled kernels: dynamo runs
    it as an opaque call), made at first use: wrapping at import would import dynamo, and with it
    triton, in compiled mode, before a CPU test can ask for the Triton interpreter."""
    global _fa4_opaque_call
    if _fa4_opaque_call is None:
        _fa4_opaque_call = torch.compiler.disable(_fa4_attention)
    return _fa4_opaque_call


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# FlashAttention-2 (flash-attn and torch's varlen copy of it) and FA4 take head dims up to 256.
MAX_FLASH_HEAD_DIM = 256


def _usable_impls(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> Iterator[str]:
    """Backends that can run on this device/dtype (and head dim, when known), fastest first, each probed
    only when asked for: a caller that stops at the first (auto) never imports the ones after it (FA4's
    import takes seconds)."""
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and (head_dim is None or head_dim <= MAX_FLASH_HEAD_DIM)):
        if _flash_varlen() is not None:
            yield "flash"
        if _torch_varlen() is not None:
            yield "torch_varlen"
        # After torch_varlen until a GPU run shows it faster on this model's shapes (bench/pretrain.py
        # --compare-attn fa4): auto picks it only when torch has no varlen kernels.
        if _fa4_varlen() is not None:
            yield "fa4"
    yield "sdpa"


def available_impls(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> list[str]:
    """Backends that can run on this device/dtype, fastest first."""
    return list(_usable_impls(device, dtype, head_dim))


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str, device_type: str, dtype: torch.dtype) -> None:
    log.info("attention: attn_impl=%s -> %s (%s, %s)", requested, chosen, device_type, dtype)


def resolve_impl(attn_impl: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {ATTN_IMPLS}")
    if attn_impl == "auto":
        chosen = next(_usable_impls(device, dtype, head_dim))
    elif attn_impl in _usable_impls(device, dtype, head_dim):
        chosen = attn_impl
    elif device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        # First: installing the package would not help here (a model trained with flash, loaded on a CPU).
        raise RuntimeError(f"attn_impl={attn_impl!r} needs a CUDA device and fp16/bf16 activations "
                           f"(got {device.type}, {dtype}); use attn_impl='sdpa' or 'auto' (a saved model: "
                           f"LVMAE.from_pretrained(DIR, attn_impl='auto'))")
    elif head_dim is not None and head_dim > MAX_FLASH_HEAD_DIM:
        raise RuntimeError(f"attn_impl={attn_impl!r} takes head dims up to {MAX_FLASH_HEAD_DIM}, this model's "
                           f"are {head_dim}; use attn_impl='sdpa' or 'auto'")
    elif attn_impl == "flash" and _flash_varlen() is None:
        raise RuntimeError("attn_impl='flash' needs flash-attn: pip install 'lvmae_fast[flash]' (CUDA source build)")
    elif attn_impl == "fa4" and _fa4_varlen() is None:
        raise RuntimeError("attn_impl='fa4' needs flash-attn-4 and the CuTe DSL: pip install 'lvmae_fast[fa4]'")
    else:
        raise RuntimeError(f"attn_impl={attn_impl!r} is not available here (torch_varlen needs torch >= 2.10); "
                           "use attn_impl='sdpa' or 'auto'")
    _log_choice(attn_impl, chosen, device.type, dtype)
    if chosen == "fa4":
        _fa4_opaque()  # wrapped here, outside any compiled region
    return chosen


# On the host (CPU tensors), videos are grouped by length class (powers of two, at least MIN_CLASS)
# and each class is padded to its own longest: cost ~ sum of L_i^2 instead of B * max_L^2, which
# matters when one long video shares a batch with many short ones (4096 tokens + 64 short videos:
# one padded block is 65 x 4096 rows). On CUDA the class split would need a host read of
# cu_seqlens (a sync, and impossible inside a CUDA graph), so there it stays one block.
MIN_CLASS = 16


class PaddedGroup:
    """Videos attended together in one [B, L] block: rows (packed row indices, None = all rows in
    order), slot (row -> flat slot of the block), key_valid [B, L]."""

    def __init__(self, rows, slot, key_valid):
        self.rows, self.slot, self.key_valid = rows, slot, key_valid


def _block(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row -> flat slot in a [B, max_seqlen] block, plus the key-padding mask [B, max_seqlen]."""
    from .packing import video_of_rows

    cu = cu_seqlens.long()
    video = video_of_rows(cu_seqlens, total)
    slot = video * max_seqlen + (torch.arange(total, device=cu.device) - cu[video])
    lengths = cu[1:] - cu[:-1]
    key_valid = torch.arange(max_seqlen, device=cu.device)[None, :] < lengths[:, None]
    return slot, key_valid


def _padded_layout(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> list[PaddedGroup]:
    if cu_seqlens.device.type != "cpu":
        return [PaddedGroup(None, *_block(cu_seqlens, total, max_seqlen))]
    from .packing import cu_seqlens_from_lengths, video_of_rows

    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    classes = torch.clamp(lengths, min=1).sub(1).bitwise_or(MIN_CLASS - 1)  # next power of two - 1, >= MIN_CLASS - 1
    for shift in (1, 2, 4, 8, 16, 32):
        classes |= classes >> shift
    class_ids = torch.unique(classes).tolist()
    if len(class_ids) == 1:  # one class: the whole batch is one block, as on CUDA
        return [PaddedGroup(None, *_block(cu_seqlens, total, int(lengths.max())))]
    class_of_row = classes[video_of_rows(cu_seqlens, total)]
    groups = []
    for cls in class_ids:
        sub_lengths = lengths[classes == cls]
        rows = (class_of_row == cls).nonzero().flatten()  # the class's videos' rows, in packed order
        groups.append(PaddedGroup(rows, *_block(cu_seqlens_from_lengths(sub_lengths.tolist()), len(rows),
                                                int(sub_lengths.max()))))
    return groups


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, layout=None):
    T, H, Dh = q.shape
    groups = layout if layout is not None else _padded_layout(cu_seqlens, T, max_seqlen)
    out = None
    for g in groups:
        B, L = g.key_valid.shape

        def to_blocks(t):
            t = t if g.rows is None else t.index_select(0, g.rows)
            blocks = t.new_zeros(B * L, H, Dh).index_copy(0, g.slot, t)
            return blocks.view(B, L, H, Dh).transpose(1, 2)

        res = F.scaled_dot_product_attention(to_blocks(q), to_blocks(k), to_blocks(v),
                                             attn_mask=g.key_valid[:, None, None, :])
        res = res.transpose(1, 2).reshape(B * L, H, Dh)[g.slot]
        if g.rows is None:
            return res
        out = (q.new_zeros(T, H, Dh) if out is None else out).index_copy(0, g.rows, res)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, attn_impl: str = "auto", layout=None, resolved=False):
    """q, k, v: [T, H, Dh] packed; returns [T, H, Dh]. resolved=True: attn_impl is already a concrete
    backend (the model resolves once per step, outside any torch.compile region)."""
    impl = attn_impl if resolved else resolve_impl(attn_impl, q.device, q.dtype, q.shape[-1])
    if impl == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0)
    if impl == "torch_varlen":
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    if impl == "fa4":
        return _fa4_opaque()(q, k, v, cu_seqlens, max_seqlen)
    return sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, layout=layout)
