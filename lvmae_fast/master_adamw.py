"""AdamW over fp32 master weights, with the model's matrix weights stored in bf16 (opt-in; timed by
`bench/pretrain.py --master-weights`; not used by `lvmae pretrain` yet).

Why: an H200 profile of the compiled whole-step batch-16 step (bench/results/2026-11-26b_h200/
profile_b16.txt) spends 18.8% of its GPU time in fused AdamW and several percent more in dtype casts.
Under bf16 autocast every step casts each fp32 weight to bf16 (forward), each bf16 weight gradient to
fp32 (backward), reads the fp32 gradients for the norm and rewrites them to clip, then AdamW moves 28
bytes per parameter: ~52 bytes per parameter per step. Here the forward reads bf16 weights as they are,
the gradients stay bf16, the norm reads them once, and one kernel per segment applies clipping, the
AdamW update of the fp32 master and the write of the bf16 copy: ~32 bytes (kernels/_adamw.py).

Numerics: autocast's weight cast rounds the fp32 weight to nearest bf16, which is the copy kept here,
and its gradient cast back to fp32 is exact, so the update reads the same gradient values and writes
the same master as fused AdamW under autocast, up to rounding order (tested against torch.optim.AdamW).

Layout: each param group splits into segments by storage. Matrix weights (ndim == 2: the nn.Linear
weights) become views of one flat bf16 buffer, with their fp32 masters in another; the other
parameters (biases, norms, tokens) stay fp32 and become views of a flat buffer that is their own
master. Moments are flat fp32 buffers. Gradients are gathered into one flat buffer per segment (one
torch.cat), so the update is one launch per segment.

Limits: the matrix weights are bf16 from construction on, so the model then runs under bf16 autocast
(training); `master_of(p)` gives a parameter's fp32 weights. Writing a weight in place after construction
(`load_state_dict`, `nn.init`) is picked up by the next `step()`; replacing a parameter's `.data` or
writing through `.data` is not (the write is not counted: build the optimizer after loading). Optimizer
state is not saved or loaded (`state_dict` refuses rather than writing a checkpoint that resumes wrong).
"""
from __future__ import annotations

from itertools import accumulate

import torch

from .kernels import use_triton

LOW_DTYPE = torch.bfloat16


class _Segment:
    """One param group's parameters of one storage kind, flattened: master/m/v fp32, low = the model's
    bf16 weights (None: the parameters are fp32 views of master itself)."""

    def __init__(self, group_index: int, params: list[torch.nn.Parameter], low_dtype: torch.dtype | None):
        self.group_index, self.params = group_index, params
        ends = list(accumulate(p.numel() for p in params))
        self.bounds = list(zip([0] + ends[:-1], ends))
        with torch.no_grad():
            self.master = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
            self.m, self.v = torch.zeros_like(self.master), torch.zeros_like(self.master)
            self.low = None if low_dtype is None else self.master.to(low_dtype)
            storage = self.master if self.low is None else self.low
            for p, (a, b) in zip(params, self.bounds):
                p.data = storage[a:b].view(p.shape)  # the model reads (and autograd fills grads for) these views
        self.grad: torch.Tensor | None = None
        self.versions = [p._version for p in params]  # in-place writes into a parameter count here

    @torch.no_grad()
    def adopt_weights_written_in_place(self) -> None:
        """A write into a bf16 weight since the last update (model.load_state_dict, an nn.init call) changed
        only the bf16 copy: the update would rebuild it from the stale master and undo the write. A
        written parameter's bf16 values become its master, as an fp32 weight loaded with them would be.
        Our own updates write through the flat buffer, which the parameters' version counters do not see."""
        if self.low is None:
            return
        for i, (p, (a, b)) in enumerate(zip(self.params, self.bounds)):
            if p._version != self.versions[i]:
                self.master[a:b].copy_(self.low[a:b])
                self.versions[i] = p._version

    def gather_grads(self) -> torch.Tensor:
        missing = [tuple(p.shape) for p in self.params if p.grad is None]
        if missing:
            raise ValueError(f"MasterWeightAdamW: {len(missing)} parameter(s) have no gradient (shapes {missing[:3]}); "
                             "every parameter it holds must take part in the loss")
        self.grad = torch.cat([p.grad.reshape(-1) for p in self.params])
        return self.grad


class MasterWeightAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update on fp32 masters of bf16 matrix weights (module docstring).

    `prepare_grads(max_norm)` gathers the gradients and returns their total norm (before clipping),
    folding clipping into the update; `step()` calls it itself when nobody has. A `found_inf` attribute
    (fp32 0-dim device tensor, as graphs.fused_step sets it) skips the update on the device, as fused
    AdamW does: nothing is written and the step count does not advance. `kernels`: auto | triton | torch
    (auto: the Triton kernel on CUDA)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, low_dtype: torch.dtype = LOW_DTYPE, kernels: str = "auto"):
        if low_dtype != torch.bfloat16:  # the kernel rounds to bf16 by hand (kernels/_adamw.py)
            raise ValueError(f"MasterWeightAdamW stores matrix weights in bfloat16 only, got {low_dtype}")
        if not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0.0:
            raise ValueError(f"MasterWeightAdamW: invalid eps={eps}, betas={betas} or weight_decay={weight_decay}")
        # fused=True: GraphedTrainStep's whole-step mode needs an optimizer that honours found_inf.
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True))
        self.kernels = kernels
        self.segments: list[_Segment] = []
        for gi, group in enumerate(self.param_groups):
            for low in (True, False):
                chosen = [p for p in group["params"] if (p.ndim == 2) == low]
                if chosen:
                    self.segments.append(_Segment(gi, chosen, low_dtype if low else None))
        device = self.segments[0].master.device if self.segments else torch.device("cpu")
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self._no_skip = torch.zeros((), dtype=torch.float32, device=device)
        self._prepared = False
        self._where = {id(p): (seg, a, b) for seg in self.segments for p, (a, b) in zip(seg.params, seg.bounds)}

    def add_param_group(self, param_group):
        # Segments are built once, from the groups given at construction: a group added later would never
        # be updated (its parameters are not in any flat buffer).
        if hasattr(self, "segments"):
            raise NotImplementedError("MasterWeightAdamW cannot take a param group after construction; "
                                      "pass every group to its constructor")
        super().add_param_group(param_group)

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master weights of parameter `p` (a view: it follows the updates)."""
        seg, a, b = self._where[id(p)]
        return seg.master[a:b].view(p.shape)

    @torch.no_grad()
    def prepare_grads(self, max_norm: float = 0.0) -> torch.Tensor:
        """Gather the gradients; return their total L2 norm (fp32, before clipping). With max_norm > 0
        the update scales them by min(1, max_norm / (norm + 1e-6)), clip_grad_norm_'s coefficient."""
        norms = [torch.linalg.vector_norm(seg.gather_grads(), dtype=torch.float32) for seg in self.segments]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm > 0:
            self.scale.copy_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        else:
            self.scale.fill_(1.0)
        self._prepared = True
        return total

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step does not take a closure")
        if not self._prepared:
            self.prepare_grads(0.0)
        for seg in self.segments:
            seg.adopt_weights_written_in_place()
        skip = getattr(self, "found_inf", None)
        skip = self._no_skip if skip is None else skip.to(torch.float32).reshape(())
        self.step_count += 1.0 - skip
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            # A float lr in float64, as GraphedTrainStep's tensor lr (no fp32 rounding before the corrections).
            lr = (lr.reshape(()) if torch.is_tensor(lr)
                  else torch.tensor(float(lr), dtype=torch.float64, device=self.step_count.device))
            # Bias corrections in double, as torch's AdamW: in fp32 a beta2 near 1 (0.9999 -> 0.99989998)
            # skews 1 - beta2**t by 1.7e-4 relative. Device scalars: still no host sync.
            t = self.step_count.to(torch.float64)
            step_size = (lr.to(torch.float64) / (1.0 - torch.pow(beta1, t))).to(torch.float32).reshape(())
            bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t)).to(torch.float32).reshape(())
            for seg in self.segments:
                if seg.group_index == gi:
                    self._update(seg, lr, step_size, bc2_sqrt, skip, beta1, beta2, group["eps"], group["weight_decay"])
        for seg in self.segments:
            seg.grad = None  # gathered copy consumed
        self._prepared = False

    def _update(self, seg: _Segment, lr, step_size, bc2_sqrt, skip, beta1, beta2, eps, weight_decay) -> None:
        if use_triton(self.kernels, seg.master):
            from .kernels._adamw import master_adamw

            master_adamw(seg.grad, seg.master, seg.m, seg.v, seg.low, lr, step_size, bc2_sqrt, self.scale, skip,
                         beta1, beta2, eps, weight_decay)
            return
        # torch path: the same arithmetic as the kernel, on whole flat buffers
        keep = skip == 0
        g = seg.grad.to(torch.float32) * self.scale
        p = seg.master * (1.0 - lr.to(torch.float32) * weight_decay)
        m = seg.m + (1.0 - beta1) * (g - seg.m)
        v = seg.v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
        seg.master.copy_(torch.where(keep, p, seg.master))
        seg.m.copy_(torch.where(keep, m, seg.m))
        seg.v.copy_(torch.where(keep, v, seg.v))
        if seg.low is not None:
            seg.low.copy_(seg.master)

    def state_dict(self):
        raise NotImplementedError("MasterWeightAdamW keeps its state in flat buffers and cannot be saved yet; "
                                  "use torch.optim.AdamW(fused=True) for resumable training")

    def load_state_dict(self, state_dict):
        raise NotImplementedError("MasterWeightAdamW cannot load optimizer state yet")
