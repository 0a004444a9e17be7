"""Triton kernels (imported as lvmae_fast.kernels)."""
