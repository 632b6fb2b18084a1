"""Pure-torch block-importance scores and a loop-by-loop block selection: the ground truth of the tests and the CPU
path of predict_blocks.

Scores are, per (batch, head, query block), a distribution over key blocks (rows sum to 1):
- "mean": softmax over key blocks of scale * mean(q block) . mean(k block); partial last blocks average their valid
  rows only.
- "antidiag" (XAttention): split the attention matrix into stride x stride cells and keep one antidiagonal of each.
  Query sub-row a and key sub-row c of the strided matrix meet in the logit
      scale / stride * sum_j q[a*stride + stride-1-j] . k[c*stride + j]
  (rows past N are zeros), a softmax over c gives each query sub-row an estimate of its attention distribution that
  samples every row and column of the cell; its probabilities summed over a block and averaged over the query block's
  valid sub-rows give the block's share of attention mass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime import cdiv


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, n - x.shape[-2]))


def _mean_scores(q, k, block_q, block_k, scale):
    nq, nk = q.shape[-2], k.shape[-2]
    qb, kb = cdiv(nq, block_q), cdiv(nk, block_k)

    def pooled(x, n, nb, block):
        sums = _pad_rows(x.float(), nb * block).unflatten(-2, (nb, block)).sum(-2)
        counts = (n - torch.arange(nb, device=x.device) * block).clamp(max=block)
        return sums / counts[:, None]

    logits = pooled(q, nq, qb, block_q) @ pooled(k, nk, kb, block_k).transpose(-1, -2) * scale
    return logits.softmax(-1)


def _antidiag_scores(q, k, block_q, block_k, stride, scale):
    nq, nk = q.shape[-2], k.shape[-2]
    qb, kb = cdiv(nq, block_q), cdiv(nk, block_k)
    qp, kp = _pad_rows(q.float(), qb * block_q), _pad_rows(k.float(), kb * block_k)
    # sub-row a of q_s holds rows a*s + s-1, a*s + s-2, ..., a*s; sub-row c of k_s rows c*s, ..., c*s + s-1
    q_s = torch.cat([qp[..., stride - 1 - j:: stride, :] for j in range(stride)], -1)
    k_s = torch.cat([kp[..., j::stride, :] for j in range(stride)], -1)
    logits = q_s @ k_s.transpose(-1, -2) * (scale / stride)
    n_a, n_c = cdiv(nq, stride), cdiv(nk, stride)
    logits[..., n_c:] = float("-inf")
    probs = logits.softmax(-1)
    probs[..., n_a:, :] = 0.0
    rows_q, rows_k = block_q // stride, block_k // stride
    sums = probs.unflatten(-1, (kb, rows_k)).sum(-1).unflatten(-2, (qb, rows_q)).sum(-2)
    valid = (n_a - torch.arange(qb, device=q.device) * rows_q).clamp(max=rows_q)
    return sums / valid[:, None]


def block_scores_reference(q, k, block_q: int, block_k: int, method: str = "mean", stride: int = 8, scale=None):
    """(B, H, QB, KB) fp32 block-importance scores, each query block's row a distribution over key blocks."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if method == "mean":
        return _mean_scores(q, k, block_q, block_k, scale)
    if method == "antidiag":
        return _antidiag_scores(q, k, block_q, block_k, stride, scale)
    raise ValueError(f"method must be 'mean' or 'antidiag', got {method!r}")


def select_blocks_reference(scores, top_k=None, top_p=None, keep=None):
    """The selection rule spelled out one query block at a time (slow; tests only). Kept blocks come first and count
    toward top_k and toward the mass; then blocks by descending score until top_k blocks or mass >= top_p.
    Returns (kv_index (B, H, QB, KB) int32, kv_count (B, H, QB) int32, density (B, H) fp32)."""
    b, h, qb, kb = scores.shape
    keep = torch.zeros(1, 1, qb, kb, dtype=torch.bool) if keep is None else keep.cpu()
    keep = keep.expand(b, h, qb, kb)
    sc = scores.detach().float().cpu()
    index = torch.zeros(b, h, qb, kb, dtype=torch.int32)
    count = torch.zeros(b, h, qb, dtype=torch.int32)
    for i in range(b):
        for j in range(h):
            for r in range(qb):
                kept = [c for c in range(kb) if keep[i, j, r, c]]
                rest = sorted((c for c in range(kb) if not keep[i, j, r, c]), key=lambda c: -float(sc[i, j, r, c]))
                chosen, mass = list(kept), float(sc[i, j, r, kept].sum()) if kept else 0.0
                for c in rest:
                    if (top_k is not None and len(chosen) >= top_k) or (top_p is not None and mass >= top_p):
                        break
                    chosen.append(c)
                    mass += float(sc[i, j, r, c])
                chosen.sort()
                index[i, j, r, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                index[i, j, r, len(chosen):] = chosen[-1] if chosen else 0
                count[i, j, r] = len(chosen)
    density = count.sum(-1).float() / (qb * kb)
    dev = scores.device
    return index.to(dev), count.to(dev), density.to(dev)
