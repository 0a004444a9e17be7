"""Packed LV-MAE vs the naive padded implementation: same loss, same gradients, same encoder outputs."""
from dataclasses import replace

import pytest
import torch

from lvmae_fast.model import LVMAE, LVMAEConfig, sincos_table
from lvmae_fast.packing import PackedBatch, pack_sequences

from naive_lvmae import naive_forward, naive_loss, naive_sincos

LENGTHS = [1, 2, 7, 300, 33]


def make_case(in_dim=24, preset_overrides=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LVMAEConfig.from_preset("tiny", in_dim=in_dim, kernels="torch", attn_impl="sdpa", **(preset_overrides or {}))
    model = LVMAE(cfg).to(dtype)
    seqs = [torch.randn(n, in_dim, dtype=dtype) for n in LENGTHS]
    # A visible set with at least one visible token per video, some masked where possible.
    visible = [torch.rand(n) < 0.5 for n in LENGTHS]
    for v in visible:
        v[0] = True
    return model, seqs, visible


def packed_batch(seqs, visible):
    x, cu, lengths = pack_sequences(seqs)
    return PackedBatch.from_mask(x, cu, lengths, ~torch.cat(visible))


@pytest.mark.parametrize("in_dim", [24, 64])  # 64 == embed_dim: no input projection (reference layout)
def test_loss_and_grads_match_naive_fp64(in_dim):
    model, seqs, visible = make_case(in_dim)
    loss = model(packed_batch(seqs, visible))
    loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    ref = naive_loss(params, model.config, seqs, visible)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert (model.input_proj is None) == (in_dim == 64)
    for k, p in params.items():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-8, atol=1e-10, msg=f"grad of {k}")


def test_loss_and_grads_match_naive_fp32():
    model, seqs, visible = make_case(dtype=torch.float32)
    loss = model(packed_batch(seqs, visible))
    loss.backward()
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    ref = naive_loss(params, model.config, seqs, visible)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # Both sides are fp32 with different summation orders (packed varlen streams vs padded batches), so
    # they differ by rounding only: over seeds 0-4 at most 7.1e-7 of each tensor's largest gradient
    # (~6 fp32 ulps; the naive fp32 model itself is 6.5e-7 from fp64). 1e-5 of the largest gradient
    # leaves ~14x headroom; a real bug (a wrong position, a token leaking across videos) is >1e-3.
    for k, p in model.named_parameters():
        scale = params[k].grad.abs().max().item()
        torch.testing.assert_close(p.grad, params[k].grad, rtol=0, atol=1e-5 * scale, msg=f"grad of {k}")


def test_encode_and_reconstruct_match_naive():
    model, seqs, visible = make_case()
    params = {k: p.detach() for k, p in model.named_parameters()}
    cls, tokens = model.encode(seqs)
    enc_ref, _ = naive_forward(params, model.config, seqs, [torch.ones(n, dtype=torch.bool) for n in LENGTHS])
    torch.testing.assert_close(cls, torch.stack([e[0] for e in enc_ref]))
    torch.testing.assert_close(tokens, torch.cat([e[1:] for e in enc_ref]))
    preds = model.reconstruct(seqs, visible)
    _, pred_ref = naive_forward(params, model.config, seqs, visible)
    assert [p.shape for p in preds] == [(n, 24) for n in LENGTHS]
    for p, r in zip(preds, pred_ref):
        torch.testing.assert_close(p, r)


def test_no_cross_sequence_leakage():
    model, seqs, visible = make_case()
    cls, tokens = model.encode(seqs)
    changed = [s.clone() for s in seqs]
    changed[3] = torch.randn_like(changed[3]) * 5
    cls2, tokens2 = model.encode(changed)
    torch.testing.assert_close(cls2[[0, 1, 2, 4]], cls[[0, 1, 2, 4]])
    start, end = sum(LENGTHS[:3]), sum(LENGTHS[:4])
    torch.testing.assert_close(tokens2[:start], tokens[:start])
    torch.testing.assert_close(tokens2[end:], tokens[end:])
    assert not torch.allclose(cls2[3], cls[3])


def test_sincos_table_matches_independent_formula_and_long_lengths():
    torch.testing.assert_close(sincos_table(16, 40).double(), naive_sincos(16, 40), rtol=0, atol=1e-6)
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, max_len=9000, kernels="torch"))
    cls, tokens = model.encode([torch.randn(8200, 8)])  # far past the paper's 256
    assert cls.shape == (1, 64) and tokens.shape == (8200, 64) and torch.isfinite(tokens).all()


def test_presets():
    paper = LVMAEConfig.from_preset("paper", in_dim=1024)
    assert (paper.embed_dim, paper.depth, paper.num_heads) == (1024, 32, 16)
    assert (paper.decoder_embed_dim, paper.decoder_depth, paper.decoder_num_heads) == (512, 8, 16)
    with torch.device("meta"):
        n = LVMAE(paper).num_params()
    # 32 blocks x 12.6M + 8 x 3.15M + embeddings/head: the reference's ~0.43B.
    assert 420e6 < n < 440e6
    with pytest.raises(ValueError, match="unknown preset"):
        LVMAEConfig.from_preset("huge", in_dim=8)
    with pytest.raises(ValueError, match="unknown keys"):
        LVMAEConfig.from_dict({"in_dim": 8, "depthh": 3})


def test_param_groups_follow_the_references_rule():
    """timm's add_weight_decay as MAE's main_pretrain.py calls it (no skip list): no decay for 1-D
    parameters and '.bias' names; the [1, 1, D] cls and mask tokens decay."""
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8))
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): k for k, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    want_no_decay = {k for k, p in model.named_parameters() if len(p.shape) == 1 or k.endswith(".bias")}
    assert no_decay_names == want_no_decay
    assert decay_names == {k for k, _ in model.named_parameters()} - want_no_decay
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= decay_names
    assert {"norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("bad, match", [
    ([], "empty batch"),
    ([torch.zeros(0, 8)], "zero-length"),
    ([torch.randn(4, 9)], "embedding dim 9"),
    ([torch.tensor([[float("nan")] * 8])], "NaN or Inf"),
    ([torch.randn(3, 8), torch.full((2, 8), float("inf"))], "sequence 1: contains NaN or Inf"),
    ([torch.randn(33, 8)], "exceeds the configured maximum"),
    ([torch.full((2, 8), 1e39, dtype=torch.float64)], "beyond the range of the model's torch.float32"),
    (torch.randn(2, 5, 8), r"got one tensor of shape \(2, 5, 8\)"),
    ([torch.randn(3, 8, device="meta")], "sequence 0: a meta tensor holds no data"),
])
def test_bad_input_is_a_clear_value_error(bad, match):
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, max_len=32))
    with pytest.raises(ValueError, match=match):
        model.encode(bad)


def test_bf16_rows_beyond_an_fp16_models_range_are_refused():
    """bf16 and fp16 are both 2 bytes, but bf16 reaches ~3e38 and fp16 65504: the cast overflows to Inf."""
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, max_len=32)).half()
    with pytest.raises(ValueError, match="beyond the range of the model's torch.float16"):
        model.encode([torch.full((2, 8), 1e6, dtype=torch.bfloat16)])
    cls, _ = model.encode([torch.full((2, 8), 0.5, dtype=torch.bfloat16)])  # in range: fine
    assert torch.isfinite(cls).all()


@pytest.mark.parametrize("in_dim", [24, 64])  # 64: no input projection
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_batch_rows_of_another_dtype_give_the_loss_of_the_same_values_in_fp32(in_dim, dtype):
    """A hand-built batch in another dtype runs in the model's dtype: the loss of its values (exactly
    representable in fp32) is the fp32 batch's, to the bit (the CLS/mask tokens are not rounded to the
    rows' dtype, and fp64 rows do not meet fp32 weights)."""
    model, seqs, visible = make_case(in_dim, dtype=torch.float32)
    seqs = [s.to(dtype).float() for s in seqs]  # values every dtype here holds exactly
    batch32 = packed_batch(seqs, visible)
    batch = replace(batch32, x=batch32.x.to(dtype))
    with torch.no_grad():
        assert model(batch).item() == model(batch32).item()


def test_bad_forward_batch_dim():
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, kernels="torch"))
    seqs = [torch.randn(5, 9)]
    with pytest.raises(ValueError, match="model expects"):
        model(packed_batch(seqs, [torch.ones(5, dtype=torch.bool)]))


def test_norm_targets_and_cosine_loss_against_hand_formula():
    model, seqs, visible = make_case()
    params = {k: p.detach() for k, p in model.named_parameters()}
    _, preds = naive_forward(params, model.config, seqs, visible)
    pred = torch.cat([p[~v] for p, v in zip(preds, visible)])
    tgt = torch.cat([s[~v] for s, v in zip(seqs, visible)])
    batch = packed_batch(seqs, visible)
    model.config.loss = "cosine"
    cos = torch.nn.functional.cosine_similarity(pred, tgt, dim=-1, eps=1e-6)  # reference: CosineSimilarity(eps=1e-6)
    torch.testing.assert_close(model(batch), (1 - cos).mean())
    model.config.loss, model.config.norm_targets = "mse", True
    z = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(model(batch), ((pred - z) ** 2).mean())


# ---- bad input: reconstruct / forward / PackedBatch.from_mask / build_masked_batch ------------------
NAN_ROW = torch.tensor([[float("nan")] * 8])


@pytest.mark.parametrize("seqs, visible, match", [
    ([], [], "empty batch"),
    ([torch.zeros(0, 8)], [torch.ones(0, dtype=torch.bool)], "sequence 0: zero-length"),
    ([torch.randn(3, 8), torch.zeros(0, 8)], [torch.ones(3, dtype=torch.bool), torch.ones(0, dtype=torch.bool)],
     "sequence 1: zero-length"),
    ([torch.randn(4, 9)], [torch.ones(4, dtype=torch.bool)], "embedding dim 9"),
    ([torch.randn(4)], [torch.ones(4, dtype=torch.bool)], r"expected shape \[L, d\]"),
    ([torch.cat([torch.randn(2, 8), NAN_ROW])], [torch.ones(3, dtype=torch.bool)], "sequence 0: contains NaN or Inf"),
    ([torch.randn(3, 8)], [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)], "2 visible masks"),
    ([torch.randn(3, 8)], [torch.ones(2, dtype=torch.bool)], r"visible\[0\] must be a bool tensor of shape \(3,\)"),
    ([torch.randn(3, 8)], [[True, True, True]], r"visible\[0\] must be a bool tensor .* got list"),
    ([torch.randn(3, 8)], [torch.zeros(3, dtype=torch.bool)], r"visible\[0\] has no visible token"),
])
def test_reconstruct_bad_input_is_a_clear_value_error(seqs, visible, match):
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, kernels="torch"))
    with pytest.raises(ValueError, match=match):
        model.reconstruct(seqs, visible)


def test_from_mask_and_build_masked_batch_reject_empty_batches_and_empty_sequences():
    from lvmae_fast.masking import build_masked_batch
    from lvmae_fast.packing import cu_seqlens_from_lengths

    x = torch.randn(3, 8)
    cu = cu_seqlens_from_lengths([3, 0])
    for strategy in ("random", "semantic", "semantic_inverted"):
        # Was: a finite loss from a corrupt batch (random) or an IndexError (semantic).
        with pytest.raises(ValueError, match="sequence 1: zero-length sequence"):
            build_masked_batch(x, cu, [3, 0], strategy, 0.5)
        with pytest.raises(ValueError, match="empty batch"):
            build_masked_batch(x[:0], cu_seqlens_from_lengths([]), [], strategy, 0.5)
    with pytest.raises(ValueError, match="sequence 1: zero-length sequence"):
        PackedBatch.from_mask(x, cu, [3, 0], torch.tensor([True, False, True]), keep=[1, 1])
    with pytest.raises(ValueError, match="sequence 1: zero-length sequence"):
        PackedBatch.from_mask(x, cu, [3, 0], torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="empty batch"):
        PackedBatch.from_mask(x[:0], cu_seqlens_from_lengths([]), [], torch.zeros(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths add up to 4 rows but x has 3"):
        PackedBatch.from_mask(x, cu_seqlens_from_lengths([3, 1]), [3, 1], torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"do not match lengths \[1, 2\]"):
        PackedBatch.from_mask(x, cu_seqlens_from_lengths([2, 1]), [1, 2], torch.zeros(3, dtype=torch.bool))


def test_from_mask_rejects_keep_that_disagrees_with_the_mask():
    x, cu, lengths = pack_sequences([torch.randn(3, 8), torch.randn(4, 8)])
    masked = torch.tensor([True, False, True, False, False, True, True])  # visible per video: 1, 2
    good = PackedBatch.from_mask(x, cu, lengths, masked, keep=[1, 2])
    assert good.visible_rows.tolist() == [1, 3, 4] and good.enc_cu_seqlens.tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match="sequence 0: keep=2 disagrees with the mask, which leaves 1 visible"):
        PackedBatch.from_mask(x, cu, lengths, masked, keep=[2, 1])
    with pytest.raises(ValueError, match="sequence 1: keep=5 visible tokens but the sequence has only L=4"):
        PackedBatch.from_mask(x, cu, lengths, masked, keep=[1, 5])
    with pytest.raises(ValueError, match="keep has 3 entries for 2 sequences"):
        PackedBatch.from_mask(x, cu, lengths, masked, keep=[1, 2, 0])
    with pytest.raises(ValueError, match="sequence 1: every video needs at least one visible token"):
        PackedBatch.from_mask(x, cu, lengths, masked | (torch.arange(7) >= 3), keep=[1, 0])


def test_forward_nonfinite_rows_checked_on_request():
    model, seqs, visible = make_case(in_dim=8, dtype=torch.float32)
    bad = [s.clone() for s in seqs]
    bad[3][17, 2] = float("inf")  # sequence 3, packed row 1 + 2 + 7 + 17 = 27
    batch = packed_batch(bad, visible)
    # Default: no check (it would be a host sync per step on CUDA); the NaN shows in the loss, which
    # the trainer catches on the device.
    assert not torch.isfinite(model(batch))
    with pytest.raises(ValueError, match=r"sequence 3: contains NaN or Inf values \(packed row 27\)"):
        model(batch, check_finite=True)
    clean = packed_batch(seqs, visible)
    torch.testing.assert_close(model(clean, check_finite=True), model(clean))


def test_forward_bad_batch_dim_and_rank():
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, kernels="torch"))
    batch = packed_batch([torch.randn(5, 8)], [torch.ones(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"model expects \[T, 8\]"):
        model(replace(batch, x=batch.x[:, :7]))
    with pytest.raises(ValueError, match=r"model expects \[T, 8\]"):
        model(replace(batch, x=batch.x[:, None]))


def test_from_mask_validation_reads_no_device_data():
    """The CUDA path (keep given as host ints) must stay free of host syncs. Meta tensors have no data,
    so any read of one fails: building from them proves the checks use only host ints and shapes, and
    the host-side checks (zero-length sequence, keep > L) still fire there."""
    from lvmae_fast.packing import cu_seqlens_from_lengths

    x = torch.empty(7, 8, device="meta")
    cu, masked = cu_seqlens_from_lengths([3, 4], "meta"), torch.empty(7, dtype=torch.bool, device="meta")
    batch = PackedBatch.from_mask(x, cu, [3, 4], masked, keep=[1, 2])
    assert batch.visible_rows.shape == (3,) and batch.masked_rows.shape == (4,) and batch.enc_max_seqlen == 3
    with pytest.raises(ValueError, match="sequence 1: zero-length sequence"):
        PackedBatch.from_mask(x, cu, [7, 0], masked, keep=[1, 1])
    with pytest.raises(ValueError, match="sequence 0: keep=4 visible tokens but the sequence has only L=3"):
        PackedBatch.from_mask(x, cu, [3, 4], masked, keep=[4, 2])


def test_half_precision_batch_through_the_input_projection_matches_fp32():
    """Outside autocast, fp16 rows meet the fp32 input projection: cast, not a dtype error."""
    model, seqs, visible = make_case(in_dim=24, dtype=torch.float32)
    assert model.input_proj is not None
    half = [s.half() for s in seqs]
    want = model(packed_batch([s.float() for s in half], visible))
    torch.testing.assert_close(model(packed_batch(half, visible)), want, rtol=1e-5, atol=1e-6)


def test_cosine_loss_clamps_norms_at_the_references_eps():
    """Predictions with norm 1e-7 (between torch's default 1e-8 and the reference's 1e-6): the loss
    must use the reference's clamp, 1 - p.t / (max(|p|, 1e-6) * max(|t|, 1e-6))."""
    from lvmae_fast.loss import masked_reconstruction_loss

    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    pred = torch.tensor([[6e-8, 8e-8]], dtype=torch.float64)  # |pred| = 1e-7
    got = masked_reconstruction_loss(pred, x, torch.tensor([0]), loss="cosine")
    want = 1 - (6e-8 * 3 + 8e-8 * 4) / (1e-6 * 5.0)
    assert abs(float(got) - want) < 1e-12 and abs(want - 0.0) > 0.5  # eps 1e-8 would give ~0


def test_sincos_table_is_built_in_chunks_with_the_same_values():
    """The table is computed a chunk of positions at a time (whole-table float64 temporaries peaked at
    ~6x the fp32 table: 1.5 GB for max_len 65536 at width 1024); values are bit-identical whatever the
    chunk size, chunk boundaries included."""
    def whole(dim, n):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]
        return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([angles.sin(), angles.cos()], 1)],
                         0).float()

    for dim, n, chunk in ((16, 40, 7), (16, 40, 40), (16, 41, 8), (2, 1, 3), (64, 5000, 1024), (8, 0, 4)):
        got = sincos_table(dim, n, chunk_rows=chunk)
        assert got.dtype == torch.float32 and torch.equal(got, whole(dim, n)), (dim, n, chunk)
    torch.testing.assert_close(sincos_table(16, 40, chunk_rows=3).double(), naive_sincos(16, 40), rtol=0, atol=1e-6)


def test_too_long_sequences_name_how_to_raise_max_len_and_a_saved_model_loads_with_a_longer_one(tmp_path):
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, max_len=16, kernels="torch")).eval()
    seq = torch.randn(40, 8)
    with pytest.raises(ValueError, match=r"length 40 exceeds .* max_len=16; raise the model's max_len: .*"
                                         r"LVMAE.from_pretrained\(DIR, max_len=N\)"):
        model.encode([seq])
    from lvmae_fast.masking import build_masked_batch

    with pytest.raises(ValueError, match=r"length 40 > max_len=16; raise the model's max_len"):
        model(build_masked_batch(*pack_sequences([seq]), "random", 0.5, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tmp_path / "m")
    longer = LVMAE.from_pretrained(tmp_path / "m", max_len=64)  # positions are derived, not stored
    assert longer.pos_embed.shape == (65, 64) and longer.config.max_len == 64
    torch.testing.assert_close(longer.encode([seq[:16]])[1], model.encode([seq[:16]])[1])
    assert longer.encode([seq])[1].shape == (40, 64)


def test_a_generator_of_sequences_is_named_not_called_empty():
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8))
    with pytest.raises(ValueError, match="got a generator"):
        model.encode(torch.randn(3, 8) for _ in range(2))
    with pytest.raises(ValueError, match="empty batch"):
        model.encode([])
    seqs = [torch.randn(3, 8)]
    with pytest.raises(ValueError, match="list of visible masks, got a generator"):
        model.reconstruct(seqs, (torch.ones(3, dtype=torch.bool) for _ in seqs))
    seqs = [torch.randn(3, 8), torch.randn(3, 8)]   # one [B, L] mask for sequences of one length: its rows
    visible = torch.tensor([[True, False, True], [False, True, True]])
    for got, want in zip(model.reconstruct(seqs, visible), model.reconstruct(seqs, list(visible))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"got one tensor of shape \(3,\) \(for one sequence pass \[mask\]\)"):
        model.reconstruct(seqs[:1], visible[0])
    with pytest.raises(ValueError, match=r"visible\[1\]: a meta tensor holds no data"):
        model.reconstruct(seqs, [visible[0], visible[1].to("meta")])


def test_numpy_scalars_in_a_config_become_python_values():
    """A sweep table's numpy values: np.bool_ was refused ("is not a bool"), and numpy ints/floats stayed
    numpy, which config.json (json.dumps) cannot write."""
    import json

    import numpy as np

    cfg = LVMAEConfig.from_preset("tiny", in_dim=np.int64(8), norm_targets=np.bool_(True), mask_ratio=np.float32(0.5))
    assert (type(cfg.in_dim), type(cfg.norm_targets), type(cfg.mask_ratio)) == (int, bool, float)
    assert json.loads(json.dumps(cfg.to_dict()))["norm_targets"] is True
    for bad, message in ((dict(depth=True), "depth=True is not an int"), (dict(mask_ratio="0.5"), "is not a float"),
                         (dict(norm_targets=1), "norm_targets=1 is not a bool")):
        with pytest.raises(ValueError, match=message):
            LVMAEConfig.from_preset("tiny", in_dim=8, **bad)
