"""Shared by the kernel tests: device, skip marks, seeded inputs, relative error."""

import importlib.util

import pytest
import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (extra `kernels`)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes; bf16 tl.dot is wrong in the interpreter)")


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude (fla-style)."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))
