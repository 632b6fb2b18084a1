"""Block-sparse attention patterns on the token grid: which key blocks each query block attends.

Attention kernels skip work a block of tokens at a time, so a pattern is a boolean (query block × key block)
matrix. For blocks to be spatially compact, the image tokens are first put in *tile order*: the (frames, height,
width) grid is cut into tiles of `tile` tokens per axis and each tile's tokens become consecutive (STA's
tile-aligned layout); text tokens follow the image ones. A `Geometry` holds that order and, per block, the
bounding box of its image tokens on the grid, which every pattern is a function of:

- window (STA / NATTEN-like): a query block attends the key blocks whose boxes are within `reach` tokens per axis;
- criss-cross (GRAT): also every key block in the same row band, column band (and, for video, the same spatial
  band of other frames) — boxes that overlap on all grid axes but one;
- predicted (top-k / top-p, in `sparse.py`): whatever the scores pick, on top of a `keep` set from here.

Text tokens are always attended, and always attend everything: a block holding any text token is dense in both
directions. Where the grid does not divide into tiles, edge tiles are smaller and blocks may straddle tiles; the
boxes then grow, which only adds attended blocks (patterns stay conservative, never wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def default_tile(grid: tuple[int, int, int], block: int) -> tuple[int, int, int]:
    """A tile of about `block` tokens, as cubic as the grid allows (images: square)."""
    f, h, w = grid
    if f > 1:
        side = max(1, round(block ** (1 / 3)))
        tf = min(f, side)
    else:
        tf = 1
    rest = block // tf
    th = min(h, 2 ** (int(math.log2(rest)) // 2)) if rest > 1 else 1
    tw = min(w, max(1, rest // th))
    return tf, th, tw


@dataclass(frozen=True)
class Geometry:
    """The sequence one attention call sees, reordered into blocks of `block` tokens.

    Args:
        grid: image token grid (frames, height, width), raster order in the module's sequence.
        n_text: text tokens in the sequence; `text_first` says whether they come before the image tokens.
        order: kernel position -> sequence position (a permutation of all tokens); None when it is the identity.
        inverse: sequence position -> kernel position; None with `order`.
        lo, hi: (blocks, 3) int64, the bounding box of each block's image tokens (empty box for pure-text blocks).
        text: (blocks,) bool, the block holds at least one text token.
        sizes: (blocks,) int64, tokens in each block (the last one may be partial).
    """

    grid: tuple[int, int, int]
    n_text: int
    text_first: bool
    tile: tuple[int, int, int]
    block: int
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    lo: torch.Tensor
    hi: torch.Tensor
    text: torch.Tensor
    sizes: torch.Tensor

    @property
    def n(self) -> int:
        return math.prod(self.grid) + self.n_text

    @property
    def blocks(self) -> int:
        return self.sizes.numel()


@lru_cache(maxsize=64)  # pure in its (hashable) arguments; attention calls of one layout share it
def geometry(grid: tuple[int, int, int], n_text: int, text_first: bool, tile: tuple[int, int, int],
             block: int) -> Geometry:
    f, h, w = grid
    tile = tuple(min(t, g) for t, g in zip(tile, grid))
    n_img = f * h * w
    coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = coords.reshape(n_img, 3)  # raster order of the module's sequence
    t = torch.tensor(tile)
    tile_id = coords // t
    tiles_per = torch.tensor([math.ceil(g / s) for g, s in zip(grid, tile)])
    within = coords % t
    key = ((tile_id[:, 0] * tiles_per[1] + tile_id[:, 1]) * tiles_per[2] + tile_id[:, 2]) * math.prod(tile)
    key = key + (within[:, 0] * t[1] + within[:, 1]) * t[2] + within[:, 2]
    image_order = torch.argsort(key)  # tile order: position -> raster index
    offset = n_text if text_first else 0
    text_pos = torch.arange(n_text) + (0 if text_first else n_img)
    order = torch.cat([image_order + offset, text_pos])
    identity = bool(torch.equal(order, torch.arange(order.numel())))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    n = n_img + n_text
    blocks = math.ceil(n / block)
    sizes = torch.full((blocks,), block, dtype=torch.long)
    sizes[-1] = n - block * (blocks - 1)
    lo = torch.full((blocks, 3), torch.iinfo(torch.long).max // 4, dtype=torch.long)
    hi = torch.full((blocks, 3), -1, dtype=torch.long)
    img_block = torch.arange(n_img) // block  # image tokens come first in kernel order
    where = img_block[:, None].expand(-1, 3)
    lo.scatter_reduce_(0, where, coords[image_order], "amin")
    hi.scatter_reduce_(0, where, coords[image_order], "amax")
    text = torch.zeros(blocks, dtype=torch.bool)
    if n_text:
        text[n_img // block:] = True
    return Geometry(grid, n_text, text_first, tile, block, None if identity else order,
                    None if identity else inverse, lo, hi, text, sizes)


def gaps(geom: Geometry) -> torch.Tensor:
    """(blocks, blocks, 3) tokens between the boxes of every (query, key) block pair per axis; 0 when they overlap."""
    lo, hi = geom.lo, geom.hi
    return (lo[None, :, :] - hi[:, None, :]).clamp(min=0).maximum((lo[:, None, :] - hi[None, :, :]).clamp(min=0))


def _with_text(geom: Geometry, mask: torch.Tensor) -> torch.Tensor:
    return mask | geom.text[:, None] | geom.text[None, :]


def window(geom: Geometry, tiles: tuple[int, int, int]) -> torch.Tensor:
    """(blocks, blocks) bool: key blocks within `tiles[a] // 2` tiles of the query block along every axis a."""
    reach = torch.tensor([(w // 2) * t for w, t in zip(tiles, geom.tile)])
    return _with_text(geom, (gaps(geom) <= reach).all(-1))


def crisscross(geom: Geometry, tiles: tuple[int, int, int]) -> torch.Tensor:
    """The window, plus every key block lined up with the query block along one grid axis (its row, column and,
    in video, its position in other frames): boxes within the window's reach on all axes but one."""
    reach = torch.tensor([(w // 2) * t for w, t in zip(tiles, geom.tile)])
    near = gaps(geom) <= reach  # (Q, K, 3)
    axes = [a for a, g in enumerate(geom.grid) if g > 1]
    lined = near[..., axes].sum(-1) >= max(1, len(axes) - 1)
    return _with_text(geom, near.all(-1) | lined)


def keep(geom: Geometry) -> torch.Tensor:
    """Blocks a predicted pattern always keeps: the diagonal (a query block's own keys) and text."""
    return _with_text(geom, torch.eye(geom.blocks, dtype=torch.bool))


def density(geom: Geometry, mask: torch.Tensor) -> float:
    """Fraction of the (query token, key token) pairs a block mask (..., Q, K) computes, averaged over leading dims."""
    pairs = geom.sizes[:, None] * geom.sizes[None, :]
    m = mask.reshape(-1, geom.blocks, geom.blocks).to(torch.long)
    return float((m * pairs).sum() / (m.shape[0] * geom.n * geom.n))
