"""Predicted FLOPs of a whole sampling run, and the table mechanisms transform to report their savings."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..config import _shown
from ..context import TokenLayout
from ..errors import ConfigError, FastDiffError
from .model import CostModel

MAX_STEPS = 10_000  # the table holds a row per (step, call): a typo like steps=10**9 must not eat the memory
MAX_SIZE = 1 << 16  # pixels (or latents) per axis, frames, batch rows, text tokens


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; ConfigError for anything else (bools, floats, NaN, strings)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {_shown(value)}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bounds}, got {_shown(value)}")
    return int(value)


def check_run(*, height: Any, width: Any, steps: Any, num_frames: Any, batch: Any, cfg: Any, text_tokens: Any) -> None:
    """Refuse a run that cannot be priced (what `fastdiff.estimate` is asked about), before any work."""
    check_int("height", height, 1, MAX_SIZE)
    check_int("width", width, 1, MAX_SIZE)
    check_int("steps", steps, 1, MAX_STEPS)
    if num_frames is not None:
        check_int("num_frames", num_frames, 1, MAX_SIZE)
    check_int("batch", batch, 1, MAX_SIZE)
    if not isinstance(cfg, bool):
        raise ConfigError(f"cfg must be a bool (classifier-free guidance: two denoiser calls per step), got {_shown(cfg)}")
    if text_tokens is not None:
        check_int("text_tokens", text_tokens, 0, MAX_SIZE)


def token_patch(latent_grid: Callable, config: Any) -> tuple[int, int, int]:
    """Latent (frames, height, width) per token of a family's `latent_grid`: the smallest latent size per axis that
    makes one token (every family's grid is a floor division of the latent by its patch)."""
    patch = []
    for axis in range(3):
        p = next((p for p in range(1, 65) if latent_grid(config, p, p, p)[axis] >= 1), None)
        if p is None:
            raise FastDiffError(f"the adapter's latent_grid makes no token on axis {axis} from latents of up to 64: "
                                "cannot size its token grid")
        patch.append(p)
    return tuple(patch)


@dataclass(frozen=True)
class CostTable:
    """Per-sample FLOPs of every (step, call, block) of a run; the last column is everything outside blocks.

    Mechanisms return a modified copy from `estimate_cost` (a reused block costs 0, a merged one less),
    so composition is function composition in attach order.
    """

    model: CostModel
    layout: TokenLayout
    batch: int
    calls_per_step: int
    rows: tuple[tuple[float, ...], ...]  # one row per (step, call)

    @property
    def flops(self) -> float:
        return self.batch * sum(sum(r) for r in self.rows)

    def with_rows(self, rows) -> "CostTable":
        return replace(self, rows=tuple(tuple(r) for r in rows))


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one sampling run."""

    flops: float
    dense_flops: float
    layout: TokenLayout
    steps: int
    calls_per_step: int
    batch: int

    @property
    def speedup(self) -> float:
        return self.dense_flops / self.flops


def dense_table(model: CostModel, layout: TokenLayout, steps: int, calls_per_step: int, batch: int) -> CostTable:
    per = tuple(model.block_flops(layout))
    return CostTable(model, layout, batch, calls_per_step, (per,) * (steps * calls_per_step))
