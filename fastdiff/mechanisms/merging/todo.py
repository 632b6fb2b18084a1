"""ToDo-style token downsampling for keys and values, as pure functions.

Self-attention keeps every query and takes its keys/values from the image tokens average-pooled factor×factor
on each frame's (h, w) grid. The pooled grid is ceil-sized: on an odd grid the last row/column of cells holds
fewer tokens and is averaged over exactly those (no zero padding in the mean). Only reshapes and sums — no
sort, no scatter — so it costs about one pass over the tokens.

Because every key/value projection is linear (W·x + b), projecting the pooled tokens equals pooling the
projected keys and values: passing `pool(x)` as the attention's key/value input is exact K/V pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pooled_grid(grid: tuple[int, int, int], factor: int) -> tuple[int, int, int]:
    """(frames, ceil(h / factor), ceil(w / factor))."""
    f, h, w = grid
    return f, math.ceil(h / factor), math.ceil(w / factor)


def pool(x: torch.Tensor, grid: tuple[int, int, int], factor: int) -> torch.Tensor:
    """(B, f·h·w, C) tokens -> (B, f·h'·w', C): the mean of each factor×factor cell of each frame."""
    b, n, c = x.shape
    f, h, w = grid
    if f * h * w != n:
        raise ValueError(f"token grid {grid} holds {f * h * w} tokens, the tensor has {n}")
    _, hp, wp = pooled_grid(grid, factor)
    cells = x.view(b, f, h, w, c)
    if (hp * factor, wp * factor) != (h, w):  # odd grid: zero-pad to whole cells, divide by the real counts
        cells = F.pad(cells, (0, 0, 0, wp * factor - w, 0, hp * factor - h))
    sums = cells.view(b, f, hp, factor, wp, factor, c).sum(dim=(3, 5))
    return (sums / _counts(h, w, factor, x).unsqueeze(-1)).view(b, f * hp * wp, c)


def _counts(h: int, w: int, factor: int, like: torch.Tensor) -> torch.Tensor:
    """(h', w') tokens in each cell: factor² inside, fewer along the far edges of an odd grid."""
    rows = torch.full((math.ceil(h / factor),), float(factor))
    cols = torch.full((math.ceil(w / factor),), float(factor))
    rows[-1] = h - factor * (rows.numel() - 1)
    cols[-1] = w - factor * (cols.numel() - 1)
    return (rows[:, None] * cols[None, :]).to(device=like.device, dtype=like.dtype)
