"""Block layouts of the block-sparse kernel: per query block, the ascending list of key blocks it attends
(kv_index, padded with a valid id) and how many of them are valid (kv_count). Shared patterns keep size-1 batch and
head dims; the launcher broadcasts them with stride 0 instead of copying per (batch, head)."""

from __future__ import annotations

import torch

from ..runtime import cdiv


def num_blocks(n: int, block: int) -> int:
    """Blocks covering n tokens (the last one may be partial)."""
    return cdiv(n, block)


def dense_index(qb: int, kb: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key block for every query block: kv_index (1, 1, qb, kb), kv_count (1, 1, qb), int32. The dense path is
    the sparse kernel run on this layout."""
    index = torch.arange(kb, dtype=torch.int32, device=device).expand(1, 1, qb, kb)
    count = torch.full((1, 1, qb), kb, dtype=torch.int32, device=device)
    return index, count


def mask_to_index(block_mask: torch.Tensor, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean block mask (..., QB, KB) -> kv_index (..., QB, K) ascending with valid entries first, padded with the
    last valid id (0 for an empty row), and kv_count (..., QB) int32. K is KB, or the largest count with trim=True
    (one host sync: fine for a pattern computed once and reused)."""
    if block_mask.dtype != torch.bool or block_mask.dim() < 2:
        raise ValueError(f"block_mask must be a bool tensor (..., QB, KB), got {block_mask.dtype} {tuple(block_mask.shape)}")
    kb = block_mask.shape[-1]
    count = block_mask.sum(-1, dtype=torch.int32)
    ids = torch.arange(kb, device=block_mask.device, dtype=torch.int32)
    # unselected blocks sort after the selected ones (key kb), selected stay ascending
    index = torch.where(block_mask, ids, kb).sort(-1).values
    if trim:
        index = index[..., : max(1, int(count.max()))] if count.numel() else index
    last = (count.long() - 1).clamp(min=0).clamp(max=index.shape[-1] - 1).unsqueeze(-1)
    pad = index.gather(-1, last).masked_fill(count.unsqueeze(-1) == 0, 0)
    index = torch.where(index == kb, pad, index)
    return index.to(torch.int32).contiguous(), count


def index_to_mask(kv_index: torch.Tensor, kv_count: torch.Tensor, kb: int) -> torch.Tensor:
    """kv_index (..., QB, K), kv_count (..., QB) -> boolean block mask (..., QB, kb): only the first kv_count
    entries count."""
    k = kv_index.shape[-1]
    valid = torch.arange(k, device=kv_index.device) < kv_count.unsqueeze(-1).long()
    mask = torch.zeros(*kv_index.shape[:-1], kb + 1, dtype=torch.bool, device=kv_index.device)
    # invalid entries land in the spare column kb, dropped below
    mask.scatter_(-1, torch.where(valid, kv_index.long(), kb), True)
    return mask[..., :kb]


def token_mask(kv_index: torch.Tensor, kv_count: torch.Tensor, nq: int, nk: int, block_q: int, block_k: int) -> torch.Tensor:
    """The token-level boolean mask (..., nq, nk) a block layout stands for (tests and the reference)."""
    blocks = index_to_mask(kv_index, kv_count, num_blocks(nk, block_k))
    return blocks.repeat_interleave(block_q, -2)[..., :nq, :].repeat_interleave(block_k, -1)[..., :nk]
