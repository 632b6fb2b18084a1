"""Block selection from importance scores, vectorised in torch (sort/topk/cumsum). It runs once per predicted
pattern over a (B, H, QB, KB) tensor that is tiny next to attention, so a Triton kernel would buy nothing here."""

from __future__ import annotations

import torch


def check_rule(top_k, top_p) -> None:
    if (top_k is None) == (top_p is None):
        raise ValueError(f"give exactly one of top_k and top_p, got top_k={top_k!r}, top_p={top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_keep(keep, b: int, h: int, qb: int, kb: int, device) -> None:
    if keep is None:
        return
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
        raise ValueError(f"keep must be a bool tensor (1|B, 1|H, QB, KB), got {getattr(keep, 'dtype', type(keep))}")
    if keep.shape[0] not in (1, b) or keep.shape[1] not in (1, h) or tuple(keep.shape[2:]) != (qb, kb):
        raise ValueError(f"keep must be (1|{b}, 1|{h}, {qb}, {kb}), got {tuple(keep.shape)}")
    if keep.device != torch.device(device):
        raise ValueError(f"keep must be on {device}, got {keep.device}")


def select_blocks(scores: torch.Tensor, top_k=None, top_p=None, keep=None):
    """scores (B, H, QB, KB), rows distributions over key blocks -> (kv_index, kv_count, density).

    Per query block: the kept blocks (always, counting toward top_k and toward the mass), then the others by
    descending score until top_k blocks are taken or the taken mass reaches top_p. kv_index is ascending with valid
    entries first and padded with the last valid id; its last dim is top_k when keep is None, else KB (a tighter
    bound would need a host sync). density (B, H) fp32 = selected / all blocks."""
    check_rule(top_k, top_p)
    b, h, qb, kb = scores.shape
    check_keep(keep, b, h, qb, kb, scores.device)
    scores = scores.float()
    if keep is None and top_k is not None:
        width = min(top_k, kb)
        chosen = scores.topk(width, dim=-1).indices
        count = torch.full((b, h, qb), width, dtype=torch.int32, device=scores.device)
    else:
        keep_b = torch.zeros_like(scores, dtype=torch.bool) if keep is None else keep.expand(b, h, qb, kb)
        # scores are <= 1, so +2 puts every kept block ahead of every other one in the descending order
        order = (scores + 2.0 * keep_b).argsort(-1, descending=True)
        n_keep = keep_b.sum(-1)
        if top_k is not None:
            n = n_keep.clamp(min=top_k)
        else:
            mass = scores.gather(-1, order)
            before = mass.cumsum(-1) - mass  # mass taken before each position
            n = torch.maximum((before < top_p).sum(-1), n_keep)
        count = n.clamp(max=kb).to(torch.int32)
        chosen = torch.where(torch.arange(kb, device=scores.device) < count.unsqueeze(-1), order, kb)
    index = chosen.sort(-1).values
    last = index.gather(-1, (count.long() - 1).clamp(min=0).unsqueeze(-1))
    index = torch.where(index == kb, last, index).to(torch.int32)
    density = count.sum(-1, dtype=torch.float32) / (qb * kb)
    return index.contiguous(), count, density
