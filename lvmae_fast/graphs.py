"""Forward + loss + backward of shape-bucketed batches, replayed from one CUDA graph per bucket.

A small-batch LV-MAE step is bound by the host: a few thousand kernel launches for ~20 ms of GPU work.
A CUDA graph replays all of them with one launch. Recipe (PyTorch "whole-network capture"):
- batches are padded to a few shapes (buckets.pad_to_bucket); each new shape gets static input
  buffers, one eager warm-up on a side stream (cuBLAS/Triton lazy init) and one capture;
- gradients live in persistent `.grad` tensors allocated *outside* the graphs; captured backward
  accumulates into them in place (AccumulateGrad adds into a defined grad), and they are zeroed
  before each replay. All graphs therefore write the same gradient memory, and the optimizer,
  clipping and LR schedule stay eager and unchanged (a few fused launches);
- all graphs share one memory pool, so activations cost the largest bucket's, not the sum. Replays
  come in any order, so one graph's scratch may overlap another graph's output; that is safe because
  a graph's only pool-resident output (its loss) is copied out right after its replay, before any
  other replay is enqueued, and is rewritten by its own next replay before it is read again.
Captures use capture_error_mode="thread_local" (see _capture). Autocast runs with cache_enabled=False
inside captures (cached weight casts would be freed when the capture's autocast context exits while
the graph still reads them).

capture=False runs the identical static-buffer path eagerly (the CPU tests exercise it); shapes
beyond `max_graphs` run as plain eager steps.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from .buckets import shape_key
from .packing import PackedBatch

log = logging.getLogger(__name__)


class _Bucket:
    """One shape: the static batch every replay reads, and (once captured) the graph and its loss."""

    def __init__(self, static: PackedBatch):
        self.static = static
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def load(self, batch: PackedBatch) -> None:
        static = self.static.tensor_fields()
        for name, t in batch.tensor_fields().items():
            static[name].copy_(t, non_blocking=True)


class GraphedTrainStep:
    """`step(batch) -> loss`: runs forward, loss and backward of a padded batch; leaves the gradients
    in each parameter's `.grad` for an eager optimizer step. The returned loss is a fresh tensor."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                 capture: bool | None = None, max_graphs: int = 64, warmup_iters: int = 1):
        self.model = model
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        self.autocast_dtype, self.max_graphs, self.warmup_iters = autocast_dtype, max_graphs, warmup_iters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.buckets: dict[tuple, _Bucket] = {}
        self.pool = None
        self.eager_steps = 0   # steps that ran without a graph (shapes beyond max_graphs)

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
        torch._foreach_zero_(self.grads)
        if bucket.graph is None:
            return self._forward_backward(bucket.static)
        with torch.cuda.device(self.device):  # a graph launches on the current device's current stream
            bucket.graph.replay()
        return bucket.loss.clone()  # out of the shared pool before any other graph replays

    def prepare(self, batch: PackedBatch) -> bool:
        """Capture the graph for this batch's shape now (no replay; gradients are left zeroed), so a
        later step of that shape replays at once. True when a new shape was captured."""
        key, bucket = self._lookup(batch)
        if bucket is not None or len(self.buckets) >= self.max_graphs:
            return False
        self._bind_grads()
        self._add_bucket(key, batch)
        torch._foreach_zero_(self.grads)  # the capture's warm-up accumulated into them
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
        torch._foreach_zero_(self.grads)
        return self._forward_backward(batch.to(self.device, non_blocking=True))

    def _bind_grads(self) -> None:
        # The optimizer owner may have set .grad to None (zero_grad(set_to_none=True)); the captured
        # backward writes these tensors, so they must be the ones the optimizer reads.
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def _forward_backward(self, batch: PackedBatch) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else nullcontext())
        with autocast:
            loss = self.model(batch)
        loss.backward()
        return loss.detach()

    def _capture(self, bucket: _Bucket) -> None:
        # Captures record the current device's current stream: on cuda:N with another current device
        # nothing would be recorded (an empty graph, silently replaying nothing).
        with torch.cuda.device(self.device):
            self._capture_on_device(bucket)

    def _capture_on_device(self, bucket: _Bucket) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):  # lazy initialisation must not happen inside the capture
                self._forward_backward(bucket.static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread allocating pinned buffers mid-capture must not
        # invalidate the capture ("global" mode errors on unsafe CUDA calls from any thread).
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=torch.cuda.Stream(self.device),
                                  capture_error_mode="thread_local"):
                bucket.loss = self._forward_backward(bucket.static)
        except RuntimeError as err:
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
