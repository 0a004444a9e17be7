"""The training step both pretraining benchmarks time (step mode and data mode), in its three forms:
eager, forward/backward CUDA graphs + eager fused AdamW, and whole-step graphs (update captured)."""
from __future__ import annotations

import torch

from lvmae_fast.graphs import GraphedTrainStep

LR = 1e-4


def make_optimizer(model, master_weights: bool = False) -> torch.optim.Optimizer:
    """Fused AdamW over fp32 parameters, as the trainer; master_weights: MasterWeightAdamW, which stores
    the model's matrix weights in bf16 from here on (the model then runs under bf16 autocast only)."""
    if master_weights:
        from lvmae_fast.master_adamw import MasterWeightAdamW

        return MasterWeightAdamW(model.param_groups(0.05), lr=LR, betas=(0.9, 0.95))
    return torch.optim.AdamW(model.param_groups(0.05), lr=LR, betas=(0.9, 0.95), fused=True)


def make_step(model, optimizer, device, cuda_graphs=False, graph_optimizer=False, pinned_input=None,
              overlap_chunks=0):
    """(step(batch) -> loss, the GraphedTrainStep or None). Graphed steps copy each batch into their
    static buffers themselves. pinned_input=None: eager batches are already on the device; True/False:
    the eager step copies each batch there (non-blocking from pinned memory). overlap_chunks > 0: whole-step
    graphs whose update runs in that many chunks on a second stream during backward (GraphedTrainStep's
    overlap_update)."""
    # bf16 autocast on CUDA, and wherever the weights are bf16 already (MasterWeightAdamW)
    bf16 = device.type == "cuda" or any(p.dtype == torch.bfloat16 for p in model.parameters())
    graphed = None
    if cuda_graphs:
        graphed = GraphedTrainStep(model, autocast_dtype=torch.bfloat16 if bf16 else None,
                                   optimizer=optimizer if graph_optimizer else None,
                                   overlap_update=overlap_chunks > 0, overlap_chunks=overlap_chunks)

    def step(batch):
        if graphed is not None and graphed.optimizer is not None:  # one replay, update included
            graphed.set_lr(LR)  # the trainer sets the scheduled lr before every step
            return graphed(batch)
        if graphed is not None:
            loss = graphed(batch)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch if pinned_input is None else batch.to(device, non_blocking=pinned_input))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, graphed
