"""Fused block-importance scoring in Triton: pooling, pooled logits and the softmax over key blocks in one kernel
per method (see reference.py for the definitions). Both run two passes over the keys: the first finds each row's max
and normaliser (online softmax), the second turns logits into probabilities.

- mean: one program per (tile of query blocks, batch x head). It mean-pools its query blocks once, then pools each
  key-block tile on the fly; pass 1 stores the raw logits in the output, pass 2 reads them back and normalises, so
  keys are pooled once per program. Keys are re-read once per query tile: (QB / TILE_QB) reads of K per head, the
  price of having no pooled-K buffer between kernels.
- antidiag: one program per (tile of strided query sub-rows, batch x head). The strided logits are
  sum_j q_j . k_j over the stride offsets j, i.e. `stride` tl.dot calls of (rows, D) x (D, cols); the strided matrix
  is (N/stride)^2 per head, too large to store, so pass 2 recomputes it (cost 2 x 2 N^2 D / stride FLOPs, a
  1/stride share of dense attention's) and sums the probabilities per (query block, key block) tile."""

import triton
import triton.language as tl

from .. import tl_std

# finite start for running maxima: exp2(m - m) stays 1 for rows whose first tile is all padding
M_INIT = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634  # read by the launcher: logits are kept in log2 units for exp2


@triton.jit
def _pool_rows(base, blocks, n, stride_n, stride_d, offs_d, mask_d, BLOCK: tl.constexpr, TILE: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Mean over the valid rows of each listed block: (TILE, BLOCK_D) fp32. Row offsets in int64: N * row stride
    overflows int32 for long videos."""
    acc = tl.full([TILE, BLOCK_D], 0.0, dtype=tl.float32)
    for r in range(BLOCK):
        rows = blocks * BLOCK + r
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=(rows < n)[:, None] & mask_d[None, :], other=0.0)
        acc += x.to(tl.float32)
    counts = tl.minimum(tl.maximum(n - blocks * BLOCK, 1), BLOCK)
    return acc / counts[:, None].to(tl.float32)


@triton.jit
def _mean_scores_kernel(
    Q, K, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_oq, stride_ok,
    H, N_Q, N_K, NUM_QB, NUM_KB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_QB: tl.constexpr, TILE_KB: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qbs = pid * TILE_QB + tl.arange(0, TILE_QB)
    mask_q = qbs < NUM_QB
    k_base = K + b * stride_kb + h * stride_kh
    out_base = OUT + b * stride_ob + h * stride_oh + qbs[:, None] * stride_oq

    q_mean = _pool_rows(Q + b * stride_qb + h * stride_qh, qbs, N_Q, stride_qn, stride_qd, offs_d, mask_d,
                        BLOCK_Q, TILE_QB, BLOCK_D)
    m_i = tl.full([TILE_QB], M_INIT, dtype=tl.float32)
    l_i = tl.full([TILE_QB], 0.0, dtype=tl.float32)
    for kt in range(0, NUM_KB, TILE_KB):
        kbs = kt + tl.arange(0, TILE_KB)
        k_mean = _pool_rows(k_base, kbs, N_K, stride_kn, stride_kd, offs_d, mask_d, BLOCK_K, TILE_KB, BLOCK_D)
        # pooled logits decide a discrete selection: full fp32 products, not TF32 (the tile is tiny anyway)
        s = tl.dot(q_mean, tl.trans(k_mean), input_precision="ieee") * qk_scale
        s = tl.where((kbs < NUM_KB)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl_std.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl_std.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
        tl.store(out_base + kbs[None, :] * stride_ok, s, mask=mask_q[:, None] & (kbs < NUM_KB)[None, :])
    # pass 2 reads logits other threads of this program stored: a CTA barrier orders those global writes
    tl.debug_barrier()
    for kt in range(0, NUM_KB, TILE_KB):
        kbs = kt + tl.arange(0, TILE_KB)
        mask = mask_q[:, None] & (kbs < NUM_KB)[None, :]
        s = tl.load(out_base + kbs[None, :] * stride_ok, mask=mask, other=float("-inf"))
        tl.store(out_base + kbs[None, :] * stride_ok, tl.math.exp2(s - m_i[:, None]) / l_i[:, None], mask=mask)


@triton.jit
def _antidiag_logits(q_base, k_base, a, c, N_Q, N_K, stride_qn, stride_qd, stride_kn, stride_kd, offs_d, mask_d,
                     STRIDE: tl.constexpr, TILE_A: tl.constexpr, TILE_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Unscaled strided logits (TILE_A, TILE_C): query sub-row a against key sub-row c along the cell antidiagonal,
    sum_j q[a*STRIDE + STRIDE-1-j] . k[c*STRIDE + j]; rows past N load zeros."""
    s = tl.full([TILE_A, TILE_C], 0.0, dtype=tl.float32)
    for j in range(STRIDE):
        rq = a * STRIDE + (STRIDE - 1 - j)
        rk = c * STRIDE + j
        qj = tl.load(q_base + rq.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                     mask=(rq < N_Q)[:, None] & mask_d[None, :], other=0.0)
        kj = tl.load(k_base + rk.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(rk < N_K)[None, :] & mask_d[:, None], other=0.0)
        s = tl.dot(qj, kj, s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _antidiag_scores_kernel(
    Q, K, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_oq, stride_ok,
    H, N_Q, N_K, NUM_QB, NUM_KB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE: tl.constexpr, ROWS_Q: tl.constexpr, ROWS_K: tl.constexpr,
    TILE_A: tl.constexpr, TILE_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    n_a = (N_Q + STRIDE - 1) // STRIDE
    n_c = (N_K + STRIDE - 1) // STRIDE
    a = pid * TILE_A + tl.arange(0, TILE_A)

    m_i = tl.full([TILE_A], M_INIT, dtype=tl.float32)
    l_i = tl.full([TILE_A], 0.0, dtype=tl.float32)
    for c0 in range(0, n_c, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        s = _antidiag_logits(q_base, k_base, a, c, N_Q, N_K, stride_qn, stride_qd, stride_kn, stride_kd, offs_d,
                             mask_d, STRIDE, TILE_A, TILE_C, DOT_PRECISION) * qk_scale
        s = tl.where((c < n_c)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl_std.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl_std.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    # sub-rows past Nq weigh nothing; each query block averages its valid sub-rows
    inv_l = tl.where(a < n_a, 1.0 / l_i, 0.0)
    QBS: tl.constexpr = TILE_A // ROWS_Q
    KBS: tl.constexpr = TILE_C // ROWS_K
    qbs = pid * QBS + tl.arange(0, QBS)
    n_valid = tl.minimum(tl.maximum(n_a - qbs * ROWS_Q, 1), ROWS_Q).to(tl.float32)
    out_base = OUT + b * stride_ob + h * stride_oh + qbs[:, None] * stride_oq
    for c0 in range(0, n_c, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        s = _antidiag_logits(q_base, k_base, a, c, N_Q, N_K, stride_qn, stride_qd, stride_kn, stride_kd, offs_d,
                             mask_d, STRIDE, TILE_A, TILE_C, DOT_PRECISION) * qk_scale
        s = tl.where((c < n_c)[None, :], s, float("-inf"))
        p = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
        # (sub-rows, sub-cols) -> (query blocks, key blocks): sum each ROWS_Q x ROWS_K cell
        cell = tl_std.sum(tl_std.sum(tl.reshape(p, (QBS, ROWS_Q, KBS, ROWS_K)), 3), 1)
        kbs = c0 // ROWS_K + tl.arange(0, KBS)
        tl.store(out_base + kbs[None, :] * stride_ok, cell / n_valid[:, None],
                 mask=(qbs < NUM_QB)[:, None] & (kbs < NUM_KB)[None, :])
