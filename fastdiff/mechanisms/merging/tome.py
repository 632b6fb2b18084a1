"""ToMe-SD bipartite soft matching on a token grid, as pure functions.

`match(metric, grid, r, ...)` splits the tokens of a (B, N, C) tensor laid out on a (frames, h, w) grid into
destinations — one per sx×sy cell of each frame, the cell's first token or a seeded random one — and sources
(everything else, including the rows and columns an odd grid leaves outside the cells). Every source is paired
with its most similar destination (cosine of `metric`), and the `r` best-paired sources are merged into their
destinations. The result is a `Matching` of index tensors; `merge_pair(matching)` turns it into the pair

    merge(x):   (B, N, C)     -> (B, N - r, C)  kept sources, then destinations, each destination the mean of
                                                itself and the sources merged into it;
    unmerge(y): (B, N - r, C) -> (B, N, C)      every token takes its row of y, a merged source its destination's.

Each batch row is matched on its own (rows never mix); the destination cells are shared by the rows of a call.
The mean is computed as destination + Σ (source − destination) / size, so tokens that were already equal come
back bit-exact from merge → unmerge. Nothing here sorts or allocates per block: a Matching is computed once and
its merge/unmerge are two gathers and one scatter-add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Matching:
    """Which token goes where, per batch row.

    Args:
        n: tokens before merging.
        kept: (B, N - r) original index of the token each merged row stands for: the kept sources (ascending),
            then the destinations (grid order). A merged row's position (RoPE) is its destination's.
        slot: (B, N) row of the merged tensor that each original token goes to.
        src: (B, r) original indices of the merged sources; `src_slot` (B, r) their destinations' rows and
            `src_dst` (B, r) their destinations' original indices.
        sizes: (B, N - r) how many original tokens each merged row averages (proportional attention).
    """

    n: int
    kept: torch.Tensor
    slot: torch.Tensor
    src: torch.Tensor
    src_slot: torch.Tensor
    src_dst: torch.Tensor
    sizes: torch.Tensor

    @property
    def r(self) -> int:
        return self.n - self.kept.shape[1]


def destinations(grid: tuple[int, int, int], sx: int, sy: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices (ascending) of one destination per full sx×sy cell of every frame; empty when no cell fits.

    With a generator each cell's destination is drawn from it (on the CPU, so a seed gives the same choice on any
    device); without, it is the cell's top-left token.
    """
    f, h, w = grid
    hs, ws = h // sy, w // sx
    if hs == 0 or ws == 0:
        return torch.zeros(0, dtype=torch.long)
    if generator is None:
        pick = torch.zeros(f, hs, ws, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (f, hs, ws), generator=generator)
    rows = torch.arange(hs).view(1, hs, 1) * sy + pick // sx
    cols = torch.arange(ws).view(1, 1, ws) * sx + pick % sx
    frames = torch.arange(f).view(f, 1, 1) * (h * w)
    return (frames + rows * w + cols).flatten()


def max_merged(grid: tuple[int, int, int], sx: int, sy: int) -> int:
    """The most tokens a matching can merge on this grid: every source (non-destination) token."""
    f, h, w = grid
    return f * h * w - f * (h // sy) * (w // sx) if h >= sy and w >= sx else 0


def merged_count(grid: tuple[int, int, int], ratio: float, sx: int, sy: int) -> int:
    """r: tokens merged away at `ratio` on this grid (ratio × tokens, capped by the sources available)."""
    n = grid[0] * grid[1] * grid[2]
    return min(int(ratio * n), max_merged(grid, sx, sy))


@torch.no_grad()
def match(metric: torch.Tensor, grid: tuple[int, int, int], r: int, sx: int = 2, sy: int = 2,
          generator: torch.Generator | None = None, protect: torch.Tensor | None = None) -> Matching:
    """Bipartite soft matching of the (B, N, C) `metric` on `grid`, merging `r` tokens per row (see module doc).

    `protect` (B, N) bool: tokens that are merged as sources only after every unprotected source (token
    importance: e.g. the tokens that changed most since the previous step keep their own value)."""
    b, n, _ = metric.shape
    if grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"token grid {grid} holds {grid[0] * grid[1] * grid[2]} tokens, the tensor has {n}")
    device = metric.device
    dst = destinations(grid, sx, sy, generator).to(device)
    r = max(0, min(r, n - dst.numel() if dst.numel() else 0))
    if r == 0:
        ident = torch.arange(n, device=device).expand(b, n)
        empty = torch.zeros(b, 0, dtype=torch.long, device=device)
        return Matching(n, ident, ident, empty, empty, empty, torch.ones(b, n, device=device, dtype=metric.dtype))
    # sources: every other token, ascending (a stable sort of the destination mask; no host sync)
    is_dst = torch.zeros(n, dtype=torch.uint8, device=device).index_fill_(0, dst, 1)
    src_all = torch.argsort(is_dst, stable=True)[: n - dst.numel()]

    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # (B, sources, destinations); index_select: the same rows as unit[:, src_all], without advanced indexing's cost
    scores = unit.index_select(1, src_all) @ unit.index_select(1, dst).transpose(1, 2)
    best, best_dst = scores.max(dim=-1)
    if protect is not None:
        best = best.masked_fill(protect.index_select(1, src_all), float("-inf"))
    order = best.argsort(dim=-1, descending=True, stable=True)  # stable: ties break the same in any batch
    merged_pos, unm_pos = order[:, :r], order[:, r:]
    src = src_all[merged_pos]
    n_unm = unm_pos.shape[1]
    dst_pos = best_dst.gather(1, merged_pos)  # which destination each merged source joins
    kept = torch.cat([src_all[unm_pos].sort(dim=-1).values, dst.expand(b, -1)], dim=1)

    rows = torch.arange(n - r, device=device).expand(b, -1)
    slot = torch.empty(b, n, dtype=torch.long, device=device).scatter_(1, kept, rows)
    src_slot = n_unm + dst_pos
    slot.scatter_(1, src, src_slot)
    sizes = torch.ones(b, n - r, device=device, dtype=metric.dtype)
    sizes.scatter_add_(1, src_slot, torch.ones_like(src_slot, dtype=metric.dtype))
    return Matching(n, kept, slot, src, src_slot, dst[dst_pos], sizes)


def merge_pair(m: Matching) -> tuple[Fn, Fn]:
    """(merge, unmerge) of a matching; identity functions when it merges nothing."""
    if m.r == 0:
        return _identity, _identity

    # Rows are moved by index_select / index_add_ on the (B * N, C) view with indices offset per batch row: the same
    # copies and the same additions in the same order as gather / scatter_add_ along dim 1, without their
    # per-element index walk (several times faster on CPU).
    b, n, kept_n = m.kept.shape[0], m.n, m.kept.shape[1]
    kept, src, src_dst = (_flat(i, n) for i in (m.kept, m.src, m.src_dst))
    src_slot, slot = _flat(m.src_slot, kept_n), _flat(m.slot, kept_n)
    share = m.sizes.gather(1, m.src_slot).reshape(-1, 1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        rows = _rows(x, b, n)
        out = rows.index_select(0, kept)
        # mean = destination + Σ (source − destination) / size: exact when the merged tokens were already equal
        delta = rows.index_select(0, src) - rows.index_select(0, src_dst)
        return out.index_add_(0, src_slot, delta / share.to(x.dtype)).view(b, kept_n, c)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return _rows(y, b, kept_n).index_select(0, slot).view(b, n, y.shape[-1])

    return merge, unmerge


def _flat(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) indices into (B, n, C) as indices into its (B * n, C) view."""
    return (index + torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n).flatten()


def _rows(x: torch.Tensor, b: int, n: int) -> torch.Tensor:
    if x.ndim != 3 or x.shape[0] != b or x.shape[1] != n:
        raise ValueError(f"token merging: a matching of {b} row(s) x {n} tokens got a tensor of shape {tuple(x.shape)}")
    return x.reshape(b * n, x.shape[-1])


def bipartite_soft_matching(metric: torch.Tensor, grid: tuple[int, int, int], r: int, sx: int = 2, sy: int = 2,
                            generator: torch.Generator | None = None) -> tuple[Fn, Fn]:
    """ToMe-SD's pair: `merge_pair(match(...))`."""
    return merge_pair(match(metric, grid, r, sx, sy, generator))


def proportional_bias(m: Matching) -> torch.Tensor:
    """(B, 1, N - r) log sizes: added to the attention logits, a merged key counts as the tokens it stands for."""
    return m.sizes.log().unsqueeze(1)


def _expand(index: torch.Tensor, c: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, c)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
