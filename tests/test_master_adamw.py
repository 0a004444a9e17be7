"""MasterWeightAdamW (bf16 matrix weights, fp32 masters) against torch.optim.AdamW on fp32 weights fed the
same gradients, and a whole bf16-autocast training step against fused AdamW on an fp32 model.

Both update paths run here: the torch path, and the Triton kernel through the interpreter (the
`interp` fixture of test_kernels.py, which also fixes triton's mode for the process)."""
import pytest
import torch

from lvmae_fast.buckets import pad_to_bucket
from lvmae_fast.graphs import GraphedTrainStep
from lvmae_fast.master_adamw import MasterWeightAdamW
from lvmae_fast.masking import build_masked_batch
from lvmae_fast.model import LVMAE, LVMAEConfig
from lvmae_fast.packing import pack_sequences
from test_kernels import interp  # noqa: F401 - fixture (and triton's interpreter mode without CUDA)

BETAS, LR, WD = (0.9, 0.95), 1e-2, 0.05


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    if request.param == "triton":
        request.getfixturevalue("interp")
    return request.param


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 48), torch.nn.LayerNorm(48), torch.nn.GELU(), torch.nn.Linear(48, 5))


def groups(model):
    decay = [p for p in model.parameters() if p.ndim == 2]
    return [{"params": decay, "weight_decay": WD}, {"params": [p for p in model.parameters() if p.ndim != 2],
                                                    "weight_decay": 0.0}]


def give_grads(ours, ref, seed):
    """The same gradient to both: bf16 for our bf16 weights (as autocast's matmul gives it), its exact
    fp32 value for the reference."""
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(ours.parameters(), ref.parameters()):
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
        p.grad, q.grad = grad, grad.to(torch.float32)


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_update_is_adamw_on_the_fp32_masters(kernels, clip, tensor_lr):
    ours, ref = small_model(), small_model()
    opt = MasterWeightAdamW(groups(ours), lr=LR, betas=BETAS, kernels=kernels)
    ref_opt = torch.optim.AdamW(groups(ref), lr=LR, betas=BETAS)
    if tensor_lr:  # as GraphedTrainStep sets it (a device tensor the captured update reads)
        for g in opt.param_groups:
            g["lr"] = torch.tensor(LR, dtype=torch.float64)
    assert [p.dtype for p in ours.parameters()] == [torch.bfloat16, torch.float32, torch.float32, torch.float32,
                                                    torch.bfloat16, torch.float32]
    for step in range(4):
        give_grads(ours, ref, seed=step)
        norm = opt.prepare_grads(clip)
        ref_norm = (torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) if clip
                    else torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()]))
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        opt.step()
        ref_opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            master = opt.master_of(p)
            torch.testing.assert_close(master, q.detach(), rtol=2e-6, atol=1e-7)
            # the model's weight is the master rounded to nearest (bf16) or the master itself (fp32)
            assert torch.equal(p.detach(), master.to(p.dtype))
            if p.dtype == torch.float32:
                assert p.data_ptr() == master.data_ptr()
    assert opt.step_count.item() == 4


def test_a_step_with_found_inf_writes_nothing_and_does_not_count(kernels):
    ours, ref = small_model(), small_model()
    opt = MasterWeightAdamW(groups(ours), lr=LR, betas=BETAS, kernels=kernels)
    ref_opt = torch.optim.AdamW(groups(ref), lr=LR, betas=BETAS)
    before = [opt.master_of(p).clone() for p in ours.parameters()]
    give_grads(ours, ref, seed=0)
    opt.found_inf = torch.ones(())          # as graphs.fused_step passes it
    opt.step()
    del opt.found_inf
    assert opt.step_count.item() == 0
    assert all(torch.equal(opt.master_of(p), b) for p, b in zip(ours.parameters(), before))
    assert all(torch.count_nonzero(s.m) == 0 and torch.count_nonzero(s.v) == 0 for s in opt.segments)
    give_grads(ours, ref, seed=1)
    opt.step()
    ref_opt.step()                          # the reference never saw the skipped step
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.master_of(p), q.detach(), rtol=2e-6, atol=1e-7)


def test_refuses_what_it_cannot_do():
    model = small_model()
    opt = MasterWeightAdamW(groups(model), lr=LR, kernels="torch")
    with pytest.raises(ValueError, match="have no gradient"):
        opt.step()
    with pytest.raises(NotImplementedError, match="cannot be saved"):
        opt.state_dict()
    with pytest.raises(ValueError, match="bfloat16 only"):
        MasterWeightAdamW(groups(small_model()), low_dtype=torch.float16)
    # a group added later was never updated (it is in no flat buffer)
    with pytest.raises(NotImplementedError, match="cannot take a param group after construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3))]})


def test_weights_loaded_after_construction_are_kept(kernels):
    """model.load_state_dict after building the optimizer wrote only the bf16 copies of the matrix
    weights: the next update rebuilt them from the stale masters (a Linear weight went back by 1.7)."""
    ours, ref = small_model(), small_model(seed=1)
    opt = MasterWeightAdamW(groups(ours), lr=LR, betas=BETAS, kernels=kernels)
    ref_opt = torch.optim.AdamW(groups(ref), lr=LR, betas=BETAS)
    give_grads(ours, ref, seed=0)
    opt.step()
    ref_opt.step()
    pretrained = small_model(seed=2).state_dict()
    ours.load_state_dict(pretrained)                      # bf16-rounded into the matrix weights
    ref.load_state_dict({k: v.to(torch.bfloat16).float() if v.ndim == 2 else v for k, v in pretrained.items()})
    for step in (1, 2):
        give_grads(ours, ref, seed=step)
        opt.step()
        ref_opt.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(opt.master_of(p), q.detach(), rtol=2e-6, atol=1e-7)
            assert torch.equal(p.detach(), opt.master_of(p).to(p.dtype))


def test_a_nan_master_stays_nan_in_the_bf16_weights(kernels):
    """The kernel rounds to bf16 on the bits: 0x7FFFFFFF (the NaN GPUs produce) carried into -0.0 and
    0xFFFFFFFF into +0.0, so a diverged weight became a finite zero."""
    model = small_model()
    opt = MasterWeightAdamW(groups(model), lr=LR, kernels=kernels)
    seg = next(s for s in opt.segments if s.low is not None)
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    seg.master[:4] = nans
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.isnan(seg.low[:4].float()).all()
    assert torch.equal(seg.low[4:], seg.master[4:].to(torch.bfloat16))


def lvmae_batch(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.nn.functional.normalize(torch.randn(n, 24, generator=g), dim=-1) for n in (5, 40, 17)]
    x, cu, lens = pack_sequences(seqs)
    return pad_to_bucket(build_masked_batch(x, cu, lens, "random", 0.5, generator=g))


def test_bf16_autocast_training_matches_fused_adamw_on_an_fp32_model(kernels):
    """Whole steps (GraphedTrainStep's static path: loss, backward, norm, clipping, update) under CPU bf16
    autocast: the bf16-weight model with fp32 masters gives the fp32 model's loss and gradient norm
    (autocast casts its weights to the same bf16 values), then masters equal to the weights fused AdamW
    wrote. From the second step on, a master a rounding away from the reference's can round to the
    other bf16 neighbour, so the next loss agrees only to ~1e-4 (a stale bf16 copy would be far off)."""
    cfg = LVMAEConfig.from_preset("tiny", in_dim=24, kernels="torch", attn_impl="sdpa")
    torch.manual_seed(0)
    ref = LVMAE(cfg)
    ours = LVMAE(cfg)
    ours.load_state_dict(ref.state_dict())
    ref_opt = torch.optim.AdamW(ref.param_groups(WD), lr=LR, betas=BETAS, fused=True)
    opt = MasterWeightAdamW(ours.param_groups(WD), lr=LR, betas=BETAS, kernels=kernels)
    ref_step = GraphedTrainStep(ref, autocast_dtype=torch.bfloat16, capture=False, optimizer=ref_opt, grad_clip=1.0)
    our_step = GraphedTrainStep(ours, autocast_dtype=torch.bfloat16, capture=False, optimizer=opt, grad_clip=1.0)
    losses = []
    for seed in range(2):
        batch = lvmae_batch(seed)
        ref_step.set_lr(LR)
        our_step.set_lr(LR)
        losses.append((our_step(batch), ref_step(batch)))
        if seed == 0:
            assert torch.equal(*losses[0])
            torch.testing.assert_close(our_step.grad_norm, ref_step.grad_norm, rtol=1e-5, atol=0)
            for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
                torch.testing.assert_close(opt.master_of(p), q.detach(), rtol=2e-6, atol=1e-7, msg=name)
    assert not torch.equal(losses[1][1], losses[0][1])
    torch.testing.assert_close(*losses[1], rtol=1e-3, atol=0)


@pytest.mark.gpu
def test_gpu_kernel_matches_the_torch_path():
    """The compiled kernel against the torch path on the same flat buffers (CUDA)."""
    models = [small_model().cuda() for _ in range(2)]
    opts = [MasterWeightAdamW(groups(m), lr=LR, betas=BETAS, kernels=k) for m, k in zip(models, ("triton", "torch"))]
    for step in range(3):
        g = torch.Generator(device="cuda").manual_seed(step)
        grads = [torch.randn(p.shape, generator=g, device="cuda").to(p.dtype) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.prepare_grads(0.5)
            opt.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(opts[0].master_of(p), opts[1].master_of(q), rtol=2e-6, atol=1e-7)
        assert torch.equal(p, opts[0].master_of(p).to(p.dtype))


@pytest.mark.gpu
def test_gpu_whole_step_graphs_replay_the_uncaptured_steps():
    """Whole-step CUDA graphs with MasterWeightAdamW (gradient gathering, norm, clipping and the kernel
    captured) against the same steps run uncaptured: same losses and norms, and the same update of the
    masters. Not bit for bit: on an H200 the first captured bf16 loss differed from the uncaptured one by
    2e-4 relative (cuBLAS picks its kernels under capture with another workspace), so the bound is the
    one a real fault breaks: a stale input, a skipped or doubled update is an O(1) error in the update."""
    cfg = LVMAEConfig.from_preset("tiny", in_dim=24, attn_impl="sdpa")
    runs = []
    for capture in (True, False):
        torch.manual_seed(0)
        model = LVMAE(cfg).cuda()
        opt = MasterWeightAdamW(model.param_groups(WD), lr=LR, betas=BETAS)
        start = torch.cat([opt.master_of(p).flatten() for p in model.parameters()]).clone()
        step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16, capture=capture, optimizer=opt, grad_clip=1.0)
        out = []
        for seed in (0, 1, 0, 1):  # two shapes, each replayed
            step.set_lr(LR)
            out.append((step(lvmae_batch(seed)), step.grad_norm.clone()))
        runs.append((out, torch.cat([opt.master_of(p).flatten() for p in model.parameters()]) - start))
    for (a, na), (b, nb) in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)  # the bounds of test_graphs' whole-step test
        torch.testing.assert_close(na, nb, rtol=5e-2, atol=1e-4)
    moved_captured, moved = runs[0][1], runs[1][1]
    assert moved.norm() > 0
    assert (moved_captured - moved).norm() <= 0.05 * moved.norm(), (moved_captured - moved).norm() / moved.norm()


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.99, 0.9999)])
def test_bias_corrections_are_exact_for_betas_near_1(betas):
    """The bias corrections were computed from fp32-rounded betas (0.9999 -> 0.99989998: 1 - beta2 off by
    1.7e-4 relative), so the first update was off by up to 8.4e-5 of its size; now as fp32 AdamW (1e-6)."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.zeros(64))
    ref = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    opt = MasterWeightAdamW([ours], lr=1e-3, betas=betas, eps=1e-12, weight_decay=0.0, kernels="torch")
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, betas=betas, eps=1e-12, weight_decay=0.0)
    g = torch.randn(64)
    ours.grad, ref.grad = g.clone(), g.double()
    opt.step()
    ref_opt.step()
    assert ((ours.detach().double() - ref.detach()).abs() / ref.detach().abs()).max() < 1e-6
