"""Shape buckets and the graphed train step: padding must change nothing but shapes.

The reference is the plain eager step on the unpadded batch (itself tested against the naive model in
test_model.py). CPU runs the graph step's static-buffer path with capture=False; the capture itself is
checked in the gpu-marked tests."""
import pytest
import torch

from lvmae_fast.buckets import bucket_size, pad_to_bucket, seqlen_floors, shape_key
from lvmae_fast.graphs import GraphedTrainStep
from lvmae_fast.masking import build_masked_batch
from lvmae_fast.model import LVMAE, LVMAEConfig
from lvmae_fast.packing import pack_sequences

IN_DIM = 24


def make_batch(lengths, seed, ratio=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.nn.functional.normalize(torch.randn(n, IN_DIM, generator=g, dtype=dtype), dim=-1) for n in lengths]
    x, cu, lens = pack_sequences(seqs)
    return build_masked_batch(x, cu, lens, "random", ratio, generator=g)


def make_model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    cfg = LVMAEConfig.from_preset("tiny", in_dim=IN_DIM, kernels="torch", attn_impl="sdpa", **overrides)
    return LVMAE(cfg).to(dtype)


def eager_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (100, 112), (128, 128), (129, 144),
                                         (1032, 1152), (2049, 2304)])
def test_bucket_size_hand_values(n, expected):
    # Steps: 16 below 256 (min bucket), then 2^floor(log2 n) / 8: 1032 -> step 128, 2049 -> step 256.
    assert bucket_size(n) == expected


def test_bucket_sizes_are_few_and_tight():
    sizes = {bucket_size(n) for n in range(1, 5000)}
    assert all(bucket_size(n) >= n and bucket_size(n) - n < max(16, n / 8) for n in range(1, 5000))
    assert len(sizes) < 60  # vs 4999 distinct raw sizes


@pytest.mark.parametrize("lengths", [[1, 2, 7, 300, 33], [5], [40, 41, 39]])
def test_padded_batch_keeps_real_rows_and_isolates_the_dummy(lengths):
    batch = make_batch(lengths, seed=1)
    padded = pad_to_bucket(batch)
    T, B = batch.num_tokens, len(lengths)
    B_, Tv, Tm, enc_max, dec_max = shape_key(padded)
    B_pad = {1: 2, 3: 4, 5: 6}[B]  # video buckets: 4 per octave above B (at least one dummy video)
    assert padded.padding_videos == B_pad - B
    assert (B_, Tv, Tm) == (B_pad, bucket_size(batch.visible_rows.numel() + B_pad - B), bucket_size(batch.masked_rows.numel()))
    assert enc_max >= max(padded.enc_cu_seqlens.diff()) and dec_max >= max(padded.dec_cu_seqlens.diff())
    assert padded.num_videos == B and padded.num_tokens == T and padded.max_seqlen == max(lengths)
    # Real rows, mask and stream boundaries are untouched; the dummy rows are zeros after them.
    torch.testing.assert_close(padded.x[:T], batch.x, rtol=0, atol=0)
    assert torch.equal(padded.masked[:T], batch.masked)
    assert torch.equal(padded.enc_cu_seqlens[: B + 1], batch.enc_cu_seqlens)
    assert torch.equal(padded.dec_cu_seqlens[: B + 1], batch.dec_cu_seqlens)
    assert not padded.x[T:].any()
    # Weights: 1/Tm on each real masked row, 0 on the dummy's.
    real_tm = batch.masked_rows.numel()
    assert torch.equal(padded.masked_rows[:real_tm], batch.masked_rows)
    torch.testing.assert_close(padded.row_weights[:real_tm].double(), torch.full((real_tm,), 1.0 / real_tm, dtype=torch.float64))
    assert not padded.row_weights[real_tm:].any()
    # Positions stay inside the table the real videos need.
    assert int(padded.enc_pos.max()) <= max(lengths) and int(padded.dec_pos.max()) <= max(lengths)
    with pytest.raises(ValueError, match="already padded"):
        pad_to_bucket(padded)


def test_varying_video_counts_share_few_shapes():
    """Token-budget batches: ~the same tokens spread over 9..30 videos (22 counts) share 8 shapes."""
    keys = set()
    for i, b in enumerate(range(9, 31)):
        lengths = [600 // b + (k < 600 % b) for k in range(b)]
        keys.add(shape_key(pad_to_bucket(make_batch(lengths, seed=i), min_seqlen=257)))
    assert {k[0] for k in keys} == {10, 12, 14, 16, 20, 24, 28, 32}  # 4 video-count buckets per octave
    assert len(keys) == 8, keys


def test_seqlen_floor_and_even_dummies():
    batch = make_batch([30, 2, 17, 9, 40, 3, 5, 8], seed=5)
    padded = pad_to_bucket(batch, min_seqlen=257)
    assert shape_key(padded)[3:] == (257, 257)  # the floor, whatever the crops, while they fit under it
    dummies = padded.lengths[8:]
    assert len(dummies) == 2 and max(dummies) - min(dummies) <= 2  # padding spread over the dummies
    assert shape_key(pad_to_bucket(batch))[3:] == (64, 64)  # no floor: a power of two >= the real lengths
    # A 300-row crop: encoder stream (151) stays under the floor, decoder stream (301) goes to 512.
    assert shape_key(pad_to_bucket(make_batch([300, 4], seed=6), min_seqlen=257))[3:] == (257, 512)
    # Per-stream floors (the sampler's, for crops of <= 256 at mask ratio 0.5): 129 CLS + visible rows at
    # most, 257 rows in the decoder; a stream past its floor goes to a power of two on its own.
    floors = seqlen_floors(256, 0.5)
    assert floors == {"min_seqlen": 257, "enc_min_seqlen": 129}
    assert shape_key(pad_to_bucket(batch, **floors))[3:] == (129, 257)
    assert shape_key(pad_to_bucket(make_batch([256, 200, 3], seed=7), **floors))[3:] == (129, 257)
    assert shape_key(pad_to_bucket(make_batch([300, 4], seed=6), **floors))[3:] == (256, 512)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_padded_batch_gives_the_unpadded_loss_and_gradients(loss):
    model = make_model(loss=loss)
    batch = make_batch([1, 2, 7, 300, 33], seed=2)
    ref_loss, ref_grads = eager_loss_and_grads(model, batch)
    pad_loss, pad_grads = eager_loss_and_grads(model, pad_to_bucket(batch))
    torch.testing.assert_close(pad_loss, ref_loss, rtol=1e-12, atol=1e-14)
    for k in ref_grads:
        torch.testing.assert_close(pad_grads[k], ref_grads[k], rtol=1e-10, atol=1e-13, msg=f"grad of {k}")


def test_padded_dummy_content_cannot_leak():
    """Garbage in the dummy rows must not move the loss or any gradient (attention is per video)."""
    model = make_model()
    padded = pad_to_bucket(make_batch([9, 30, 4], seed=3))
    ref_loss, ref_grads = eager_loss_and_grads(model, padded)
    T = padded.num_tokens
    padded.x[T:] = torch.randn_like(padded.x[T:]) * 100
    loss, grads = eager_loss_and_grads(model, padded)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-13, msg=f"grad of {k}")


def test_graph_step_static_path_matches_eager_steps():
    """Two shapes, interleaved: each step's loss and gradients equal the eager unpadded step's, the
    static buffers are reused per shape, and .grad memory never moves (captured backward relies on it)."""
    model = make_model()
    step = GraphedTrainStep(model, capture=False)
    batches = [make_batch([5, 9, 12], seed=s) for s in (10, 11)] + [make_batch([60, 70, 3, 2], seed=s) for s in (12, 13)]
    grad_ptrs = None
    for batch in [batches[0], batches[2], batches[1], batches[3], batches[0]]:
        ref_loss, ref_grads = eager_loss_and_grads(model, batch)
        model.zero_grad(set_to_none=True)  # what the trainer does after optimizer.step()
        loss = step(pad_to_bucket(batch))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-10, atol=1e-13, msg=f"grad of {k}")
        ptrs = [p.grad.data_ptr() for p in model.parameters()]
        assert grad_ptrs is None or ptrs == grad_ptrs
        grad_ptrs = ptrs
    assert len(step.buckets) == 2 and step.eager_steps == 0


def test_backward_accumulates_into_an_existing_grad_in_place():
    """The contract captured backward relies on: a defined .grad is added into, not replaced."""
    model = make_model()
    batch = make_batch([6, 8], seed=4)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    model(batch).backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert any(g.abs().sum() > 0 for g in grads)


def test_prepare_registers_a_shape_once_and_leaves_gradients_zeroed():
    model = make_model()
    step = GraphedTrainStep(model, capture=False, max_graphs=2)
    a, b, c = (pad_to_bucket(make_batch(L, seed=s)) for L, s in (([5, 9, 12], 30), ([60, 70, 3, 2], 31), ([200, 1], 32)))
    assert step.prepare(a) and not step.prepare(a) and step.prepare(b)
    assert not step.prepare(c) and len(step.buckets) == 2  # past max_graphs: left to the eager fallback
    assert all(float(g.abs().sum()) == 0.0 for g in step.grads)
    ref_loss, ref_grads = eager_loss_and_grads(model, a)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(step(a), ref_loss, rtol=1e-12, atol=1e-14)  # a prepared shape steps exactly
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-10, atol=1e-13, msg=f"grad of {k}")
    with pytest.raises(ValueError, match="shape-bucketed"):
        step.prepare(make_batch([4], seed=0))


def test_graph_step_beyond_max_graphs_runs_eagerly_and_stays_correct():
    model = make_model()
    step = GraphedTrainStep(model, capture=False, max_graphs=1)
    first, second = make_batch([5, 9], seed=20), make_batch([80, 90, 100], seed=21)
    step(pad_to_bucket(first))
    ref_loss, ref_grads = eager_loss_and_grads(model, second)
    loss = step(pad_to_bucket(second))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    assert step.eager_steps == 1 and len(step.buckets) == 1


def test_graph_step_refuses_unpadded_batches_and_capture_on_cpu():
    model = make_model()
    with pytest.raises(ValueError, match="shape-bucketed"):
        GraphedTrainStep(model, capture=False)(make_batch([4], seed=0))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedTrainStep(model, capture=True)


def reference_update(model, opt, batch, lr, grad_clip):
    """The trainer's step written out eagerly: backward, norm (+ clipping), AdamW update."""
    opt.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    params = list(model.parameters())
    norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
            else torch.nn.utils.get_total_norm([p.grad for p in params]))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss.detach(), norm


def whole_step_pair(**step_kwargs):
    ref_model, model = make_model(), make_model()
    # The reference optimizer is the plain single-tensor AdamW: an independent implementation of the update.
    ref_opt = torch.optim.AdamW(ref_model.param_groups(0.05), lr=1.0, betas=(0.9, 0.95), foreach=False)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1.0, betas=(0.9, 0.95), fused=True)
    return ref_model, ref_opt, model, GraphedTrainStep(model, capture=False, optimizer=opt, **step_kwargs)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_whole_step_updates_like_the_eager_trainer(grad_clip):
    """Whole-step mode (update inside the step): same loss, gradient norm and parameters after every
    step as backward + clipping + AdamW done eagerly, over two interleaved shapes and a changing lr."""
    ref_model, ref_opt, model, step = whole_step_pair(grad_clip=grad_clip)
    a = [make_batch([5, 9, 12], seed=s) for s in (40, 41)]
    b = [make_batch([60, 70, 3, 2], seed=s) for s in (42, 43)]
    for batch, lr in [(a[0], 1e-3), (b[0], 5e-4), (a[1], 2e-3), (b[1], 1e-3)]:
        # Both on the padded batch: the key bias's gradient is pure rounding noise (softmax ignores
        # it), which Adam scales up to lr-sized steps, so padded vs unpadded would differ there.
        batch = pad_to_bucket(batch)
        ref_loss, ref_norm = reference_update(ref_model, ref_opt, batch, lr, grad_clip)
        step.set_lr(lr)
        loss = step(batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(step.grad_norm, ref_norm, rtol=1e-10, atol=1e-13)
        for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
            # Fused vs single-tensor AdamW round differently (~1e-13 here); a wrong update is ~lr = 1e-3.
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-11, msg=f"parameter {k}")
            assert p.grad is None  # gradients live only inside the step
    if grad_clip:
        assert float(step.grad_norm) > grad_clip  # clipping was active, not a no-op
    assert len(step.buckets) == 2


def test_whole_step_skip_is_sticky_after_a_nonfinite_step():
    """A NaN step skips its update on the device, and so does every later step (the trainer reads
    step k's loss after queueing step k+1): parameters and Adam state stay as after step 1."""
    _, _, model, step = whole_step_pair()
    step.set_lr(1e-3)
    step(pad_to_bucket(make_batch([5, 9, 12], seed=50)))
    after_one = {k: p.detach().clone() for k, p in model.named_parameters()}
    moments = {k: v.clone() for k, v in step.optimizer.state[model.cls_token].items()}
    poisoned = make_batch([60, 70, 3, 2], seed=51)
    poisoned.x[3, 0] = float("nan")
    assert not torch.isfinite(step(pad_to_bucket(poisoned)))
    assert torch.isfinite(step(pad_to_bucket(make_batch([5, 9, 12], seed=52))))  # a clean step, still skipped
    assert float(step.halted) == 1.0
    for k, p in model.named_parameters():
        assert torch.equal(p, after_one[k]), k
    for name, value in step.optimizer.state[model.cls_token].items():
        assert torch.equal(value, moments[name]), name
    assert float(step.optimizer.state[model.cls_token]["step"]) == 1.0


@pytest.mark.parametrize("overlap_update", [False, True])
def test_whole_step_warmup_initialises_the_optimizer_and_changes_nothing(overlap_update):
    """What a new shape's warm-up runs before its capture: the full step with the update forced off."""
    _, _, model, step = whole_step_pair(overlap_update=overlap_update)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    step._step(pad_to_bucket(make_batch([7, 3], seed=60)), skip_update=True)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k
        state = step.optimizer.state[p]
        assert float(state["step"]) == 0.0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert float(step.halted) == 0.0 and all(p.grad is None for p in model.parameters())


def test_whole_step_refuses_optimizers_it_cannot_own():
    model = make_model()
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        GraphedTrainStep(model, capture=False, optimizer=torch.optim.AdamW(model.parameters(), foreach=False))
    partial = torch.optim.AdamW(list(model.parameters())[:3], fused=True)
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        GraphedTrainStep(model, capture=False, optimizer=partial)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="warmup_iters >= 1"):
        GraphedTrainStep(model, capture=False, optimizer=opt, warmup_iters=0)
    step = GraphedTrainStep(model, capture=False, optimizer=opt)
    opt.load_state_dict(opt.state_dict())  # replaces each group's lr: the graphs would read stale tensors
    with pytest.raises(RuntimeError, match="lr tensor was replaced"):
        step.set_lr(1e-3)


def record_update_chunks(step):
    """Wrap the step's optimizer.step: each call records the names of the parameters it updates (those
    holding a gradient) and of those whose gradient backward has not produced yet."""
    names = {id(p): k for k, p in step.model.named_parameters()}
    calls, inner = [], step.optimizer.step

    def step_and_record(*args, **kwargs):
        with_grad = [names[id(p)] for p in step.params if p.grad is not None]
        calls.append((with_grad, [names[id(p)] for p in step.params if p.grad is None]))
        return inner(*args, **kwargs)

    step.optimizer.step = step_and_record
    return calls


def test_overlapped_update_matches_the_eager_trainer_chunk_by_chunk_during_backward():
    """overlap_update=True: the same losses, norms and parameters as backward + AdamW done eagerly, over
    two shapes and a changing lr; the update comes in several chunks that partition the parameters, the
    first queued while backward has not yet reached the encoder's first block."""
    ref_model, ref_opt, model, step = whole_step_pair(overlap_update=True, overlap_chunks=6)
    calls = record_update_chunks(step)
    a = [make_batch([5, 9, 12], seed=s) for s in (40, 41)]
    b = [make_batch([60, 70, 3, 2], seed=s) for s in (42, 43)]
    for batch, lr in [(a[0], 1e-3), (b[0], 5e-4), (a[1], 2e-3), (b[1], 1e-3)]:
        batch = pad_to_bucket(batch)
        ref_loss, ref_norm = reference_update(ref_model, ref_opt, batch, lr, 0.0)
        step.set_lr(lr)
        calls.clear()
        loss = step(batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(step.grad_norm, ref_norm, rtol=1e-10, atol=1e-13)
        for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-11, msg=f"parameter {k}")
            assert p.grad is None
        updated = [k for with_grad, _ in calls for k in with_grad]
        assert sorted(updated) == sorted(k for k, _ in model.named_parameters())  # each exactly once
        assert 4 <= len(calls) <= 8, len(calls)
        assert "blocks.0.attn.qkv.weight" in calls[0][1]  # first chunk queued mid-backward
    assert float(step.halted) == 0.0


def test_an_overlapped_step_is_freed_with_its_last_reference():
    """The gradient hooks held the step by a bound method, in autograd's C++ where the collector cannot
    see the cycle: every overlapped step built stayed alive with its model and optimizer state (~5 GiB at
    paper size; bench/pretrain.py's later rows counted it in their peak memory). Its hooks go with it."""
    import gc
    import weakref

    _, _, model, step = whole_step_pair(overlap_update=True, overlap_chunks=3)
    step(pad_to_bucket(make_batch([5, 9, 12], seed=40)))
    gone, optimizer = weakref.ref(step), weakref.ref(step.optimizer)
    del step
    gc.collect()
    assert gone() is None and optimizer() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_overlapped_update_stops_at_the_first_nonfinite_chunk_and_stays_stopped():
    """A NaN gradient with a finite loss (in the encoder's first block, reached late in backward): the
    chunks queued before it keep their update, that chunk and all after it are skipped, and the next
    step is skipped whole (sticky). A NaN loss skips every chunk."""
    _, _, model, step = whole_step_pair(overlap_update=True, overlap_chunks=6)
    calls = record_update_chunks(step)
    step.set_lr(1e-3)
    step(pad_to_bucket(make_batch([5, 9, 12], seed=50)))
    assert float(step.partial_update) == 0.0
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    poisoned = dict(model.named_parameters())["blocks.0.attn.qkv.weight"]
    hook = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    calls.clear()
    assert torch.isfinite(step(pad_to_bucket(make_batch([60, 70, 3, 2], seed=51))))
    hook.remove()
    assert not torch.isfinite(step.grad_norm) and float(step.halted) == 1.0 and float(step.partial_update) == 1.0
    bad_chunk = next(i for i, (with_grad, _) in enumerate(calls) if "blocks.0.attn.qkv.weight" in with_grad)
    assert bad_chunk > 0
    for i, (with_grad, _) in enumerate(calls):
        for k in with_grad:
            changed = not torch.equal(dict(model.named_parameters())[k], before[k])
            assert changed == (i < bad_chunk), (k, i, bad_chunk)
    settled = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert torch.isfinite(step(pad_to_bucket(make_batch([5, 9, 12], seed=52))))  # clean, still skipped
    for k, p in model.named_parameters():
        assert torch.equal(p, settled[k]), k

    _, _, model, step = whole_step_pair(overlap_update=True, overlap_chunks=6)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    nan_loss = make_batch([5, 9, 12], seed=53)
    nan_loss.x[3, 0] = float("nan")
    step.set_lr(1e-3)
    assert not torch.isfinite(step(pad_to_bucket(nan_loss)))
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k
    assert float(step.partial_update) == 0.0  # nothing applied: the state before the step


def test_overlapped_update_refuses_what_it_cannot_overlap():
    model = make_model()
    with pytest.raises(ValueError, match="needs optimizer="):
        GraphedTrainStep(model, capture=False, overlap_update=True)
    opt = torch.optim.AdamW(model.param_groups(0.05), fused=True)
    with pytest.raises(ValueError, match="cannot clip gradients"):
        GraphedTrainStep(model, capture=False, optimizer=opt, grad_clip=1.0, overlap_update=True)
    assert all(type(g["lr"]) is float for g in opt.param_groups)  # refused before adopting the optimizer
    from lvmae_fast.master_adamw import MasterWeightAdamW

    bf16_model = make_model(dtype=torch.float32)
    master = MasterWeightAdamW(bf16_model.param_groups(0.05))
    with pytest.raises(ValueError, match="MasterWeightAdamW gathers the gradients itself"):
        GraphedTrainStep(bf16_model, capture=False, optimizer=master, overlap_update=True)
    with pytest.raises(ValueError, match="overlap_chunks must be >= 1"):
        GraphedTrainStep(model, capture=False, optimizer=opt, overlap_update=True, overlap_chunks=0)


@pytest.mark.gpu
def test_gpu_graph_replays_match_eager_steps_in_any_order():
    """Captured graphs (shared pool, bf16 autocast) vs eager steps on the same padded batches, replayed
    out of capture order: A, B, A, C, B. Tolerance rule (as the kernel tests): against an fp32 eager
    reference, the graph's gradient error is at most 2x the eager bf16 step's (plus a 1e-3 relative
    floor): a stale input, a missed zeroing or a doubled accumulation is an O(1) error."""
    torch.manual_seed(0)
    cfg = LVMAEConfig.from_preset("tiny", in_dim=IN_DIM, kernels="auto", attn_impl="auto")
    model = LVMAE(cfg).cuda()
    step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16)
    shapes = {"A": [5, 9, 12], "B": [60, 70, 3, 2], "C": [200, 1, 150]}

    def eager_grads(batch, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch)
        loss.backward()
        # Only the value: a live loss keeps its AccumulateGrad nodes (bound to this stream) alive, and
        # the next capture would reuse them (GraphedTrainStep's error names this cause).
        return loss.detach(), {k: p.grad.float().clone() for k, p in model.named_parameters()}

    for name, seed in [("A", 0), ("B", 1), ("A", 2), ("C", 3), ("B", 4)]:
        padded = pad_to_bucket(make_batch(shapes[name], seed=seed, dtype=torch.float32))
        loss32, g32 = eager_grads(padded.to("cuda"), autocast=False)
        loss16, g16 = eager_grads(padded.to("cuda"), autocast=True)
        model.zero_grad(set_to_none=True)
        loss = step(padded)
        torch.testing.assert_close(loss, loss16, rtol=1e-3, atol=1e-5)
        bad = {}
        for k, p in model.named_parameters():
            err_graph, err_eager = (p.grad.float() - g32[k]).norm(), (g16[k] - g32[k]).norm()
            if err_graph > 2 * err_eager + 1e-3 * g32[k].norm():
                bad[k] = (float(err_graph), float(err_eager), float(g32[k].norm()))
        assert not bad, f"shape {name}: (graph err, eager bf16 err, |grad|) vs fp32: {bad}"
    assert len(step.buckets) == 3 and all(b.graph is not None for b in step.buckets.values())


def test_row_weights_of_the_wrong_length_are_refused():
    from lvmae_fast.loss import masked_reconstruction_loss

    pred, x = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"row_weights has shape \(2,\), expected \(3,\)"):
        masked_reconstruction_loss(pred, x, torch.tensor([0, 2, 4]), row_weights=torch.ones(2))


@pytest.mark.gpu
@pytest.mark.parametrize("overlap_update", [False, True])
def test_gpu_whole_step_graphs_update_like_eager_updates(overlap_update):
    """Captured whole steps (update inside the graph, tensor lr, capturable fused AdamW; with
    overlap_update on a second stream during backward) vs the forward/backward graphs followed by an
    eager fused AdamW, over shapes A, B, A, C, B and changing lrs; then a NaN batch and a clean one must
    both leave everything unchanged (sticky skip, on the device). Updates are compared per parameter
    (relative error of p - p0; a missed, doubled or stale update is an O(1) error), except the key
    bias, whose gradient is rounding noise that Adam scales up to lr-sized steps of either sign.
    Clipping at 1.0 without overlap; overlap cannot clip."""
    clip = 0.0 if overlap_update else 1.0
    def build():
        torch.manual_seed(0)
        cfg = LVMAEConfig.from_preset("tiny", in_dim=IN_DIM, kernels="auto", attn_impl="auto")
        model = LVMAE(cfg).cuda()
        return model, torch.optim.AdamW(model.param_groups(0.05), lr=1.0, betas=(0.9, 0.95), fused=True)

    ref_model, ref_opt = build()
    ref_step = GraphedTrainStep(ref_model, autocast_dtype=torch.bfloat16)
    model, opt = build()
    step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16, optimizer=opt, grad_clip=clip,
                            overlap_update=overlap_update, overlap_chunks=6)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    shapes = {"A": [5, 9, 12], "B": [60, 70, 3, 2], "C": [200, 1, 150]}
    for (name, seed), lr in zip([("A", 0), ("B", 1), ("A", 2), ("C", 3), ("B", 4)], [1e-3, 5e-4, 2e-3, 1e-3, 3e-4]):
        padded = pad_to_bucket(make_batch(shapes[name], seed=seed, dtype=torch.float32))
        ref_loss = ref_step(padded)
        ref_norm = (torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip) if clip
                    else torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()]))
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        step.set_lr(lr)
        loss = step(padded)
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-4)
        torch.testing.assert_close(step.grad_norm, ref_norm.float(), rtol=5e-2, atol=1e-4)
    assert len(step.buckets) == 3 and all(b.graph is not None for b in step.buckets.values())
    bad = {}
    for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
        upd, ref_upd = (p - start[k]).float(), (q - start[k]).float()
        if k.endswith("attn.qkv.bias"):
            width = upd.numel() // 3
            upd, ref_upd = torch.cat([upd[:width], upd[2 * width:]]), torch.cat([ref_upd[:width], ref_upd[2 * width:]])
        err = (upd - ref_upd).norm() / ref_upd.norm().clamp_min(1e-12)
        if err > 0.1:
            bad[k] = float(err)
    assert not bad, f"relative update error vs eager updates: {bad}"
    settled = {k: p.detach().clone() for k, p in model.named_parameters()}
    poisoned = make_batch(shapes["A"], seed=5, dtype=torch.float32)
    poisoned.x[2, 0] = float("nan")
    assert not torch.isfinite(step(pad_to_bucket(poisoned)))
    assert torch.isfinite(step(pad_to_bucket(make_batch(shapes["B"], seed=6, dtype=torch.float32))))
    assert float(step.halted) == 1.0
    for k, p in model.named_parameters():
        assert torch.equal(p, settled[k]), k
    assert all(float(s["step"]) == 5.0 for s in opt.state.values())


@pytest.mark.gpu
@pytest.mark.parametrize("whole_step", [False, True])
def test_gpu_graphs_share_one_memory_pool(whole_step):
    """All shapes' graphs live in one pool: after the largest shape is captured, capturing smaller ones
    reuses its memory (they were captured on fresh streams once, and each kept its own)."""
    torch.manual_seed(0)
    cfg = LVMAEConfig.from_preset("tiny", in_dim=IN_DIM, kernels="auto", attn_impl="auto", embed_dim=256, depth=4,
                                  num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, max_len=4096)
    model = LVMAE(cfg).cuda()
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, fused=True) if whole_step else None
    step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16, optimizer=opt)
    big = pad_to_bucket(make_batch([3000, 2900, 2000], seed=0, dtype=torch.float32))
    smaller = [pad_to_bucket(make_batch(L, seed=s, dtype=torch.float32))
               for s, L in enumerate([[2000, 1500, 1000, 900], [1800, 1700], [2500, 10, 300, 20, 1000]], start=1)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    assert step.prepare(big)
    torch.cuda.synchronize()
    first = torch.cuda.memory_reserved() - before
    for b in smaller:
        assert step.prepare(b)
    torch.cuda.synchronize()
    rest = torch.cuda.memory_reserved() - before - first
    assert first > 32 * 2**20, first  # a capture big enough to measure
    assert rest < 0.5 * first, (first, rest)
