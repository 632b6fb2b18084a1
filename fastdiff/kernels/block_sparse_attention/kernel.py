"""Block-sparse FlashAttention forward in Triton.

One program per (query block, batch x head). It loads its query tile once, then walks only the key blocks listed for
it (kv_index[b, h, qb, :kv_count]) with the online softmax of FlashAttention: running row max m and row sum l in fp32,
the fp32 accumulator rescaled by exp2(m_old - m_new) whenever the max grows, one division at the end. The dense path
is the same kernel on the all-blocks list, so dense and sparse share every line that matters for speed.

Shapes that are not multiples of the tiles are handled by masked loads: query rows >= Nq are never stored, key
columns >= Nk get -inf scores, head-dim lanes >= D load zeros (D is padded to the next power of two >= 16, the
smallest tl.dot size). The EVEN_* flags drop those masks when the shapes divide, which is the fast path on GPU."""

import triton
import triton.language as tl
from triton import OutOfResources  # noqa: F401 - the launcher catches it without importing triton itself

from .. import tl_std

# exp2 is one instruction on GPU; scores are scaled by log2(e) once so that exp2(s - m) == exp(s' - m')
LOG2E = 1.4426950408889634  # read by the launcher
# finite start for the running max: a row whose first listed block is fully masked keeps exp2(m - m) == 1
# instead of NaN from (-inf) - (-inf), so a bad or padded list cannot poison the row
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, OUT, KV_INDEX, KV_COUNT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    # 64-bit scalar bases (B * H * N * D, and N * row stride for long videos, overflow int32); the per-tile
    # offsets added to them stay small int32 tensors
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_m = qb * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (start_m + offs_m) < N_Q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = (Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qn
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    # K is read transposed (BLOCK_D, BLOCK_N) so that tl.dot(q, k) is q @ k^T without a register transpose
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # shared patterns arrive with stride 0 on their broadcast batch/head dims: no per-(b, h) copy of the lists
    idx_ptr = KV_INDEX + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(KV_COUNT + b * stride_cb + h * stride_ch + qb * stride_cq)

    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    for i in range(0, count):
        start_n = tl.load(idx_ptr + i * stride_ik) * BLOCK_N
        k_tile = k_ptrs + start_n.to(tl.int64) * stride_kn
        v_tile = v_ptrs + start_n.to(tl.int64) * stride_vn
        if EVEN_N and EVEN_D:
            k = tl.load(k_tile)
            v = tl.load(v_tile)
        else:
            mask_n = (start_n + offs_n) < N_K
            k = tl.load(k_tile, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            v = tl.load(v_tile, mask=mask_n[:, None] & mask_d[None, :], other=0.0)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(((start_n + offs_n) < N_K)[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl_std.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl_std.sum(p, 1)
        # P is cast to V's dtype for the second MMA (fp16/bf16 tensor cores), accumulation stays fp32
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # a query block with no listed key block (count 0) has l == 0: its output is defined as zeros
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]

    o_ptrs = (OUT + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_on
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
