"""Pure-torch block-sparse attention: the dense token mask built from the block lists, masked softmax in fp32.
Slow and memory-hungry (Nq x Nk scores) by design: it is the ground truth of the tests and the CPU fallback."""

from __future__ import annotations

import math

import torch

from .layout import token_mask


def block_sparse_attention_reference(q, k, v, kv_index, kv_count, block_q: int, block_k: int, scale=None):
    """q (B, H, Nq, D), k/v (B, H, Nk, D); kv_index (1|B, 1|H, QB, K) int, kv_count (1|B, 1|H, QB) int.
    Returns (B, H, Nq, D) in q's dtype; a query block with no key block gets zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = token_mask(kv_index, kv_count, q.shape[-2], k.shape[-2], block_q, block_k)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # rows without any key give NaN in softmax: they are defined as zero output
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)
