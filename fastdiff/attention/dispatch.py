"""The one place that picks how attention is computed: our Triton kernel, FlexAttention, gathered blocks in
torch, or SDPA. Nothing else imports `fastdiff.kernels`.

`attention(q, k, v, sparse)` computes dense attention (sparse=None) or the block-sparse attention a `BlockSparse`
describes; every backend gives the same result within floating-point tolerance. `predict(...)` scores key blocks
per query block and keeps the top-k / top-p ones (the kernels' predictor).

Backends, chosen in this order unless forced by `backend=` or the environment variable FASTDIFF_ATTENTION_BACKEND:
- "triton": the fused block-sparse FlashAttention kernel (CUDA, or the Triton interpreter when TRITON_INTERPRET=1
  is set before fastdiff is imported); needs no key mask.
- "gather": each query block attends its gathered key blocks with SDPA (any device; the CPU path that pays).
- "flex": FlexAttention with the same block mask (compiled on GPU; eager elsewhere, slow).
- "sdpa": SDPA with the dense boolean mask the blocks mean (exact, computes every pair: the reference path).
Dense attention always goes to SDPA itself, bit-identical to the model without fastdiff.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import FastDiffError

# The kernels' block-list format (pure torch, no triton import), re-exported for the patterns and backends here.
from ..kernels.block_sparse_attention.layout import index_to_mask, mask_to_index, token_mask  # noqa: F401
from . import blockwise

BACKENDS = ("triton", "gather", "flex", "sdpa")
ENV = "FASTDIFF_ATTENTION_BACKEND"

# The SDPA the model would have called. Captured at import, before `route` installs its interception, so the
# backends below never re-enter it.
_sdpa = F.scaled_dot_product_attention


@dataclass(frozen=True)
class BlockSparse:
    """Which key blocks each query block attends.

    Args:
        kv_index: int32 (1|B, 1|H, query blocks, K): key-block ids, ascending, valid ones first.
        kv_count: int32 (1|B, 1|H, query blocks): how many entries of kv_index are valid.
        block: tokens per query block and per key block (a power of two >= 16).
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    block: int


def sdpa(*args, **kwargs):
    """torch's SDPA as the model would have called it (never the routed one)."""
    return _sdpa(*args, **kwargs)


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_ready() -> str | None:
    """None when the Triton kernels can run here, else why not (not cached: the interpreter may be switched on)."""
    from ..kernels.runtime import interpreting

    if not _triton_installed():
        return "triton is not installed (pip install 'fastdiff[kernels]')"
    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, very slowly)"


def choose(q: torch.Tensor, key_mask: torch.Tensor | None = None, backend: str | None = None) -> str:
    """The backend for a block-sparse call: `backend`, else the environment override, else the fastest here."""
    forced = backend or os.environ.get(ENV) or None
    if forced is not None:
        if forced not in BACKENDS:
            raise FastDiffError(f"attention backend {forced!r} is unknown; choose one of {BACKENDS}"
                                f"{f' (from ${ENV})' if not backend else ''}")
        if forced == "triton":
            why = _triton_ready() or ("the Triton kernel takes no key mask" if key_mask is not None else None)
            if why:
                raise FastDiffError(f"attention backend 'triton' was forced but cannot run: {why}")
        return forced
    # the kernel's fast paths are half precision; fp32 (3xTF32) is exact but slower than the gathered blocks
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key_mask is None and _triton_ready() is None:
        return "triton"
    return "gather"


def attention(q, k, v, sparse: BlockSparse | None = None, *, scale: float | None = None,
              key_mask: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of q (B, H, Nq, D) over k, v (B, H, Nk, D). `sparse`: only the listed key blocks; `key_mask`:
    (B, Nk) bool, keys that may be attended (a padding mask)."""
    if sparse is None:
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        return _sdpa(q, k, v, attn_mask=mask, scale=scale)
    name = choose(q, key_mask, backend)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    if name == "triton":
        from ..kernels.block_sparse_attention import block_sparse_attention

        return block_sparse_attention(q, k, v, sparse.kv_index, sparse.kv_count, block_q=sparse.block,
                                      block_k=sparse.block, scale=scale)
    if name == "gather":
        return blockwise.gathered(q, k, v, sparse.kv_index, sparse.kv_count, sparse.block, scale, key_mask, _sdpa)
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        allowed = index_to_mask(*blockwise.expand_lists(sparse.kv_index, sparse.kv_count, b, h),
                                math.ceil(nk / sparse.block))
        mask = blockwise.flex_block_mask(sparse.kv_index, sparse.kv_count, allowed, b, h, nq, nk, sparse.block,
                                         key_mask)
        return flex_attention(q, k, v, block_mask=mask, scale=scale)
    mask = token_mask(sparse.kv_index, sparse.kv_count, nq, nk, sparse.block, sparse.block)
    if key_mask is not None:
        mask = mask & key_mask.to(torch.bool)[:, None, None, :]
    out = _sdpa(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, out.new_zeros(()))  # a row with no key: 0, as the others


def predict(q, k, block: int, *, top_k: int | None = None, top_p: float | None = None, method: str = "mean",
            stride: int = 8, keep: torch.Tensor | None = None, scale: float | None = None):
    """Key blocks per query block from pooled scores: (kv_index, kv_count, density (B, H)). Triton scoring where
    the kernels run, the kernels' torch reference elsewhere (same selection)."""
    if (q.is_cuda and _triton_ready() is None) or os.environ.get(ENV) == "triton":
        from ..kernels.block_select import predict_blocks
    else:
        from ..kernels.block_select import predict_blocks_reference as predict_blocks
    return predict_blocks(q, k, block, block, method=method, stride=stride, top_k=top_k, top_p=top_p, keep=keep,
                          scale=scale)
