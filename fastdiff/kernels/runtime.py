"""What every launcher needs before it starts a Triton kernel: is the interpreter on, may these tensors run, and the
small integer helpers shared by the ops. Nothing here imports triton, so the references work where triton is absent."""

from __future__ import annotations

import importlib
import os
import sys

import torch

_TRUE = {"1", "true", "on", "yes"}


def interpreting() -> bool:
    """TRITON_INTERPRET as triton reads it. Triton decides at decoration time (`@triton.jit` returns an
    InterpretedFunction or a JITFunction), so it must be set before a kernel module is first imported; ours are
    imported lazily by their launchers on first call for that reason."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


# every module that decorates triton functions at import; tl_std first, the kernels import it
KERNEL_MODULES = (
    "fastdiff.kernels.tl_std",
    "fastdiff.kernels.block_sparse_attention.kernel",
    "fastdiff.kernels.block_select.kernel",
)


def use_interpreter() -> None:
    """Run our Triton kernels in triton's interpreter from now on (CPU tests): set TRITON_INTERPRET=1 for the rest
    of the process (triton also reads it while interpreted kernels run, so it must stay set) and re-decorate our
    kernel modules that were already imported in compiled mode. Other libraries' kernels are left alone."""
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def kernel_module(name: str):
    """Import a kernel module on first use (so TRITON_INTERPRET set by then takes effect); RuntimeError when triton
    is missing."""
    try:
        mod = importlib.import_module(name)
    except ImportError as err:  # triton is an optional dependency (extra `kernels`)
        raise RuntimeError(f"fastdiff.kernels needs triton ({err}); install fastdiff[kernels]") from err
    return mod


def is_interpreted(fn) -> bool:
    """Whether a decorated triton kernel runs in the interpreter (numpy on the host)."""
    return type(fn).__name__ == "InterpretedFunction"


def check_runnable(fn, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless `fn` can run on these tensors: CUDA tensors with a compiled kernel, or any tensors
    with an interpreted one."""
    if is_interpreted(fn):
        return
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(
                f"Triton kernels need CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 before the first "
                "call of a fastdiff kernel (slow: tests only), or use the pure-torch reference"
            )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0
