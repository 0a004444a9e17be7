"""The `device` option shared by every command: auto | cpu | cuda | cuda:N."""
from __future__ import annotations

import re

import torch

# What every command accepts (train_config checks the same for `device` in a config). Other torch
# device types (mps, xpu, meta, ...) have no support here: `meta` tensors hold no data, and this
# build of torch may not know the others at all; refused up front with one line, before anything is written.
DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d+)?")


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (use cpu or auto)")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        # Triton launches, CUDA-graph captures and replays use the *current* device: make it this one.
        torch.cuda.set_device(device)
    return device
