"""Predicted FLOPs of a whole sampling run, and the table mechanisms transform to report their savings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..context import TokenLayout
from .model import CostModel


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
