"""Kernel tests: real GPU when CUDA is present, else triton's interpreter on CPU (numpy, ~1000x slower than SDPA, so
shapes stay small). The interpreter must be on before our kernel modules are decorated and while they run;
use_interpreter() also re-decorates any of ours imported earlier in this process in compiled mode (other test
packages import diffusers, hence torch._dynamo, hence triton, long before this file)."""

from .common import CUDA, HAS_TRITON

if HAS_TRITON and not CUDA:
    from fastdiff.kernels.runtime import use_interpreter

    use_interpreter()
