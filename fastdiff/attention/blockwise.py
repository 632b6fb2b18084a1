"""Block-sparse attention in plain torch: the semantics every backend must match, and a CPU path that really
skips work.

- `gathered`: for each query block, only its listed key blocks are gathered and attended with SDPA. Query blocks
  are bucketed by how many key blocks they list, so a few dense rows (text blocks attend everything) do not make
  every row pay for the longest list. Work is about density × dense, plus the gather.
- `flex_block_mask`: the same lists as a FlexAttention BlockMask.

Converting between lists and masks is the kernels' layout code (`fastdiff.kernels.block_sparse_attention.layout`),
which dispatch re-exports: one definition of the format for every backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Gathered keys+values per chunk of query blocks: bounds the extra memory of the gather path.
CHUNK_BYTES = 256 * 2**20


def expand_lists(kv_index: torch.Tensor, kv_count: torch.Tensor, b: int, h: int):
    """Broadcast (1|B, 1|H, Q, K) lists to (B, H, Q, K) views (no copy)."""
    return kv_index.expand(b, h, *kv_index.shape[2:]), kv_count.expand(b, h, kv_count.shape[-1])


def gathered(q, k, v, kv_index, kv_count, block: int, scale: float | None = None,
             key_mask: torch.Tensor | None = None, sdpa=F.scaled_dot_product_attention) -> torch.Tensor:
    """Block-sparse attention by gathering each query block's key blocks. q: (B, H, Nq, D); k, v: (B, H, Nk, D);
    key_mask: optional (B, Nk) bool, False keys are never attended. Query blocks with no key block give 0."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    qb, kb = math.ceil(nq / block), math.ceil(nk / block)
    index, count = expand_lists(kv_index, kv_count, b, h)
    index, count = index.reshape(b * h * qb, -1).long(), count.reshape(-1)
    qf = F.pad(q, (0, 0, 0, qb * block - nq)).reshape(b * h * qb, block, d)
    kf = F.pad(k, (0, 0, 0, kb * block - nk)).reshape(b * h * kb, block, d)
    vf = F.pad(v, (0, 0, 0, kb * block - nk)).reshape(b * h * kb, block, dv)
    tok_ok = torch.ones(b, kb * block, dtype=torch.bool, device=q.device)
    tok_ok[:, nk:] = False
    if key_mask is not None:
        tok_ok[:, :nk] &= key_mask.to(torch.bool).expand(b, nk)
    tok_ok = tok_ok.reshape(b, kb, block)
    row_bh = torch.arange(b * h * qb, device=q.device) // qb  # (b, h) of every query block row
    row_b = row_bh // h
    out = q.new_zeros(b * h * qb, block, dv)
    counts = count.tolist()
    # buckets by list length rounded up to an eighth of the longest list: at most 8 widths (few SDPA calls) and
    # at most 1/8 of the longest list padded per row (rounding up to a power of two pads up to half of a list)
    grain = max(1, math.ceil(max(counts, default=0) / 8))
    buckets: dict[int, list[int]] = {}
    for row, c in enumerate(counts):
        if c:
            buckets.setdefault(math.ceil(c / grain) * grain, []).append(row)
    per_row = block * block * (d + dv) * q.element_size()  # gathered bytes per listed key block
    for width, rows in buckets.items():
        width = min(width, index.shape[1])
        step = max(1, CHUNK_BYTES // (per_row * width))
        for s in range(0, len(rows), step):
            r = torch.tensor(rows[s: s + step], device=q.device)
            ids = index[r, :width]  # (R, width) key blocks
            listed = torch.arange(width, device=q.device) < count[r].unsqueeze(-1)
            # index_select of flat rows: the same copies as advanced indexing, several times cheaper on CPU
            flat = (row_bh[r].unsqueeze(-1) * kb + ids).flatten()
            kg = kf.index_select(0, flat).reshape(len(r), width * block, d)
            vg = vf.index_select(0, flat).reshape(len(r), width * block, dv)
            ok = tok_ok[row_b[r].unsqueeze(-1), ids] & listed.unsqueeze(-1)  # (R, width, block)
            mask = ok.reshape(len(r), 1, width * block)
            o = sdpa(qf.index_select(0, r), kg, vg, attn_mask=mask, scale=scale)
            # a query row whose every listed key is masked out gives NaN in SDPA: it attends nothing, so 0
            out.index_copy_(0, r, torch.where(mask.any(-1, keepdim=True), o, o.new_zeros(())))
    return out.reshape(b, h, qb * block, dv)[:, :, :nq]


def flex_block_mask(kv_index, kv_count, allowed, b: int, h: int, nq: int, nk: int, block: int,
                    key_mask: torch.Tensor | None = None):
    """The lists as a FlexAttention BlockMask; `allowed` is the same lists as a (B, H, Q, KB) block mask. Its
    mask_mod says the same as the lists (flex's eager path computes from mask_mod alone; the compiled one skips the
    unlisted blocks) and drops the padded tail and masked keys."""
    from torch.nn.attention.flex_attention import BlockMask

    index, count = expand_lists(kv_index, kv_count, b, h)
    kb = math.ceil(nk / block)
    keys_ok = torch.ones(b, nk, dtype=torch.bool, device=index.device)
    if key_mask is not None:
        keys_ok &= key_mask.to(torch.bool).expand(b, nk)

    def mask_mod(bi, hi, qi, ki):
        inside = ki < nk
        kc = ki.clamp(max=nk - 1)
        return inside & allowed[bi, hi, qi // block, kc // block] & keys_ok[bi, kc]

    if index.shape[-1] < kb:  # flex wants a column per key block; the extra ones lie past the count
        index = F.pad(index, (0, kb - index.shape[-1]))
    return BlockMask.from_kv_blocks(count.contiguous(), index.contiguous(), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(nq, nk))
