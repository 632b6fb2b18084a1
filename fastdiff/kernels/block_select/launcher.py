"""predict_blocks: fused Triton scoring (kernel.py) + torch selection (select.py)."""

from __future__ import annotations

import math

import torch

from ..runtime import cdiv, check_runnable, is_pow2, kernel_module, next_pow2
from .reference import block_scores_reference
from .select import check_keep, check_rule, select_blocks

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
METHODS = ("mean", "antidiag")


def check_inputs(q, k, block_q, block_k, method, stride) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(t, 'shape', type(t))}")
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q, k must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q, k must be on one device, got {q.device}, {k.device}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be (B, H, Nk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if not 1 <= q.shape[3] <= 256 or q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"need 1 <= D <= 256 and non-empty sequences, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not is_pow2(blk) or not 16 <= blk <= 256:
            raise ValueError(f"{name} must be a power of two in [16, 256], got {blk!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "antidiag" and (not is_pow2(stride) or stride > min(block_q, block_k)):
        raise ValueError(f"stride must be a power of two <= min(block_q, block_k), got {stride!r}")


def _tile(rows: int, total: int, cap: int) -> int:
    """Tile width: whole rows-per-block groups, at least 16 (tl.dot), at most `cap` unless one block is wider,
    no wider than the problem needs."""
    return max(16, rows, min(cap, next_pow2(total)))


# Launch configs, checked with ptxas for sm_90 at D = 40..256 (no register spills; `bench_kernels --compile-only`).
def mean_config(qb: int, block_d: int) -> dict:
    """Mean scores: many query blocks per program (each program pools all of K once), 16 key blocks per step (a
    fp32 FMA dot: registers, not tensor cores, bound the tile)."""
    tile_q = _tile(1, qb, 128 if block_d <= 128 else 64)
    return dict(TILE_QB=tile_q, TILE_KB=16, num_warps=8 if tile_q >= 64 else 4, num_stages=1)


def antidiag_config(rows_q: int, rows_k: int, n_a: int, n_c: int, block_d: int) -> dict:
    """Antidiagonal scores: up to 64 x 64 strided sub-rows per step, 8 warps."""
    return dict(TILE_A=_tile(rows_q, n_a, 64), TILE_C=_tile(rows_k, n_c, 64), num_warps=8,
                num_stages=2 if block_d <= 128 else 1)


def block_scores(q, k, block_q: int, block_k: int, method: str = "mean", stride: int = 8, scale=None) -> torch.Tensor:
    """(B, H, QB, KB) fp32 block-importance scores from the fused Triton kernel; rows are distributions over key
    blocks. Same definition as block_scores_reference."""
    check_inputs(q, k, block_q, block_k, method, stride)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    qb, kb = cdiv(nq, block_q), cdiv(nk, block_k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mod = kernel_module("fastdiff.kernels.block_select.kernel")
    check_runnable(mod._mean_scores_kernel, q, k)
    out = torch.empty(b, h, qb, kb, dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(d))
    strides = (*q.stride(), *k.stride(), *out.stride())
    if method == "mean":
        config = mean_config(qb, block_d)
        mod._mean_scores_kernel[(cdiv(qb, config["TILE_QB"]), b * h)](
            q, k, out, *strides, h, nq, nk, qb, kb, scale * mod.LOG2E,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_K=block_k, **config,
        )
        return out
    rows_q, rows_k, n_a = block_q // stride, block_k // stride, cdiv(nq, stride)
    config = antidiag_config(rows_q, rows_k, n_a, cdiv(nk, stride), block_d)
    mod._antidiag_scores_kernel[(cdiv(n_a, config["TILE_A"]), b * h)](
        q, k, out, *strides, h, nq, nk, qb, kb, scale / stride * mod.LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, STRIDE=stride, ROWS_Q=rows_q, ROWS_K=rows_k,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32 accuracy on tensor cores
        **config,
    )
    return out


def _predict(scores_fn, q, k, block_q, block_k, method, stride, top_k, top_p, keep, scale):
    check_inputs(q, k, block_q, block_k, method, stride)
    check_rule(top_k, top_p)
    check_keep(keep, q.shape[0], q.shape[1], cdiv(q.shape[2], block_q), cdiv(k.shape[2], block_k), q.device)
    scores = scores_fn(q, k, block_q, block_k, method, stride, scale)
    return select_blocks(scores, top_k=top_k, top_p=top_p, keep=keep)


def predict_blocks(q, k, block_q: int = 64, block_k: int = 64, *, method: str = "mean", stride: int = 8, top_k=None,
                   top_p=None, keep=None, scale=None):
    """Predict a block-sparse layout for block_sparse_attention from q and k.

    Args:
        q: (B, H, Nq, D), k: (B, H, Nk, D), fp16/bf16/fp32 (CUDA, or any device under TRITON_INTERPRET=1).
        block_q, block_k: the attention kernel's tile sizes (powers of two in [16, 256]).
        method: "mean" (pooled q/k blocks) or "antidiag" (XAttention antidiagonal scoring with `stride`, a power of
            two <= min(block_q, block_k); cost about 1/stride of dense attention's).
        top_k: keep this many key blocks per query block; top_p: keep the fewest whose score mass >= top_p. Exactly one.
        keep: optional bool (1|B, 1|H, QB, KB): blocks always selected (diagonal, text), counted toward top_k/top_p.
        scale: logit scale, default 1/sqrt(D).

    Returns (kv_index int32 (B, H, QB, K), kv_count int32 (B, H, QB), density fp32 (B, H)); K = top_k when top_k is
    given without keep, else KB. kv_index is ascending, valid entries first, padded with the last valid id.
    """
    return _predict(block_scores, q, k, block_q, block_k, method, stride, top_k, top_p, keep, scale)


def predict_blocks_reference(q, k, block_q: int = 64, block_k: int = 64, *, method: str = "mean", stride: int = 8,
                             top_k=None, top_p=None, keep=None, scale=None):
    """predict_blocks with the pure-torch scores (any device, no triton): the CPU path."""
    return _predict(block_scores_reference, q, k, block_q, block_k, method, stride, top_k, top_p, keep, scale)
