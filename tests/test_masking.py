"""Masking over packed batches vs naive per-video Python loops."""
import math

import pytest
import torch

from lvmae_fast.masking import (adjacent_cosine, build_masked_batch, masked_counts, random_mask,
                                semantic_mask_torch)
from lvmae_fast.packing import PackedBatch, keep_counts, pack_sequences

LENGTHS = [1, 2, 3, 10, 257, 4]


def naive_cos(a, b):
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return sum(x * y for x, y in zip(a, b)) / max(na * nb, 1e-8)


def naive_semantic(seqs, ratio, inverted):
    out = []
    for s in seqs:
        rows = s.tolist()
        sims = [0.0] + [naive_cos(rows[i], rows[i - 1]) for i in range(1, len(rows))]
        keep = max(1, int(len(rows) * (1 - ratio)))
        ascending = sorted(range(len(rows)), key=lambda i: (sims[i], i))
        if inverted:  # the reference's importance_masking: keep the lowest similarities, mask the rest
            chosen = set(ascending[keep:])
        else:  # the paper: mask the lowest
            chosen = set(ascending[:len(rows) - keep])
        out += [i in chosen for i in range(len(rows))]
    return torch.tensor(out)


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.5, 0.75, 0.99])
def test_keep_counts_and_exact_masked_counts(ratio):
    cu = pack_sequences([torch.zeros(n, 2) for n in LENGTHS])[1]
    keep = keep_counts(LENGTHS, ratio)
    assert keep == [max(1, int(n * (1 - ratio))) for n in LENGTHS]
    for masked in (random_mask(cu, ratio, torch.Generator().manual_seed(1)),
                   semantic_mask_torch(torch.randn(sum(LENGTHS), 5), cu, ratio)):
        assert masked_counts(masked, cu) == [n - k for n, k in zip(LENGTHS, keep)]


@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_semantic_matches_naive(inverted, ratio):
    torch.manual_seed(0)
    seqs = [torch.randn(n, 6) for n in LENGTHS]
    x, cu, _ = pack_sequences(seqs)
    assert torch.equal(semantic_mask_torch(x, cu, ratio, inverted=inverted), naive_semantic(seqs, ratio, inverted))


def test_semantic_masks_scene_changes_and_inverted_masks_redundant():
    # Two scenes: rows 0-4 near vector a, rows 5-9 near b. Paper semantics masks the distinct row 5
    # (and row 0, similarity 0 by definition); the reference's inverted rule keeps them.
    a, b = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    x = torch.stack([a + 0.01 * i * b for i in range(5)] + [b + 0.01 * i * a for i in range(5)])
    cu = torch.tensor([0, 10], dtype=torch.int32)
    paper = semantic_mask_torch(x, cu, 0.2)
    assert paper.nonzero().flatten().tolist() == [0, 5]
    inverted = semantic_mask_torch(x, cu, 0.2, inverted=True)
    assert not inverted[0] and not inverted[5] and int(inverted.sum()) == 2


def test_ties_and_zero_vectors():
    x = torch.ones(6, 4)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    # sims: [0, 1, 1, 1, 1, 1]; inverted keeps the 3 lowest (row 0, then the tie's lower rows 1, 2) and
    # masks the rest; the paper masks the 3 lowest.
    assert semantic_mask_torch(x, cu, 0.5, inverted=True).nonzero().flatten().tolist() == [3, 4, 5]
    assert semantic_mask_torch(x, cu, 0.5).nonzero().flatten().tolist() == [0, 1, 2]
    z = torch.zeros(5, 4)
    sims = adjacent_cosine(z, torch.tensor([0, 5], dtype=torch.int32))
    assert torch.equal(sims, torch.zeros(5))
    assert semantic_mask_torch(z, torch.tensor([0, 5], dtype=torch.int32), 0.4).nonzero().flatten().tolist() == [0, 1]


def test_first_token_has_no_predecessor_across_videos():
    # Video 2's first row equals video 1's last row: its similarity must still be 0, not 1.
    v1 = torch.randn(4, 3)
    v2 = torch.cat([v1[-1:], torch.randn(3, 3)])
    x, cu, _ = pack_sequences([v1, v2])
    sims = adjacent_cosine(x, cu)
    assert sims[4] == 0.0 and sims[0] == 0.0


def test_random_mask_deterministic_and_per_video():
    cu = pack_sequences([torch.zeros(n, 2) for n in LENGTHS])[1]
    m1 = random_mask(cu, 0.5, torch.Generator().manual_seed(7))
    m2 = random_mask(cu, 0.5, torch.Generator().manual_seed(7))
    m3 = random_mask(cu, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_random_mask_is_uniform_over_positions():
    cu = torch.tensor([0, 10], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([random_mask(cu, 0.5, g) for _ in range(2000)]).float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.5), atol=0.05)


def test_packed_batch_indices_match_naive_layout():
    torch.manual_seed(0)
    seqs = [torch.randn(n, 3) for n in LENGTHS]
    x, cu, lengths = pack_sequences(seqs)
    b = build_masked_batch(x, cu, lengths, "random", 0.5, torch.Generator().manual_seed(3))
    # Naive streams: each slot holds ("cls", video) or (row id, position in video).
    enc, dec, start = [], [], 0
    for v, n in enumerate(lengths):
        rows = [(start + p, p) for p in range(n)]
        enc += [("cls", v)] + [r for r in rows if not b.masked[r[0]]]
        dec += [("cls", v)] + rows
        start += n
    is_row = lambda slot: slot[0] != "cls"
    assert b.enc_token_slots.tolist() == [i for i, s in enumerate(enc) if is_row(s)]
    assert b.visible_rows.tolist() == [s[0] for s in enc if is_row(s)]
    assert b.enc_pos.tolist() == [s[1] + 1 if is_row(s) else 0 for s in enc]
    assert b.dec_pos.tolist() == [s[1] + 1 if is_row(s) else 0 for s in dec]
    assert b.dec_masked_slots.tolist() == [i for i, s in enumerate(dec) if is_row(s) and b.masked[s[0]]]
    # dec_src: CLS and visible rows come from their encoder slot, masked rows from the mask token (index Te).
    enc_slot_of = {s: i for i, s in enumerate(enc)}
    Te = len(enc)
    assert b.dec_src.tolist() == [enc_slot_of[s] if s in enc_slot_of else Te for s in dec]
    assert b.enc_cu_seqlens.dtype == torch.int32 and b.enc_max_seqlen == max(keep_counts(lengths, 0.5)) + 1
    assert b.dec_max_seqlen == max(lengths) + 1


def test_from_mask_rejects_fully_masked_video_and_bad_mask():
    x, cu, lengths = pack_sequences([torch.randn(3, 2), torch.randn(2, 2)])
    with pytest.raises(ValueError, match="at least one visible token"):
        PackedBatch.from_mask(x, cu, lengths, torch.tensor([False, True, False, True, True]))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        PackedBatch.from_mask(x, cu, lengths, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio"):
        keep_counts([3], 1.0)
    with pytest.raises(ValueError, match="unknown masking strategy"):
        build_masked_batch(x, cu, lengths, "block", 0.5)


def test_batch_transfer_keeps_values_and_moves_each_shared_buffer_once():
    from lvmae_fast.sampler import share_storages

    x, cu, lengths = pack_sequences([torch.randn(n, 3) for n in LENGTHS])
    plain = build_masked_batch(x, cu, lengths, "random", 0.5, torch.Generator().manual_seed(0))
    shared = share_storages(plain)
    calls = []

    def counting_move(t):
        calls.append(t.numel())
        return t.clone()

    moved = shared._map_storages(counting_move)
    dtypes = {getattr(plain, f).dtype for f in plain.__dataclass_fields__ if isinstance(getattr(plain, f), torch.Tensor)}
    assert len(calls) == len(dtypes)  # one move per dtype buffer, not ~20
    for f in plain.__dataclass_fields__:
        a, b = getattr(plain, f), getattr(moved, f)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.shape == b.shape, f
            assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        else:
            assert a == b
    # A view into a much larger buffer is moved on its own, not with the whole buffer.
    big = torch.arange(1000)
    lone = plain.__class__(**{**plain.__dict__, "positions": big[:plain.num_tokens]})
    sizes = []
    lone._map_storages(lambda t: sizes.append(t.numel()) or t.clone())
    assert 1000 not in sizes


def test_empty_videos_are_masking_no_ops_and_keep_zero():
    # keep_counts: an empty video has nothing to keep (was max(1, 0) = 1: a phantom visible token).
    assert keep_counts([3, 0, 1, 10], 0.5) == [1, 0, 1, 5]
    # The torch masks (like the kernel) skip empty videos anywhere, trailing ones included (their start
    # offset is T: this was an IndexError), and mask the non-empty ones exactly as without them.
    torch.manual_seed(0)
    seqs = [torch.randn(n, 6) for n in (4, 7)]
    x, cu, _ = pack_sequences(seqs)
    with_empty = torch.tensor([0, 0, 4, 4, 11, 11], dtype=torch.int32)
    for inverted in (False, True):
        want = naive_semantic(seqs, 0.5, inverted)
        assert torch.equal(semantic_mask_torch(x, with_empty, 0.5, inverted=inverted), want)
    assert adjacent_cosine(x, with_empty)[[0, 4]].tolist() == [0.0, 0.0]
    assert masked_counts(random_mask(with_empty, 0.5, torch.Generator().manual_seed(0)), with_empty) == [0, 2, 0, 4, 0]


def _reference_importance_masking(x: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    # amazon-science/lv-mae's importance_masking (data/CombinedData.py), one video: argsort the adjacent
    # cosine similarities ascending (first row 0) and keep the first len_keep; 1 = masked. Its CPU argsort
    # keeps tied rows in order at these lengths; stable=True says so.
    L = x.shape[0]
    len_keep = int(L * (1 - mask_ratio))
    sims = torch.cat([torch.zeros(1), torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=1)])
    ids_shuffle = torch.argsort(sims, dim=0, stable=True)
    mask = torch.ones(L)
    mask[:len_keep] = 0
    return torch.gather(mask, 0, torch.argsort(ids_shuffle, dim=0)).bool()


@pytest.mark.parametrize("crop, copies", [(1, 8), (2, 3), (3, 3), (4, 3)])
def test_inverted_masks_the_copies_the_reference_masks_in_its_tiled_short_videos(crop, copies):
    # The reference tiles videos of < 2 segments x8 and of < 5 x3: exact similarity ties, broken as it does.
    torch.manual_seed(crop)
    seqs = [torch.randn(crop, 6).repeat(copies, 1), torch.randn(9, 6)]
    x, cu, _ = pack_sequences(seqs)
    want = torch.cat([_reference_importance_masking(s, 0.5) for s in seqs])
    assert torch.equal(semantic_mask_torch(x, cu, 0.5, inverted=True), want)


def test_masking_functions_pick_their_kernels_with_auto_by_default(monkeypatch):
    """README: the Triton selection serves masking on CUDA tensors. build_masked_batch and make_mask
    defaulted to kernels='torch', so they never asked (a caller had to know to pass 'auto')."""
    from lvmae_fast import kernels as K
    from lvmae_fast.masking import make_mask

    asked = []
    monkeypatch.setattr(K, "use_triton", lambda switch, tensor: asked.append(switch) or False)
    x, cu = pack_sequences([torch.randn(6, 4), torch.randn(4, 4)])[:2]
    make_mask("semantic", x, cu, 0.5)
    build_masked_batch(*pack_sequences([torch.randn(6, 4), torch.randn(4, 4)]), "semantic", 0.5)
    assert asked == ["auto", "auto"]
