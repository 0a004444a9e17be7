"""Forward + loss + backward of shape-bucketed batches, replayed from one CUDA graph per bucket.

A small-batch LV-MAE step is bound by the host: a few thousand kernel launches for ~20 ms of GPU work.
A CUDA graph replays all of them with one launch. Recipe (PyTorch "whole-network capture"):
- batches are padded to a few shapes (buckets.pad_to_bucket); each new shape gets static input
  buffers, one eager warm-up on a side stream (cuBLAS/Triton lazy init) and one capture;
- gradients live in persistent `.grad` tensors allocated *outside* the graphs; captured backward
  accumulates into them in place (AccumulateGrad adds into a defined grad), and they are zeroed
  before each replay. All graphs therefore write the same gradient memory, and the optimizer,
  clipping and LR schedule stay eager and unchanged (a few fused launches);
- all graphs share one memory pool, so activations cost the largest bucket's, not the sum (they are
  all captured on one stream: the allocator reuses a block only on the stream it came from). Replays
  come in any order, so one graph's scratch may overlap another graph's output; that is safe because
  a graph's only pool-resident output (its loss) is copied out right after its replay, before any
  other replay is enqueued, and is rewritten by its own next replay before it is read again.
Captures use capture_error_mode="thread_local" (see _capture). Autocast runs with cache_enabled=False
inside captures (cached weight casts would be freed when the capture's autocast context exits while
the graph still reads them).

Whole-step mode (`optimizer=` a fused AdamW/Adam): the graphs also hold the gradient norm (and
clipping), the non-finite check and the optimizer update, so a step is one replay and nothing else.
Gradients are then not persistent: each graph's backward allocates them in the shared pool, its
optimizer update consumes them, and they are dropped before the graph ends (no zeroing pass and no
read-modify-write accumulation: ~7 GB less traffic per step for the 0.43B-parameter paper model).
The learning rate becomes a device tensor per param group (`set_lr` fills it; a captured update
reads it), the groups become `capturable` on CUDA, and a non-finite loss or gradient norm skips the
update on the device through fused AdamW's `found_inf` (GradScaler's mechanism). The skip is sticky
(`halted`): a trainer that reads step k's loss only after queueing step k+1 (no host sync per step)
finds both updates skipped, so the parameters it saves are those before step k. New shapes are
warmed up with the update forced off (optimizer state is initialised, nothing changes).

Overlapped update (`overlap_update=True`, whole-step mode without clipping): the update runs during
backward instead of after it. Each parameter's post-accumulate-grad hook collects it; once about
1/`overlap_chunks` of the parameters have their gradients, their norm, non-finite check and fused
AdamW update are queued on a second stream, which runs them beside the rest of backward (at batch 16
the paper model's GEMMs leave SMs idle, and AdamW needs bandwidth, not SMs). The main stream joins it
at the end of the step. The math per parameter is unchanged; what changes is the skip rule: a
non-finite loss still skips every update, but a non-finite gradient found in one chunk skips that chunk
and every chunk after it (and, sticky, every later step), while the chunks updated before it in
backward order (the decoder's first) keep their update. Clipping needs the whole gradient's norm first,
so it cannot overlap (refused).

capture=False runs the identical static-buffer path eagerly (the CPU tests exercise it); shapes
beyond `max_graphs` run as plain eager steps.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import nullcontext

import torch

from .buckets import shape_key
from .packing import PackedBatch

log = logging.getLogger(__name__)


def grad_norm_(params: list[torch.Tensor], grad_clip: float) -> torch.Tensor:
    """Total gradient norm of `params` (before clipping), clipping to `grad_clip` when > 0. Computed
    even without clipping: a finite loss can still come with non-finite gradients. No host sync."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def nonfinite(loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim: 1 when the loss or the gradient norm is NaN/Inf (fused AdamW's found_inf: the
    update is then skipped on the device, as GradScaler does), else 0."""
    return (~(torch.isfinite(loss) & torch.isfinite(norm))).to(torch.float32)


def fused_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() that a fused Adam/AdamW skips on the device when found_inf is 1."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class _Bucket:
    """One shape: the static batch every replay reads, and (once captured) the graph and its output
    (the loss; in whole-step mode the stacked [loss, grad_norm])."""

    def __init__(self, static: PackedBatch):
        self.static = static
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def load(self, batch: PackedBatch) -> None:
        static = self.static.tensor_fields()
        for name, t in batch.tensor_fields().items():
            static[name].copy_(t, non_blocking=True)


class GraphedTrainStep:
    """`step(batch) -> loss` (a fresh tensor) for a shape-bucketed batch.

    Without `optimizer`: runs forward, loss and backward, and leaves the gradients in each
    parameter's `.grad` for an eager optimizer step. With `optimizer` (fused Adam/AdamW over the
    model's parameters) and optional `grad_clip`: runs the whole training step, update included;
    `grad_norm` then holds the step's gradient norm (before clipping), and `set_lr` sets the
    learning rate of the next steps. `overlap_update`: that update runs in `overlap_chunks` pieces on
    a second stream during backward (module docstring; 8 was the fastest of 2-32 for the paper model at
    batch 16 on an H200, 2026-11-27)."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                 capture: bool | None = None, max_graphs: int = 64, warmup_iters: int = 1,
                 optimizer: torch.optim.Optimizer | None = None, grad_clip: float = 0.0,
                 overlap_update: bool = False, overlap_chunks: int = 8):
        self.model = model
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        self.autocast_dtype, self.max_graphs, self.warmup_iters = autocast_dtype, max_graphs, warmup_iters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: dict[tuple, _Bucket] = {}
        self.pool = None
        self.eager_steps = 0   # steps that ran without a graph (shapes beyond max_graphs)
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.grad_norm: torch.Tensor | None = None
        # One warm-up stream and one capture stream for every shape: the caching allocator reuses a
        # free block only on the stream it was allocated on, so captures on fresh streams would each
        # keep their own memory in the "shared" pool (the sum over shapes instead of the largest).
        self._streams: tuple | None = None
        self._overlap: _OverlappedUpdate | None = None
        self.partial_update: torch.Tensor | None = None  # overlap_update's flag (see _OverlappedUpdate)
        if overlap_update:  # before _adopt changes the optimizer's groups
            _OverlappedUpdate.check(optimizer, grad_clip, overlap_chunks)
        if optimizer is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        else:
            self._adopt(optimizer)
            if overlap_update:
                self._overlap = _OverlappedUpdate(self, overlap_chunks)

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Whole-step mode: device-tensor learning rates, capturable groups, the sticky skip flag."""
        groups = optimizer.param_groups
        if self.warmup_iters < 1:
            raise ValueError("GraphedTrainStep(optimizer=...) needs warmup_iters >= 1: the optimizer's state must be "
                             "created by an eager warm-up step, not inside a capture (where replays would re-zero it)")
        if not all(g.get("fused") for g in groups):
            raise ValueError("GraphedTrainStep(optimizer=...) needs a fused optimizer (e.g. AdamW(..., fused=True)): "
                             "its found_inf input is what skips a non-finite step without a host sync")
        owned = {id(p) for g in groups for p in g["params"]}
        if owned != {id(p) for p in self.params}:
            raise ValueError("GraphedTrainStep(optimizer=...): the optimizer must hold exactly the model's trainable "
                             "parameters (the graph's gradients exist only inside the step)")
        # A float lr would be baked into the captured update; a tensor is read at every replay. Its
        # dtype is what each fused kernel accepts: CUDA reads a tensor lr as float (a float lr as
        # double: ~1e-7 relative difference from the eager trainer), CPU as double (bit-identical).
        lr_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        for g in groups:
            g["lr"] = torch.tensor(float(g["lr"]), dtype=lr_dtype, device=self.device)
            if self.capture:
                g["capturable"] = True
        self._lrs = [g["lr"] for g in groups]  # the tensors the graphs read: they must never be replaced
        self.halted = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.params:  # gradients are allocated by each step's own backward
            p.grad = None

    def set_lr(self, lr: float) -> None:
        """Learning rate of every param group for the steps queued from now on (no host sync)."""
        for g, lr_t in zip(self.optimizer.param_groups, self._lrs):
            if g["lr"] is not lr_t:  # e.g. load_state_dict after construction: the graphs read lr_t
                raise RuntimeError("an optimizer param group's lr tensor was replaced after GraphedTrainStep adopted the "
                                   "optimizer; the captured updates still read the old one (load state first)")
            lr_t.fill_(lr)

    # ---- one step ---------------------------------------------------------------------------------
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        key, bucket = self._lookup(batch)
        if bucket is None and len(self.buckets) >= self.max_graphs:
            return self._eager(batch)
        self._bind_grads()
        if bucket is None:
            bucket = self._add_bucket(key, batch)
        else:
            bucket.load(batch)
        self._zero_grads()
        if bucket.graph is None:
            return self._output(self._step(bucket.static))
        with torch.cuda.device(self.device):  # a graph launches on the current device's current stream
            bucket.graph.replay()
        return self._output(bucket.out.clone())  # out of the shared pool before any other graph replays

    def prepare(self, batch: PackedBatch) -> bool:
        """Capture the graph for this batch's shape now (no replay; gradients are left zeroed), so a
        later step of that shape replays at once. True when a new shape was captured."""
        key, bucket = self._lookup(batch)
        if bucket is not None or len(self.buckets) >= self.max_graphs:
            return False
        self._bind_grads()
        self._add_bucket(key, batch)
        self._zero_grads()  # the capture's warm-up accumulated into them
        return True

    def _lookup(self, batch: PackedBatch) -> tuple[tuple, _Bucket | None]:
        if batch.row_weights is None:
            raise ValueError("GraphedTrainStep needs shape-bucketed batches (buckets.pad_to_bucket)")
        key = shape_key(batch)
        return key, self.buckets.get(key)

    def _add_bucket(self, key: tuple, batch: PackedBatch) -> _Bucket:
        """Static buffers for a new shape (a copy of this batch) and, on CUDA, its captured graph."""
        bucket = self.buckets[key] = _Bucket(batch.to(self.device, copy=True))
        if self.capture:
            self._capture(bucket)
            log.info("CUDA graph %d captured for shape %s", len(self.buckets), key)
        return bucket

    def _eager(self, batch: PackedBatch) -> torch.Tensor:
        if self.eager_steps == 0:
            log.warning("more than %d batch shapes: further new shapes run eagerly (raise max_graphs)", self.max_graphs)
        self.eager_steps += 1
        self._bind_grads()
        self._zero_grads()
        return self._output(self._step(batch.to(self.device, non_blocking=True)))

    def _bind_grads(self) -> None:
        # The optimizer owner may have set .grad to None (zero_grad(set_to_none=True)); the captured
        # backward writes these tensors, so they must be the ones the optimizer reads.
        if self.optimizer is not None:
            return
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def _zero_grads(self) -> None:
        if self.optimizer is None:
            torch._foreach_zero_(self.grads)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """The loss; in whole-step mode `out` is [loss, grad_norm] and the norm goes to grad_norm."""
        if self.optimizer is None:
            return out
        self.grad_norm = out[1]
        return out[0]

    def _step(self, batch: PackedBatch, skip_update: bool = False) -> torch.Tensor:
        """What a graph holds: forward + backward, and in whole-step mode the update too."""
        if self._overlap is not None:
            return self._overlap.step(batch, skip_update)
        loss = self._forward_backward(batch)
        return loss if self.optimizer is None else self._update(loss, skip_update)

    def _update(self, loss: torch.Tensor, skip_update: bool) -> torch.Tensor:
        """Gradient norm (and clipping), the device-side skip decision and the optimizer update; all
        without a host sync, so it can be captured. Returns [loss, grad_norm] in the loss's dtype."""
        # An optimizer that gathers gradients itself (master_adamw) also folds clipping into its update.
        prepare = getattr(self.optimizer, "prepare_grads", None)
        norm = prepare(self.grad_clip) if prepare is not None else grad_norm_(self.params, self.grad_clip)
        if skip_update:  # warm-up of a new shape: initialise optimizer state, change nothing
            found_inf = torch.ones((), dtype=torch.float32, device=self.device)
        else:
            found_inf = torch.maximum(nonfinite(loss, norm), self.halted)  # sticky: every later update skipped
            self.halted.copy_(found_inf)
        fused_step(self.optimizer, found_inf)
        for p in self.params:  # consumed: let the pool reuse the memory
            p.grad = None
        return torch.stack([loss, norm.to(loss.dtype)])

    def _forward(self, batch: PackedBatch) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else nullcontext())
        with autocast:
            return self.model(batch)

    def _forward_backward(self, batch: PackedBatch) -> torch.Tensor:
        loss = self._forward(batch)
        loss.backward()
        return loss.detach()

    def _capture(self, bucket: _Bucket) -> None:
        # Captures record the current device's current stream: on cuda:N with another current device
        # nothing would be recorded (an empty graph, silently replaying nothing).
        with torch.cuda.device(self.device):
            self._capture_on_device(bucket)

    def _capture_on_device(self, bucket: _Bucket) -> None:
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        side, capture_stream = self._streams
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):  # lazy initialisation must not happen inside the capture
                self._step(bucket.static, skip_update=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread allocating pinned buffers mid-capture must not
        # invalidate the capture ("global" mode errors on unsafe CUDA calls from any thread).
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream, capture_error_mode="thread_local"):
                bucket.out = self._step(bucket.static)
        except RuntimeError as err:
            # Leave nothing half made: no bucket for this shape, no gradients pointing into the pool.
            self.buckets = {k: b for k, b in self.buckets.items() if b is not bucket}
            if self.optimizer is not None:
                for p in self.params:
                    p.grad = None
            first = err
            while isinstance(first.__context__, RuntimeError):  # capture_end's error hides the real one
                first = first.__context__
            raise RuntimeError(
                f"CUDA graph capture of batch shape {shape_key(bucket.static)} failed: {str(first).splitlines()[0]}. "
                "A common cause: a tensor from an eager forward of this model (an undetached loss, say) still "
                "holds its autograd graph, so backward accumulates gradients on that step's stream; drop it "
                "(loss = loss.detach()) before the first graphed step.") from err
        if self.pool is None:
            self.pool = graph.pool()
        bucket.graph = graph


class _OverlappedUpdate:
    """Whole-step mode's update queued chunk by chunk during backward (see the module docstring)."""

    @staticmethod
    def check(optimizer: torch.optim.Optimizer | None, grad_clip: float, chunks: int) -> None:
        if optimizer is None:
            raise ValueError("GraphedTrainStep(overlap_update=True) needs optimizer=: it overlaps the update, "
                             "which only whole-step mode runs inside the step")
        if grad_clip > 0:
            raise ValueError("GraphedTrainStep(overlap_update=True) cannot clip gradients (grad_clip > 0): clipping "
                             "needs the whole gradient's norm before the first update")
        if hasattr(optimizer, "prepare_grads"):
            raise ValueError("GraphedTrainStep(overlap_update=True) needs torch's fused Adam/AdamW; "
                             f"{type(optimizer).__name__} gathers the gradients itself")
        if chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1, got {chunks}")

    def __init__(self, owner: GraphedTrainStep, chunks: int):
        self.owner = owner
        self.chunk_numel = max(1, sum(p.numel() for p in owner.params) // chunks)
        self.stream = torch.cuda.Stream(owner.device) if owner.device.type == "cuda" else None
        self.main: torch.cuda.Stream | None = None   # the stream backward runs on, during a step
        self.collecting = False
        self.ready: list[torch.Tensor] = []          # parameters with a gradient, not yet in a chunk
        self.ready_numel = 0
        self.held: list[torch.Tensor] = []           # gradients of queued chunks, alive until the join
        self.found: torch.Tensor | None = None       # 1 once the loss or any chunk so far is non-finite
        self.applied: torch.Tensor | None = None     # 1 once a chunk of this step has been updated
        self.norm_sq: torch.Tensor | None = None     # sum of the chunks' squared gradient norms
        # Sticky, like halted: 1 once a step updated some chunks and then met a non-finite gradient, so its
        # weights are no step's state. Persistent (outside the graphs' pool): the trainer reads it only
        # after a non-finite step, when later steps have replayed (and, halted, applied nothing).
        owner.partial_update = torch.zeros((), dtype=torch.float32, device=owner.device)
        # The hooks hold this object weakly: autograd keeps a hook in C++, where Python's collector cannot
        # see a cycle through it, so a bound method kept the step, its model and optimizer state alive for
        # the whole process (~5 GiB per paper-size step built; every later peak-memory figure counted it).
        on_grad = weakref.WeakMethod(self._on_grad)

        def hook(p: torch.Tensor) -> None:
            method = on_grad()
            if method is not None:
                method(p)

        handles = [p.register_post_accumulate_grad_hook(hook) for p in owner.params]
        weakref.finalize(self, lambda: [h.remove() for h in handles])   # no dead hooks left on the model

    def step(self, batch: PackedBatch, skip_update: bool) -> torch.Tensor:
        owner = self.owner
        loss = owner._forward(batch)
        device = owner.device
        self.main = torch.cuda.current_stream(device) if self.stream is not None else None
        # found, norm_sq and applied are written in place by the update stream: allocated here (main
        # stream), they stay alive until the join.
        if skip_update:
            self.found = torch.ones((), dtype=torch.float32, device=device)
        else:
            self.found = torch.maximum(nonfinite(loss.detach(), loss.detach()), owner.halted)
        self.norm_sq = torch.zeros((), dtype=owner.params[0].dtype, device=device)
        self.applied = torch.zeros((), dtype=torch.float32, device=device)
        self.collecting = True
        try:
            loss.backward()
            self._queue()  # what is left (less than a chunk)
        finally:
            self.collecting, self.ready, self.ready_numel = False, [], 0
            if self.stream is not None:
                self.main.wait_stream(self.stream)  # join: the step ends when every update has run
            self.held = []  # freed on the main stream after the join: no other stream still reads them
        if not skip_update:
            owner.halted.copy_(self.found)
            torch.maximum(owner.partial_update, self.applied * self.found, out=owner.partial_update)
        loss = loss.detach()
        norm = self.norm_sq.sqrt()
        self.found = self.norm_sq = self.applied = None
        return torch.stack([loss, norm.to(loss.dtype)])

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self.collecting:
            return
        self.ready.append(param)
        self.ready_numel += param.numel()
        if self.ready_numel >= self.chunk_numel:
            self._queue()

    def _queue(self) -> None:
        """Norm, non-finite check and update of the ready parameters, on the update stream."""
        params, self.ready, self.ready_numel = self.ready, [], 0
        if not params:
            return
        grads = [p.grad for p in params]
        context = nullcontext()
        if self.stream is not None:
            self.stream.wait_stream(self.main)  # after backward has written these gradients
            context = torch.cuda.stream(self.stream)
        with context:
            norm = torch.nn.utils.get_total_norm(grads).to(self.norm_sq.dtype)
            self.norm_sq.add_(norm * norm)
            torch.maximum(self.found, (~torch.isfinite(norm)).to(torch.float32), out=self.found)
            torch.maximum(self.applied, 1.0 - self.found, out=self.applied)  # this chunk is updated unless found
            # Queued chunks hold no .grad any more and later ones have none yet, so step() updates
            # exactly these parameters.
            fused_step(self.owner.optimizer, self.found)
        self.held.extend(grads)
        for p in params:
            p.grad = None
