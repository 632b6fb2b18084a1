"""Launcher of the block-sparse FlashAttention kernel: validation, broadcasting of shared patterns by strides,
launch configuration."""

from __future__ import annotations

import math

import torch

from ..runtime import cdiv, check_runnable, is_pow2, kernel_module, next_pow2

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_BLOCK = 256


def _launch_configs(block_q: int, block_k: int, block_d: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """(num_warps, num_stages) to try in order. Chosen with ptxas for sm_90 (no register spills at D = 64/128/256,
    blocks 16..128): 4 warps hold a 64-row tile, 128-row tiles or D >= 256 need 8; fp32 (3xTF32 MMA, wider operands)
    needs 8. Fewer stages follow for GPUs with less shared memory than Hopper (consumer cards: ~100 KB a block)."""
    if dtype == torch.float32:
        num_warps, num_stages = 8, 2
    else:
        num_warps = 8 if block_q >= 128 or block_q * block_d > 64 * 128 else 4
        num_stages = 3 if block_k * block_d <= 64 * 128 else 2
    return [(num_warps, stages) for stages in range(num_stages, 0, -1)]


# (block_q, block_k, block_d, dtype, device) -> the first config that fit this GPU's shared memory; a memo of a pure
# function of the hardware, like triton's own compile cache, never per-run state
_FITTED: dict = {}


def _check_blocks(block_q, block_k) -> None:
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not is_pow2(blk) or not 16 <= blk <= MAX_BLOCK:
            raise ValueError(f"{name} must be a power of two in [16, {MAX_BLOCK}], got {blk!r}")


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(t, 'shape', type(t))}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: Nq={q.shape[2]}, Nk={k.shape[2]}")


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_layout(kv_index, kv_count, b: int, h: int, qb: int, device) -> None:
    if not isinstance(kv_index, torch.Tensor) or kv_index.dtype != torch.int32 or kv_index.dim() != 4:
        raise ValueError(f"kv_index must be an int32 tensor (Bi, Hi, QB, K), got {_describe(kv_index)}")
    if not isinstance(kv_count, torch.Tensor) or kv_count.dtype != torch.int32 or kv_count.dim() != 3:
        raise ValueError(f"kv_count must be an int32 tensor (Bi, Hi, QB), got {_describe(kv_count)}")
    if kv_index.shape[:3] != kv_count.shape:
        raise ValueError(f"kv_index {tuple(kv_index.shape)} and kv_count {tuple(kv_count.shape)} disagree on (Bi, Hi, QB)")
    bi, hi, qbi, _ = kv_index.shape
    if bi not in (1, b) or hi not in (1, h):
        raise ValueError(f"layout batch/head dims must be 1 or ({b}, {h}), got ({bi}, {hi})")
    if qbi != qb:
        raise ValueError(f"layout has {qbi} query blocks, q needs ceil(Nq / block_q) = {qb}")
    if kv_index.device != device or kv_count.device != device:
        raise ValueError(f"kv_index/kv_count must be on {device}, got {kv_index.device}, {kv_count.device}")


def block_sparse_attention(q, k, v, kv_index, kv_count, block_q: int = 64, block_k: int = 64, scale=None):
    """Block-sparse attention forward: softmax(q k^T * scale) v restricted, per query block, to the key blocks listed.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one dtype among fp16/bf16/fp32, D <= 256. Any strides (a head-dim
            stride other than 1 is made contiguous first: it would defeat vector loads).
        kv_index: int32 (Bi, Hi, QB, K), QB = ceil(Nq / block_q): key-block ids per query block, the first
            kv_count entries valid and ascending, all entries in [0, ceil(Nk / block_k)). Bi in {1, B}, Hi in {1, H}:
            a shared pattern is read with stride 0, never copied.
        kv_count: int32 (Bi, Hi, QB): valid entries per query block; 0 gives zero output rows.
        block_q, block_k: tile sizes, powers of two in [16, 256].
        scale: softmax scale, default 1/sqrt(D).

    Returns (B, H, Nq, D) in q's dtype, with q's memory layout when q's head dim is contiguous (a (B, N, H, D)
    tensor seen as (B, H, N, D) gives its output back in that layout, no copy).
    """
    _check_qkv(q, k, v)
    _check_blocks(block_q, block_k)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    qb = cdiv(nq, block_q)
    _check_layout(kv_index, kv_count, b, h, qb, q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    mod = kernel_module("fastdiff.kernels.block_sparse_attention.kernel")
    check_runnable(mod._block_sparse_attn_fwd, q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    index = kv_index.expand(b, h, *kv_index.shape[2:])  # stride 0 on shared dims
    count = kv_count.expand(b, h, qb)

    block_d = max(16, next_pow2(d))
    key = (block_q, block_k, block_d, q.dtype, q.device)
    configs = _FITTED.get(key) or _launch_configs(block_q, block_k, block_d, q.dtype)
    for num_warps, num_stages in configs:
        try:
            mod._block_sparse_attn_fwd[(qb, b * h)](
                q, k, v, out, index, count,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *index.stride(), *count.stride(),
                h, nq, nk, scale * mod.LOG2E,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_q, BLOCK_N=block_k,
                EVEN_M=nq % block_q == 0, EVEN_N=nk % block_k == 0, EVEN_D=d == block_d,
                # fp32 would default to TF32 (~1e-3 error); 3xTF32 keeps fp32 accuracy on tensor cores, where a
                # plain fp32 FMA product spills registers
                DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
                num_warps=num_warps, num_stages=num_stages,
            )
        except mod.OutOfResources:  # raised before launch when shared memory does not fit: try fewer stages
            if (num_warps, num_stages) == configs[-1]:
                raise
            continue
        _FITTED[key] = [(num_warps, num_stages)]
        break
    return out
