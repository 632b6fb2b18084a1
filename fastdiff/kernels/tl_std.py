"""The few triton.language library functions our kernels call (tl.sum, tl.max), usable in both triton modes.

tl.sum and tl.max are themselves `@triton.jit` functions, decorated once when triton is imported. If triton was
imported before TRITON_INTERPRET=1 was set (diffusers imports torch._dynamo, which imports triton), they stay
compiled-mode JITFunctions that an interpreted kernel cannot call. Our kernel modules are imported lazily after the
variable is set, so here we wrap the library functions for the interpreter when needed. In compiled mode these are
the library functions themselves: the generated code is unchanged. Everything else our kernels use (tl.full, tl.dot,
tl.where, tl.reshape, ...) is a builtin that the interpreter patches in either case."""

import triton.language as tl

from .runtime import interpreting


def _portable(fn):
    if interpreting() and type(fn).__name__ == "JITFunction":
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn.fn)
    return fn


sum = _portable(tl.sum)  # shadows the builtin on purpose: tl_std.sum mirrors tl.sum
max = _portable(tl.max)  # likewise tl.max
