"""Varlen attention backends vs a per-sequence naive softmax attention."""
import pytest
import torch

from lvmae_fast.attention import available_impls, resolve_impl, varlen_attention
from lvmae_fast.packing import cu_seqlens_from_lengths

LENGTHS = [1, 2, 17, 300, 5]


def naive_attention(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).double() for t in (q, k, v))  # [H, n, Dh]
        p = ((qs @ ks.transpose(-1, -2)) * qs.shape[-1] ** -0.5).softmax(-1)
        out.append((p @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def qkv(device="cpu", dtype=torch.float32, H=4, Dh=16):
    torch.manual_seed(0)
    T = sum(LENGTHS)
    return [torch.randn(T, H, Dh, device=device, dtype=dtype) for _ in range(3)]


def test_sdpa_matches_naive_cpu():
    q, k, v = qkv()
    cu = cu_seqlens_from_lengths(LENGTHS)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), "sdpa")
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, LENGTHS), rtol=1e-5, atol=1e-5)
    assert varlen_attention(q, k, v, cu, max(LENGTHS), "auto").equal(out)


def test_auto_on_cpu_picks_sdpa_and_explicit_gpu_backends_fail_clearly():
    assert available_impls(torch.device("cpu"), torch.float32) == ["sdpa"]
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="needs"):
        resolve_impl("torch_varlen", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        resolve_impl("xformers", torch.device("cpu"), torch.float32)


def test_fa4_missing_is_named_and_its_call_passes_the_packed_layout(monkeypatch):
    """FA4 never runs on a CPU: the glue is checked with a stand-in that computes the naive attention
    from exactly the arguments FA4's flash_attn_varlen_func would get."""
    from lvmae_fast import attention

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(attention, "_fa4_varlen", lambda: None)
    assert "fa4" not in available_impls(cuda, bf16)
    with pytest.raises(RuntimeError, match=r"lvmae_fast\[fa4\]"):
        resolve_impl("fa4", cuda, bf16)
    with pytest.raises(RuntimeError, match="needs"):
        resolve_impl("fa4", torch.device("cpu"), torch.float32)

    calls = []

    def fake_fa4(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        calls.append((cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        return naive_attention(q, k, v, lengths).to(q.dtype), torch.zeros(q.shape[1], q.shape[0])

    probed = []
    monkeypatch.setattr(attention, "_fa4_varlen", lambda: probed.append(1) or fake_fa4)
    if attention._torch_varlen() is not None:  # after torch's own kernels until measured faster
        # auto stops at torch's kernels without probing FA4 (its import takes seconds)
        assert resolve_impl("auto", cuda, bf16) == "torch_varlen" and probed == []
        assert available_impls(cuda, bf16)[-3:] == ["torch_varlen", "fa4", "sdpa"] and probed == [1]
    q, k, v = qkv()
    cu = cu_seqlens_from_lengths(LENGTHS)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), "fa4", resolved=True)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, LENGTHS), rtol=1e-6, atol=1e-6)
    (cu_q, cu_k, max_q, max_k), = calls
    assert cu_q is cu and cu_k is cu and max_q == max_k == max(LENGTHS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_agree(dtype):
    q, k, v = qkv("cuda", dtype, H=16, Dh=64)
    cu = cu_seqlens_from_lengths(LENGTHS, "cuda")
    ref = naive_attention(q.float(), k.float(), v.float(), LENGTHS)
    # Tolerance: 2x the error of a same-dtype padded SDPA (flash-attention's rule), plus a floor.
    sdpa_err = (varlen_attention(q, k, v, cu, max(LENGTHS), "sdpa").double() - ref).abs().max().item()
    impls = [i for i in available_impls(q.device, dtype) if i != "sdpa"]
    assert "torch_varlen" in impls or "flash" in impls
    for impl in impls:
        err = (varlen_attention(q, k, v, cu, max(LENGTHS), impl).double() - ref).abs().max().item()
        assert err <= 2 * sdpa_err + 1e-3, (impl, err, sdpa_err)


@pytest.mark.gpu
def test_gpu_backends_agree_in_gradients():
    """Each CUDA backend's input gradients against the fp64 naive attention's, within 2x the padded
    bf16 SDPA's own error (plus a floor), as the forward test."""
    q0, k0, v0 = qkv("cuda", torch.bfloat16, H=16, Dh=64)
    cu = cu_seqlens_from_lengths(LENGTHS, "cuda")
    grad_out = torch.randn_like(q0)

    def grads(impl):
        dtype = torch.float64 if impl == "naive" else q0.dtype
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q0, k0, v0))
        out = (naive_attention(q, k, v, LENGTHS) if impl == "naive"
               else varlen_attention(q, k, v, cu, max(LENGTHS), impl))
        out.backward(grad_out.to(out.dtype))
        return [t.grad.double() for t in (q, k, v)]

    ref = grads("naive")

    def err(impl):
        return max((g - r).abs().max().item() for g, r in zip(grads(impl), ref))

    sdpa_err = err("sdpa")
    for impl in [i for i in available_impls(q0.device, q0.dtype) if i != "sdpa"]:
        impl_err = err(impl)
        assert impl_err <= 2 * sdpa_err + 2e-3, (impl, impl_err, sdpa_err)


@pytest.mark.gpu
def test_gpu_model_step_matches_cpu_fp32():
    from lvmae_fast.masking import build_masked_batch
    from lvmae_fast.model import LVMAE, LVMAEConfig
    from lvmae_fast.packing import pack_sequences

    torch.manual_seed(0)
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=32, kernels="torch"))
    x, cu, lengths = pack_sequences([torch.randn(n, 32) for n in LENGTHS])
    batch = build_masked_batch(x, cu, lengths, "random", 0.5, torch.Generator().manual_seed(0))
    loss_cpu = model(batch)
    model_gpu = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_gpu = model_gpu(batch.to("cuda"))
    assert abs(loss_gpu.item() - loss_cpu.item()) < 2e-2 * abs(loss_cpu.item())


def test_sdpa_groups_lengths_into_classes_and_matches_one_block_and_naive():
    """CPU: videos are attended in per-length-class blocks (cost ~ sum L^2, not B * max_L^2); output and
    gradients equal the one-block layout (what CUDA uses) and a per-sequence naive attention."""
    from lvmae_fast.attention import _block, _padded_layout, PaddedGroup, sdpa_varlen

    lengths = [3, 300, 1, 17, 40, 2, 16, 129]
    cu = cu_seqlens_from_lengths(lengths)
    T = sum(lengths)
    groups = _padded_layout(cu, T, max(lengths))
    assert sorted(g.key_valid.shape[1] for g in groups) == [16, 17, 40, 129, 300]  # classes <=16, 32, 64, 256, 512
    assert sorted(torch.cat([g.rows for g in groups]).tolist()) == list(range(T))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = sdpa_varlen(q, k, v, cu, max(lengths), layout=groups)
    one_block = sdpa_varlen(q, k, v, cu, max(lengths), layout=[PaddedGroup(None, *_block(cu, T, max(lengths)))])
    torch.testing.assert_close(out, one_block)
    torch.testing.assert_close(out, naive_attention(q, k, v, lengths))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(naive_attention(q, k, v, lengths).square().sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref)
    single = _padded_layout(cu_seqlens_from_lengths([5, 9, 16]), 30, 16)
    assert len(single) == 1 and single[0].rows is None  # one class: one block


def test_an_impl_that_cannot_run_here_says_why_first():
    """A model trained with flash, loaded on a CPU: the message said to install flash-attn, which cannot
    help there; head dims above 256 (which the flash kernels do not take) are left to sdpa by auto."""
    cpu = torch.device("cpu")
    for impl in ("flash", "fa4", "torch_varlen"):
        with pytest.raises(RuntimeError, match=rf"attn_impl='{impl}' needs a CUDA device .*attn_impl='auto'\)\)$"):
            resolve_impl(impl, cpu, torch.float32)
    cuda = torch.device("cuda")
    assert available_impls(cuda, torch.bfloat16, head_dim=512) == ["sdpa"]
    with pytest.raises(RuntimeError, match="takes head dims up to 256, this model's are 512"):
        resolve_impl("flash", cuda, torch.bfloat16, 512)
