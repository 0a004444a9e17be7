"""Triton kernel bodies and their launchers (imported lazily by kernels/__init__.py: triton is optional).

Shape legend: T packed rows, B videos, d dims, N loss rows (Tm masked rows, or T rows filtered by a mask).

Interpreter vs compiled: Triton fixes this per process when it is first imported (TRITON_INTERPRET at
that moment decides how its own @jit helpers behind tl.sum/tl.max/tl.cumsum are built), so the kernels
here follow that mode (INTERPRETED) rather than re-reading the variable. In interpreter mode they run
on CPU tensors (and on CUDA tensors via host copies); in compiled mode on CUDA tensors only.

Semantic-mask selection (why this algorithm): per video we need "the k_i lowest scores, ties to the lower
row". A full sort per video is O(L log^2 L) bitonic work and caps L at what fits in one block; rank
counting is O(L^2). Instead each score is mapped to an int32 key whose integer order is the float order
(-0.0 folded into +0.0, as torch's sort treats them as equal), and one program per video (or per group
of short videos, as a [VIDS, BLOCK] tile) finds the k-th smallest key by radix select: 32 bits in 32/RADIX_BITS passes, each pass streaming the video in BLOCK-row
chunks and counting, for all 2^RADIX_BITS candidate digits at once, how many keys fall at or below each.
A last pass masks keys below the threshold plus the first (k - #below) keys equal to it in row order
(a running cumsum across chunks), which is exactly torch's stable-sort tie rule. Cost O(L * passes), any
L (1 .. 32768+, chunked), no shared-memory sort, deterministic. The similarity itself is a separate
row-parallel kernel so that one long video does not leave the GPU idle while its d-dim dots run.
The default selection kernel (SELECT_IMPL "hist"; "Histogram selection" below) runs that search with
tl.histogram counting the digits and, where a program's videos fit one tile, their keys read only once.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl
import triton.language.standard as _tl_standard
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# The clamps of the torch paths, shared: semantic similarity (F.cosine_similarity's 1e-8) and the
# cosine loss (the reference's nn.CosineSimilarity eps, 1e-6).
from lvmae_fast.loss import LOSS_COSINE_EPS
from lvmae_fast.masking import COSINE_EPS, FP32_MAX as _FP32_MAX

FP32_MAX = tl.constexpr(_FP32_MAX)  # a global a kernel reads must be a constexpr

# The mode triton itself was imported in (tl.standard.cdiv is @triton.jit'd at that import).
INTERPRETED = isinstance(_tl_standard.cdiv, InterpretedFunction)
_jit = InterpretedFunction if INTERPRETED else JITFunction


# ----------------------------------------------------------------------------------------------------
# kernel bodies
# ----------------------------------------------------------------------------------------------------
def _cosine_denominator_body(sq_a, sq_b, EPS: tl.constexpr):
    """masking.adjacent_cosine's denominator: sqrt(max(|a|^2 |b|^2, eps^2)), so that a row equal to its
    predecessor (dot == |a|^2 == |b|^2, summed alike) has cosine exactly 1.0 (sqrt_rn(fl(r * r)) == r);
    where the product overflows fp32, sqrt(|a|^2) sqrt(|b|^2)."""
    prod = sq_a * sq_b
    return tl.where(prod <= FP32_MAX, tl.sqrt_rn(tl.maximum(prod, EPS * EPS)), tl.sqrt_rn(sq_a) * tl.sqrt_rn(sq_b))


def _adjacent_key_body(x_ptr, key_ptr, T, D, stride_x,
                       INVERTED: tl.constexpr, EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """key[t] = sortable int32 of score(t), score = +-cos(x_t, x_{t-1}) in fp32, ignoring video starts
    (the selection kernel overrides each video's first row with score 0.0, whose key is 0)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_T = rows < T
    has_prev = in_T & (rows > 0)
    cur_off = rows.to(tl.int64) * stride_x          # int64: T * d can exceed 2^31 at paper batch sizes
    prev_off = (rows - 1).to(tl.int64) * stride_x
    dot = tl.zeros([BLOCK_T], tl.float32)
    sq_cur = tl.zeros([BLOCK_T], tl.float32)
    sq_prev = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_D = (cols < D)[None, :]
        a = tl.load(x_ptr + cur_off[:, None] + cols[None, :], mask=in_T[:, None] & in_D, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + prev_off[:, None] + cols[None, :], mask=has_prev[:, None] & in_D, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        sq_cur += tl.sum(a * a, axis=1)
        sq_prev += tl.sum(b * b, axis=1)
    # Same formula as masking.adjacent_cosine (IEEE sqrt/div, not approx, so the GPU rounds like torch does).
    s = tl.div_rn(dot, _cosine_denominator(sq_cur, sq_prev, EPS))
    if INVERTED:
        s = -s
    s = tl.where(s == 0.0, 0.0, s)                  # -0.0 -> +0.0: torch's sort sees them as equal
    bits = s.to(tl.int32, bitcast=True)
    # Flip the magnitude bits of negatives: signed-int order of `key` == float order of `s`.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    tl.store(key_ptr + rows, key, mask=in_T)


def _adjacent_key_stream_body(x_ptr, key_ptr, T, D, stride_x, INVERTED: tl.constexpr, EPS: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Same keys as _adjacent_key_body, reading every row once: each program walks ROWS consecutive
    rows (whole rows, BLOCK_D >= D) and carries the previous row and its squared norm in registers.
    The tiled kernel loads each row twice (as a row and as the next row's predecessor; the second load
    mostly hits L1/L2); this one trades that for a cross-warp reduction per row. A candidate measured
    against the tiled kernel by bench/kernels.py (SIM_KERNEL below picks what semantic_mask launches)."""
    r0 = tl.program_id(0) * ROWS
    cols = tl.arange(0, BLOCK_D)
    in_D = cols < D
    zeros = tl.zeros([BLOCK_D], tl.int32)   # row conditions as vectors (the interpreter's masks must be)
    prev = tl.load(x_ptr + (r0 - 1).to(tl.int64) * stride_x + cols, mask=in_D & (zeros + r0 > 0),
                   other=0.0).to(tl.float32)
    sq_prev = tl.sum(prev * prev, axis=0)
    slots = tl.arange(0, ROWS)
    scores = tl.zeros([ROWS], tl.float32)   # stored once at the end: one coalesced store, not ROWS scalars
    for i in range(ROWS):
        row_off = (r0 + i).to(tl.int64) * stride_x
        cur = tl.load(x_ptr + row_off + cols, mask=in_D & (zeros + r0 + i < T), other=0.0).to(tl.float32)
        dot = tl.sum(cur * prev, axis=0)
        sq_cur = tl.sum(cur * cur, axis=0)
        scores = tl.where(slots == i, tl.div_rn(dot, _cosine_denominator(sq_cur, sq_prev, EPS)), scores)
        prev, sq_prev = cur, sq_cur
    if INVERTED:
        scores = -scores
    scores = tl.where(scores == 0.0, 0.0, scores)
    bits = scores.to(tl.int32, bitcast=True)
    rows = r0 + slots
    tl.store(key_ptr + rows, bits ^ ((bits >> 31) & 0x7FFFFFFF), mask=rows < T)


def _select_lowest_body(key_ptr, cu_ptr, k_ptr, out_ptr, B,
                        VIDS: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """VIDS videos per program (a [VIDS, BLOCK] tile, so thousands of short videos do not each pay for
    a mostly-empty 1024-wide chunk): out[row] = 1 for the k lowest keys of each video, ties lower row."""
    pid = tl.program_id(0)
    vids = pid * VIDS + tl.arange(0, VIDS)
    in_B = vids < B
    start = tl.load(cu_ptr + vids, mask=in_B, other=0)
    length = tl.load(cu_ptr + vids + 1, mask=in_B, other=0) - start
    k = tl.load(k_ptr + vids, mask=in_B, other=0).to(tl.int32)
    span = tl.max(length, axis=0)                    # chunk loop bound: longest video of the group
    count_span = tl.max(tl.where(k > 0, length, 0), axis=0)  # k <= 0 (ratio 0, L == 1): nothing to count
    offs = tl.arange(0, BLOCK)
    NB: tl.constexpr = 2 ** RADIX_BITS
    digits = tl.arange(0, NB)

    # Invariant per video: threshold key K lies in [lo, lo + 2^bits_left), `below` = #keys < lo (< k).
    lo = tl.full([VIDS], -2147483648, tl.int64)
    below = tl.zeros([VIDS], tl.int32)
    for p in tl.static_range(32 // RADIX_BITS):
        width = 2 ** (32 - (p + 1) * RADIX_BITS)    # sub-range per digit (constexpr)
        # Upper edge of each digit's sub-range [VIDS, NB]; always within int32 by the invariant.
        upper = (lo[:, None] + (digits[None, :].to(tl.int64) + 1) * width - 1).to(tl.int32)
        cnt = tl.zeros([VIDS, NB], tl.int32)
        for c in range(0, count_span, BLOCK):
            pos = c + offs
            valid = pos[None, :] < length[:, None]
            key = tl.load(key_ptr + start[:, None] + pos[None, :], mask=valid, other=0)
            key = tl.where(pos[None, :] == 0, 0, key)  # first row of a video: similarity 0.0 -> key 0
            le = (key[:, :, None] <= upper[:, None, :]) & valid[:, :, None]
            cnt += tl.sum(le.to(tl.int32), axis=1)
        # cnt is non-decreasing over digits; the first digit whose cumulative count reaches k holds K.
        j = tl.sum((cnt < k[:, None]).to(tl.int32), axis=1)
        below = tl.where(j > 0, tl.sum(tl.where(digits[None, :] == j[:, None] - 1, cnt, 0), axis=1), below)
        lo = lo + j.to(tl.int64) * width
    thr = lo.to(tl.int32)
    need_ties = k - below                            # how many keys == K to mask, in row order

    seen = tl.zeros([VIDS], tl.int32)
    for c in range(0, span, BLOCK):
        pos = c + offs
        valid = pos[None, :] < length[:, None]
        rows = start[:, None] + pos[None, :]
        key = tl.load(key_ptr + rows, mask=valid, other=0)
        key = tl.where(pos[None, :] == 0, 0, key)
        hit, ties = _mark(key, valid, thr, need_ties, k, seen)
        tl.store(out_ptr + rows, hit.to(tl.int8), mask=valid)
        seen += ties


# Histogram selection (SELECT_IMPL "hist", the default since its H200 timing): the same threshold search with R-bit digits
# counted by tl.histogram (one bin per digit and video, instead of a compare against every digit edge),
# and, where the videos of a program fit in one BLOCK tile, their keys loaded once and kept in registers
# through every pass. R need not divide 32 (the last pass takes the bits left). No int64: the candidate
# range [lo, hi] of a pass is an aligned block of int32 around the threshold, so its ends are int32 too.
_KEY_MAX = tl.constexpr(2147483647)  # padding rows: above every candidate range, so in the top bin


def _video_keys_body(key_ptr, start, length, c, offs):
    """(key, valid) at positions c + offs of each video, [VIDS, BLOCK]: the first row's key is 0 (its
    similarity is 0.0), padding holds _KEY_MAX."""
    pos = c + offs
    valid = pos[None, :] < length[:, None]
    key = tl.load(key_ptr + start[:, None] + pos[None, :], mask=valid, other=_KEY_MAX)
    return tl.where((pos[None, :] == 0) & valid, 0, key), valid


def _digit_hist_body(key, pre, P: tl.constexpr, R: tl.constexpr, VIDS: tl.constexpr, BLOCK: tl.constexpr):
    """[VIDS, 2^R] counts of pass P's digit per video, among keys whose bits above TOP equal `pre`.
    Keys below that range count in bin 0 and keys above it (padding too) in the pass's top digit, so
    the running count up to any lower bin is exactly #keys below that bin's upper edge; the bins also
    stay in range (triton 3.6 lowers tl.histogram with warp ballots of the bin's bits, which wraps an
    out-of-range value into some bin instead of dropping it)."""
    TOP: tl.constexpr = 32 - P * R
    SHIFT: tl.constexpr = max(TOP - R, 0)
    NB: tl.constexpr = 2 ** R
    if P == 0:
        digit = (key >> SHIFT) + NB // 2                  # signed top digit -> 0 .. NB-1, in key order
    else:
        lo = (pre << TOP)[:, None]
        hi = lo + (2 ** TOP - 1)
        digit = (tl.minimum(tl.maximum(key, lo), hi) - lo) >> SHIFT
    slot = tl.arange(0, VIDS)[:, None] * NB               # one block of NB bins per video of the tile
    flat = tl.reshape(slot + digit, [VIDS * BLOCK])
    return tl.reshape(tl.histogram(flat, VIDS * NB), [VIDS, NB])


def _narrow_body(hist, k, pre, below, P: tl.constexpr, R: tl.constexpr):
    """(pre, below) after pass P: pre = the threshold key's bits above this pass's SHIFT (signed), below
    = #keys under the narrowed range. The first bin whose running count reaches k holds the threshold."""
    TOP: tl.constexpr = 32 - P * R
    WIDTH: tl.constexpr = TOP - max(TOP - R, 0)
    lt = tl.cumsum(hist, axis=1) < k[:, None]
    j = tl.sum(lt.to(tl.int32), axis=1)
    below = tl.where(j > 0, tl.sum(tl.where(lt, hist, 0), axis=1), below)
    if P == 0:
        pre = j - 2 ** R // 2
    else:
        pre = (pre << WIDTH) + j
    return pre, below


def _mark_body(key, valid, thr, need, k, seen):
    """Rows of the k lowest: keys below thr, plus the first `need` keys equal to it in row order
    (`seen` of them in earlier chunks). Returns (hit, ties in this chunk)."""
    eq = ((key == thr[:, None]) & valid).to(tl.int32)
    ties_before = seen[:, None] + tl.cumsum(eq, axis=1) - eq
    hit = (key < thr[:, None]) | ((eq != 0) & (ties_before < need[:, None]))
    return hit & valid & (k[:, None] > 0), tl.sum(eq, axis=1)


_cosine_denominator = _jit(_cosine_denominator_body)  # device functions (inlined into the kernels below)
_video_keys = _jit(_video_keys_body)
_digit_hist = _jit(_digit_hist_body)
_narrow = _jit(_narrow_body)
_mark = _jit(_mark_body)


def _select_resident_body(key_ptr, out_ptr, start, length, k, offs,
                          R: tl.constexpr, VIDS: tl.constexpr, BLOCK: tl.constexpr):
    """Whole videos in one tile: keys read once, every pass on registers, one store."""
    key, valid = _video_keys(key_ptr, start, length, 0, offs)
    pre = tl.zeros([VIDS], tl.int32)
    below = tl.zeros([VIDS], tl.int32)
    for p in tl.static_range((32 + R - 1) // R):
        pre, below = _narrow(_digit_hist(key, pre, p, R, VIDS, BLOCK), k, pre, below, p, R)
    hit, _ = _mark(key, valid, pre, k - below, k, tl.zeros([VIDS], tl.int32))
    tl.store(out_ptr + start[:, None] + offs[None, :], hit.to(tl.int8), mask=valid)


def _select_chunked_body(key_ptr, out_ptr, start, length, k, offs,
                         R: tl.constexpr, VIDS: tl.constexpr, BLOCK: tl.constexpr):
    """Videos longer than the tile: each pass streams them in BLOCK-row chunks (as the radix kernel)."""
    span = tl.max(length, axis=0)
    count_span = tl.max(tl.where(k > 0, length, 0), axis=0)  # k <= 0 (ratio 0, L == 1): nothing to count
    pre = tl.zeros([VIDS], tl.int32)
    below = tl.zeros([VIDS], tl.int32)
    for p in tl.static_range((32 + R - 1) // R):
        hist = tl.zeros([VIDS, 2 ** R], tl.int32)
        for c in range(0, count_span, BLOCK):
            key, _ = _video_keys(key_ptr, start, length, c, offs)
            hist += _digit_hist(key, pre, p, R, VIDS, BLOCK)
        pre, below = _narrow(hist, k, pre, below, p, R)
    need = k - below
    seen = tl.zeros([VIDS], tl.int32)
    for c in range(0, span, BLOCK):
        key, valid = _video_keys(key_ptr, start, length, c, offs)
        hit, ties = _mark(key, valid, pre, need, k, seen)
        tl.store(out_ptr + start[:, None] + (c + offs)[None, :], hit.to(tl.int8), mask=valid)
        seen += ties


_select_resident = _jit(_select_resident_body)
_select_chunked = _jit(_select_chunked_body)


def _select_hist_body(key_ptr, cu_ptr, k_ptr, out_ptr, B,
                      VIDS: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Same output as _select_lowest_body. Whether a program's videos fit its tile is decided here, from
    their lengths, so a max_seqlen below the real longest video costs time, never correctness."""
    vids = tl.program_id(0) * VIDS + tl.arange(0, VIDS)
    in_B = vids < B
    start = tl.load(cu_ptr + vids, mask=in_B, other=0)
    length = tl.load(cu_ptr + vids + 1, mask=in_B, other=0) - start
    k = tl.load(k_ptr + vids, mask=in_B, other=0).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    if tl.max(length, axis=0) <= BLOCK:
        _select_resident(key_ptr, out_ptr, start, length, k, offs, RADIX_BITS, VIDS, BLOCK)
    else:
        _select_chunked(key_ptr, out_ptr, start, length, k, offs, RADIX_BITS, VIDS, BLOCK)


def _loss_rows_body(rows_ptr, mask_ptr, N, stride_p, stride_t,
                    HAS_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's loss rows: (i, in_N, active, pred offsets, target offsets). Pred row i pairs with
    target row rows[i] (HAS_ROWS) or i; with HAS_MASK only rows with mask[i] are active."""
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_N = i < N
    active = in_N
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + i, mask=in_N, other=0) != 0)
    if HAS_ROWS:
        trow = tl.load(rows_ptr + i, mask=active, other=0).to(tl.int64)
    else:
        trow = i.to(tl.int64)
    return i, in_N, active, i.to(tl.int64) * stride_p, trow * stride_t


def _row_sums_body(pred_ptr, tgt_ptr, p_off, t_off, active, D,
                   COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per active row, in fp32: (sum (p-t)^2, 0, 0) or, for COSINE, (p.t, |p|^2, |t|^2). Inactive
    rows are never read (masked loads), and (p - t)^2 only ever lives in registers."""
    acc0 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = active[:, None] & (cols < D)[None, :]
        p = tl.load(pred_ptr + p_off[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + t_off[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if COSINE:
            acc0 += tl.sum(p * t, axis=1)
            acc1 += tl.sum(p * p, axis=1)
            acc2 += tl.sum(t * t, axis=1)
        else:
            diff = p - t
            acc0 += tl.sum(diff * diff, axis=1)
    return acc0, acc1, acc2


_loss_rows = _jit(_loss_rows_body)  # device functions (inlined into the kernels below)
_row_sums = _jit(_row_sums_body)


def _masked_loss_fwd_body(pred_ptr, tgt_ptr, rows_ptr, mask_ptr, part_ptr, N, D, stride_p, stride_t,
                          HAS_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                          EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[pid] = sum over this block's active rows of the per-row loss (mean sq. error, or 1 - cos)."""
    i, in_N, active, p_off, t_off = _loss_rows(rows_ptr, mask_ptr, N, stride_p, stride_t, HAS_ROWS, HAS_MASK, BLOCK_M)
    acc0, acc1, acc2 = _row_sums(pred_ptr, tgt_ptr, p_off, t_off, active, D, COSINE, BLOCK_M, BLOCK_D)
    if COSINE:
        # F.cosine_similarity: x.y / (max(|x|, eps) * max(|y|, eps))
        row = 1.0 - acc0 / (tl.maximum(tl.sqrt_rn(acc1), EPS) * tl.maximum(tl.sqrt_rn(acc2), EPS))
    else:
        row = acc0 / D
    row = tl.where(active, row, 0.0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(row, axis=0))


def _masked_loss_bwd_body(pred_ptr, tgt_ptr, rows_ptr, mask_ptr, scale_ptr, grad_ptr, N, D,
                          stride_p, stride_t, stride_g,
                          HAS_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr,
                          EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad[i] = d loss / d pred[i], with scale = grad_out / #rows read from memory (no host sync).

    Recomputes from pred and target instead of stashing a grad buffer in forward: same memory traffic
    (fwd 2 reads; bwd 2 reads + 1 write), no [N, d] buffer held between forward and backward.
    Inactive rows (HAS_MASK) get zeros, so the full grad tensor is written exactly once."""
    i, in_N, active, p_off, t_off = _loss_rows(rows_ptr, mask_ptr, N, stride_p, stride_t, HAS_ROWS, HAS_MASK, BLOCK_M)
    g_off = i.to(tl.int64) * stride_g
    scale = tl.load(scale_ptr)
    if COSINE:
        # First pass: the row statistics the gradient needs.
        dot, sq_p, sq_t = _row_sums(pred_ptr, tgt_ptr, p_off, t_off, active, D, True, BLOCK_M, BLOCK_D)
        norm_p = tl.sqrt_rn(sq_p)
        np_c = tl.maximum(norm_p, EPS)
        nt_c = tl.maximum(tl.sqrt_rn(sq_t), EPS)
        cos = dot / (np_c * nt_c)
        # d(1 - cos)/dp = -t / (|p|c |t|c) + cos * p / (|p|c |p|), as torch's cosine_similarity: it clamps
        # the norms in place under no_grad, so the norm's own gradient p / |p| flows below the clamp too.
        coef_t = tl.where(active, -scale / (np_c * nt_c), 0.0)
        coef_p = tl.where(active & (norm_p > 0.0), scale * cos / (np_c * norm_p), 0.0)
    else:
        coef_p = tl.where(active, 2.0 * scale / D, 0.0)   # d mean((p - t)^2)/dp = 2 (p - t) / D
        coef_t = -coef_p
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_D = (cols < D)[None, :]
        m2 = active[:, None] & in_D
        p = tl.load(pred_ptr + p_off[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + t_off[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = coef_p[:, None] * p + coef_t[:, None] * t
        tl.store(grad_ptr + g_off[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=in_N[:, None] & in_D)


# ----------------------------------------------------------------------------------------------------
# kernels, built in triton's process-wide mode
# ----------------------------------------------------------------------------------------------------
adjacent_key_kernel = _jit(_adjacent_key_body)
adjacent_key_stream_kernel = _jit(_adjacent_key_stream_body)
select_lowest_kernel = _jit(_select_lowest_body)
select_hist_kernel = _jit(_select_hist_body)
loss_fwd_kernel = _jit(_masked_loss_fwd_body)
loss_bwd_kernel = _jit(_masked_loss_bwd_body)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------------
# tile choices. GPU tiles were sized with `ptxas -v` for sm_90 (registers, no spills); no autotuning,
# because @triton.autotune cannot run without a driver and these kernels are memory/latency bound.
# The interpreter's cost is per op, not per element, so it gets big tiles and fewer radix passes.
# Tests set GPU_TILES_IN_INTERPRETER = True to run the exact GPU launch configs on CPU.
# ----------------------------------------------------------------------------------------------------
GPU_TILES_IN_INTERPRETER = False
_GPU_VIDS_PER_PROGRAM = {8: 16, 16: 16, 32: 16, 64: 8, 128: 4, 256: 4, 512: 2, 1024: 1}


def _gpu_tiles() -> bool:
    return not INTERPRETED or GPU_TILES_IN_INTERPRETER


# Which similarity kernel semantic_mask launches: "tile" (_adjacent_key_body, measured on an H200) or
# "stream" (_adjacent_key_stream_body, a candidate; used only where d <= STREAM_MAX_D). Both give keys
# that select exactly like the torch reference in the tests; bench/kernels.py times both.
SIM_KERNEL = "tile"
STREAM_MAX_D, STREAM_ROWS = 4096, 32


# The similarity kernel's GPU launch (tiled kernel): [8, 128] tiles at 2 warps, 1 stage. bench/kernels.py
# --sweep-sim on an H200 (bench/results/2026-11-26b_h200/kernels_sweep.json, 190 configs, bf16, d=1024)
# ranked it first at 256x8192 (87.6% of peak bandwidth against 82.0% for the earlier [8, 256] at 4
# warps, 3 stages) and 1-7% faster than that default at all three shapes swept; 16 elements per thread
# of a 1K-element tile (bf16: two 16-byte loads per row chunk) was the pattern of the top configs.
GPU_SIM_BLOCK_D, GPU_SIM_WARPS, GPU_SIM_STAGES = 128, 2, 1


def sim_tiles(D: int, T: int, gpu: bool):
    """(BLOCK_T, BLOCK_D) of the similarity kernel: ~1K-element tiles. GPU: BLOCK_D at most 128 (see
    GPU_SIM_BLOCK_D), so [8, 128] for d >= 128; [32, 128] at 4 warps spilled (`ptxas -v`, sm_90)."""
    block_d = min(_pow2(D), GPU_SIM_BLOCK_D if gpu else 512)
    return max(8, min(1024 // block_d if gpu else 256, _pow2(T))), block_d


_SIM_KERNELS = ("tile", "stream")


class SimConfig(NamedTuple):
    """Launch configuration of a similarity kernel, for tuning without editing code (bench/kernels.py
    --sweep-sim). kernel "tile": BLOCK_T rows x BLOCK_D dims per step (d in BLOCK_D chunks); kernel
    "stream": block_t = ROWS consecutive rows per program, block_d >= d (whole rows). num_stages None =
    triton's default (3 on CUDA). The interpreter ignores num_warps and num_stages."""
    block_t: int
    block_d: int
    num_warps: int = 4
    num_stages: int | None = None
    kernel: str = "tile"


def default_sim_config(D: int, T: int, kernel: str | None = None, gpu: bool | None = None) -> SimConfig:
    """The configuration adjacent_keys launches when given none: sim_tiles' tiles for the tiled kernel,
    at GPU_SIM_WARPS / GPU_SIM_STAGES on a GPU (the interpreter ignores both: 4 warps, triton's stages);
    STREAM_ROWS whole rows for the stream kernel (the tiled one where d > STREAM_MAX_D)."""
    kind = kernel or SIM_KERNEL
    if kind not in _SIM_KERNELS:
        raise ValueError(f"sim_kernel must be 'tile' or 'stream', got {kind!r}")
    if kind == "stream" and D <= STREAM_MAX_D:
        return SimConfig(STREAM_ROWS, _pow2(D), 4, None, "stream")
    gpu = _gpu_tiles() if gpu is None else gpu
    if gpu:
        return SimConfig(*sim_tiles(D, T, True), GPU_SIM_WARPS, GPU_SIM_STAGES, "tile")
    return SimConfig(*sim_tiles(D, T, False), 4, None, "tile")


def as_sim_config(config, D: int, kernel: str | None = None) -> SimConfig:
    """A checked SimConfig from a SimConfig or a tuple (BLOCK_T, BLOCK_D[, num_warps[, num_stages]]), whose
    kernel is `kernel` (or SIM_KERNEL). ValueError on sizes a launch would reject or get wrong."""
    if isinstance(config, SimConfig):
        if kernel is not None and kernel != config.kernel:
            raise ValueError(f"sim_kernel {kernel!r} contradicts the config's kernel {config.kernel!r}")
        cfg = config
    else:
        try:
            values = tuple(config)
        except TypeError:
            raise ValueError(f"sim config must be a SimConfig or (BLOCK_T, BLOCK_D[, num_warps[, num_stages]]), "
                             f"got {config!r}") from None
        if not 2 <= len(values) <= 4:
            raise ValueError(f"sim config must be (BLOCK_T, BLOCK_D[, num_warps[, num_stages]]), got {config!r}")
        cfg = SimConfig(*values, kernel=kernel or SIM_KERNEL)
    if cfg.kernel not in _SIM_KERNELS:
        raise ValueError(f"sim_kernel must be 'tile' or 'stream', got {cfg.kernel!r}")

    def pow2(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0

    for name in ("block_t", "block_d", "num_warps"):
        if not pow2(getattr(cfg, name)):
            raise ValueError(f"sim config {name} must be a power of two >= 1, got {getattr(cfg, name)!r}")
    if cfg.num_warps > 32:
        raise ValueError(f"sim config num_warps must be at most 32, got {cfg.num_warps}")
    if cfg.num_stages is not None and (isinstance(cfg.num_stages, bool) or not isinstance(cfg.num_stages, int)
                                       or cfg.num_stages < 1):
        raise ValueError(f"sim config num_stages must be an int >= 1 or None, got {cfg.num_stages!r}")
    if cfg.kernel == "stream" and cfg.block_d < D:
        raise ValueError(f"the stream similarity kernel reads whole rows: block_d must be >= d={D}, got {cfg.block_d}")
    return cfg


def select_tiles(max_seqlen: int | None, B: int, gpu: bool):
    """(VIDS, BLOCK, RADIX_BITS) of the selection kernel.

    BLOCK: the longest video rounded up to a power of two, capped at 1024 (longer videos loop over
    chunks); without a host-known max_seqlen, 1024. VIDS: short videos share a program, as many as
    the tile allows without spills on GPU ([16, 64] needed 174 registers, [2, 256] spilled).
    RADIX_BITS: 16 digits per pass (8 passes) keeps the [VIDS, BLOCK, 16] compare in registers."""
    block = 1024 if max_seqlen is None else min(1024, max(8, _pow2(max_seqlen)))
    if gpu:
        vids, radix_bits = (_GPU_VIDS_PER_PROGRAM[block] if max_seqlen is not None else 1), 4
    else:
        vids, radix_bits = max(1, 2048 // block), 8
    return min(vids, _pow2(B)), block, radix_bits


# Which selection kernel semantic_mask launches: "hist" (_select_hist_body) or "radix" (_select_lowest_body).
# Timed on an H200 (bench/results/2026-11-26c_h200/kernels.json), the selection stage at 256x8192 took
# 0.043 ms by "hist" and 0.131 ms by "radix", and semantic_mask as a whole 1.091 ms (82.1% of peak
# bandwidth) against 1.165 ms (76.8%); "hist" was as fast or faster at every graph-replayed shape, and
# its masks equal radix's bit for bit (compiled GPU test, interpreter tests, each bench row checked).
SELECT_IMPL = "hist"
_SELECT_IMPLS = ("radix", "hist")
# Longest tile of the histogram kernel: videos up to this long stay in registers through all passes
# (16 keys a thread at 16 warps: 128 registers, no spills at sm_90 with triton 3.6's ptxas; 16384 rows
# spilled); longer ones are streamed in chunks of it.
HIST_MAX_BLOCK = 8192
# Digit width of the histogram kernel on GPU when a program holds one video. Triton 3.6 lowers
# tl.histogram to one warp ballot per bit of the bin index plus, in each thread, a popcount for each of
# the num_bins / 32 bins it owns, so 32 bins (5-bit digits, 7 passes) take fewer instructions than 256
# (8-bit, 4 passes): 7440 against 9376 SASS instructions for an 8192-row video at 8 warps, and half the
# barriers (the 32-bin scan stays within a warp). Static counts, not timings: bench/kernels.py times
# 5- and 8-bit digits side by side.
GPU_HIST_RADIX_BITS = 5


def select_hist_tiles(max_seqlen: int | None, B: int, gpu: bool):
    """(VIDS, BLOCK, RADIX_BITS, num_warps) of the histogram selection kernel.

    BLOCK: the longest video rounded up to a power of two, capped at HIST_MAX_BLOCK; without a
    host-known max_seqlen, 1024 (any program whose videos fit still keeps them in registers). GPU:
    short videos share a tile of up to 512 rows (16 videos at most; wider tiles of 16 short videos took
    168 registers), with 4-bit digits so the tile's histogram stays within 256 bins; a warp per 128 keys
    up to 16 warps (4-16 keys a thread). BLOCK >= 32 there so that no thread holds a copy of another's
    key, which a histogram would count twice. Interpreter: big tiles and 8-bit digits (its cost is per
    op, not per element)."""
    smallest = 32 if gpu else 8
    block = 1024 if max_seqlen is None else min(HIST_MAX_BLOCK, max(smallest, _pow2(max_seqlen)))
    vids = min(16, max(1, 512 // block)) if gpu else max(1, 4096 // block)
    vids = min(vids, _pow2(B))
    if not gpu:
        return vids, block, 8, 4
    return vids, block, GPU_HIST_RADIX_BITS if vids == 1 else 4, min(16, max(1, vids * block // 128))


def loss_tiles(D: int, gpu: bool):
    """(BLOCK_M, BLOCK_D) of the loss kernels. GPU: [8, 256] at 4 warps, ~80 registers (cosine bwd)."""
    block_d = min(_pow2(D), 256 if gpu else 1024)
    return max(1, (2048 if gpu else 16384) // block_d), block_d


# ----------------------------------------------------------------------------------------------------
# launchers (inputs already validated and contiguous in the last dim by kernels/__init__.py)
# ----------------------------------------------------------------------------------------------------
def semantic_mask(x, cu_seqlens, num_masked, inverted: bool, max_seqlen: int | None = None,
                  radix_bits: int | None = None, sim_kernel: str | None = None, sim_config=None,
                  select_impl: str | None = None):
    """bool [T]. cu_seqlens int32 [B+1] and num_masked int32 [B] on x's device. sim_config: the
    similarity kernel's launch configuration (see adjacent_keys; None = the default). select_impl:
    the selection kernel, "radix" or "hist" (None = SELECT_IMPL)."""
    import torch

    T = x.shape[0]
    B = cu_seqlens.shape[0] - 1
    if T == 0 or B == 0:
        return torch.zeros(T, dtype=torch.bool, device=x.device)
    keys = adjacent_keys(x, False, sim_kernel, config=sim_config)
    if inverted:
        # As the reference: keep the L - k lowest similarities (ties to the lower row), mask the rest.
        keep = (cu_seqlens[1:] - cu_seqlens[:-1] - num_masked).to(torch.int32)
        return ~select_lowest(keys, cu_seqlens, keep, max_seqlen, radix_bits, select_impl)
    return select_lowest(keys, cu_seqlens, num_masked, max_seqlen, radix_bits, select_impl)


def adjacent_keys(x, inverted: bool, sim_kernel: str | None = None, config=None):
    """int32 [T] sortable keys of +-cos(x_t, x_{t-1}) (stage 1 of semantic_mask; T >= 1).

    config: None (default_sim_config for this shape) or a launch configuration, a SimConfig or a tuple
    (BLOCK_T, BLOCK_D[, num_warps[, num_stages]]) for the kernel sim_kernel (or SIM_KERNEL) names. Every
    configuration computes the same keys wherever the similarities do not depend on summation order."""
    import torch

    T, D = x.shape
    cfg = default_sim_config(D, T, sim_kernel) if config is None else as_sim_config(config, D, sim_kernel)
    keys = torch.empty(T, dtype=torch.int32, device=x.device)
    launch = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        launch["num_stages"] = cfg.num_stages
    if cfg.kernel == "stream":
        adjacent_key_stream_kernel[(triton.cdiv(T, cfg.block_t),)](
            x, keys, T, D, x.stride(0), INVERTED=bool(inverted), EPS=COSINE_EPS,
            ROWS=cfg.block_t, BLOCK_D=cfg.block_d, **launch)
        return keys
    adjacent_key_kernel[(triton.cdiv(T, cfg.block_t),)](
        x, keys, T, D, x.stride(0), INVERTED=bool(inverted), EPS=COSINE_EPS,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, **launch)
    return keys


def select_lowest(keys, cu_seqlens, num_masked, max_seqlen: int | None = None, radix_bits: int | None = None,
                  impl: str | None = None):
    """bool [T]: per video the num_masked lowest keys, ties to the lower row (stage 2 of semantic_mask).
    impl: "radix" or "hist" (None = SELECT_IMPL); radix_bits: the digit width (None = the tile default)."""
    import torch

    impl = impl or SELECT_IMPL
    if impl not in _SELECT_IMPLS:
        raise ValueError(f"select_impl must be one of {_SELECT_IMPLS}, got {impl!r}")
    T, B = keys.shape[0], cu_seqlens.shape[0] - 1
    out = torch.zeros(T, dtype=torch.uint8, device=keys.device)
    if impl == "hist":
        vids, block, default_bits, warps = select_hist_tiles(max_seqlen, B, _gpu_tiles())
        radix_bits = default_bits if radix_bits is None else radix_bits
        if not 1 <= radix_bits <= 8:  # wider digits: 2^bits bins a video, too many for one histogram
            raise ValueError(f"radix_bits of the histogram selection must be in 1..8, got {radix_bits}")
        select_hist_kernel[(triton.cdiv(B, vids),)](
            keys, cu_seqlens, num_masked, out, B, VIDS=vids, BLOCK=block, RADIX_BITS=radix_bits, num_warps=warps)
        return out.view(torch.bool)
    vids, block, default_bits = select_tiles(max_seqlen, B, _gpu_tiles())
    radix_bits = radix_bits or default_bits
    if 32 % radix_bits:
        raise ValueError(f"radix_bits must divide 32, got {radix_bits}")
    select_lowest_kernel[(triton.cdiv(B, vids),)](
        keys, cu_seqlens, num_masked, out, B, VIDS=vids, BLOCK=block, RADIX_BITS=radix_bits, num_warps=8)
    return out.view(torch.bool)


def masked_loss_forward(pred, target, rows, mask, cosine: bool):
    """fp32 [num_programs] partial sums of the per-row loss over active rows (summed by the caller:
    deterministic, unlike a float atomic_add into one scalar)."""
    import torch

    N, D = pred.shape
    block_m, block_d = loss_tiles(D, _gpu_tiles())
    grid = triton.cdiv(N, block_m)
    part = torch.empty(grid, dtype=torch.float32, device=pred.device)
    loss_fwd_kernel[(grid,)](
        pred, target, rows if rows is not None else part, mask if mask is not None else part, part,
        N, D, pred.stride(0), target.stride(0),
        HAS_ROWS=rows is not None, HAS_MASK=mask is not None, COSINE=bool(cosine), EPS=LOSS_COSINE_EPS,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)  # `part` stands in for absent rows/mask: never read
    return part


def masked_loss_backward(pred, target, rows, mask, scale, cosine: bool):
    """grad [N, d] in pred's dtype; scale = fp32 [1] tensor holding grad_out / #active rows."""
    import torch

    N, D = pred.shape
    block_m, block_d = loss_tiles(D, _gpu_tiles())
    # The interpreter truncates fp32 -> bf16 in .to() (the GPU rounds to nearest even): there the kernel
    # writes fp32 and torch rounds, so CPU runs get the gradients a GPU gives.
    rounds_later = INTERPRETED and pred.dtype == torch.bfloat16
    grad = torch.empty_like(pred, dtype=torch.float32 if rounds_later else pred.dtype)
    loss_bwd_kernel[(triton.cdiv(N, block_m),)](
        pred, target, rows if rows is not None else scale, mask if mask is not None else scale, scale, grad,
        N, D, pred.stride(0), target.stride(0), grad.stride(0),
        HAS_ROWS=rows is not None, HAS_MASK=mask is not None, COSINE=bool(cosine), EPS=LOSS_COSINE_EPS,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return grad.to(pred.dtype) if rounds_later else grad
