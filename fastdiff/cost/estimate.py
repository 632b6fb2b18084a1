"""Predicted FLOPs of a whole sampling run, and the table mechanisms transform to report their savings.

A run is priced call by call: every row of the table carries the context of its call (`StepContext`: token layout,
stage, global step, run and stage steps, call, branches), built as the step clock would build it, so a run of
several stages at several resolutions is priced row by row, and a mechanism's `estimate_cost` reads each row's own
context — the same fields its hooks read at run time.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..config import _shown
from ..context import COND, UNCOND, StepContext, TokenLayout
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
class CostRow:
    """One denoiser call of a run: its context and its per-sample FLOPs per block (the last entry: everything
    outside blocks)."""

    ctx: StepContext
    flops: tuple[float, ...]

    @property
    def total(self) -> float:
        """FLOPs of the call over its rows, summed as `summary()` sums a record (outside blocks first)."""
        return self.ctx.batch_size * (self.flops[-1] + sum(self.flops[:-1]))


@dataclass(frozen=True)
class CostTable:
    """The calls of a run, one `CostRow` each, in call order.

    Mechanisms return a modified copy from `estimate_cost` (a reused block costs 0, a merged one less),
    so composition is function composition in attach order.
    """

    model: CostModel
    rows: tuple[CostRow, ...]

    @property
    def flops(self) -> float:
        return sum(r.total for r in self.rows)

    def with_flops(self, flops) -> "CostTable":
        """The table with each row's FLOPs replaced, in row order."""
        return replace(self, rows=tuple(replace(r, flops=tuple(f)) for r, f in zip(self.rows, flops, strict=True)))


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one sampling run (`layout`: its last stage's; `stages`: every stage's layout and steps).

    `seconds` / `dense_seconds`: predicted wall time of the run's denoiser calls with the config (under a session)
    and of the bare model, from the latency calibration named by `latency` (`fastdiff.cost.latency`: this device and
    model's cached one, or the shipped default, which says "default")."""

    flops: float
    dense_flops: float
    layout: TokenLayout
    steps: int
    calls_per_step: int
    batch: int
    stages: tuple[tuple[TokenLayout, int], ...] = ()
    seconds: float | None = None
    dense_seconds: float | None = None
    latency: str = ""

    @property
    def speedup(self) -> float:
        return self.dense_flops / self.flops

    @property
    def time_speedup(self) -> float | None:
        """Predicted wall-time speedup over the bare model (None when time was not priced)."""
        return None if self.seconds is None else self.dense_seconds / self.seconds


def schedule(stages: list[tuple[TokenLayout, int]], batch: int, cfg: bool) -> list[StepContext]:
    """The contexts of a run's calls: each stage's steps (the global step counting on), one call per step, or a
    conditional then an unconditional one with `cfg` (a pipeline batching both halves makes the same FLOPs)."""
    run_steps = sum(n for _, n in stages)
    calls = (COND, UNCOND) if cfg else (COND,)
    out, start = [], 0
    for stage, (layout, n) in enumerate(stages):
        for step in range(start, start + n):
            out += [StepContext(0, step, run_steps, float("nan"), call, (branch,) * batch, layout, stage, start, n)
                    for call, branch in enumerate(calls)]
        start += n
    return out


def dense_table(model: CostModel, contexts: list[StepContext]) -> CostTable:
    per: dict[TokenLayout, tuple[float, ...]] = {}
    for ctx in contexts:
        if ctx.layout not in per:
            per[ctx.layout] = tuple(model.block_flops(ctx.layout))
    return CostTable(model, tuple(CostRow(ctx, per[ctx.layout]) for ctx in contexts))


STAGE_KEYS = ("height", "width", "steps", "num_frames")


def check_stages(stages: Any, *, height: Any, width: Any, steps: Any, num_frames: Any) -> list[dict]:
    """The stages `fastdiff.estimate` prices, as dicts of STAGE_KEYS: `stages` as given, or the one stage of
    height/width/steps. ConfigError when both or neither are given, or a stage has other keys."""
    if stages is None:
        return [dict(height=height, width=width, steps=steps, num_frames=num_frames)]
    given = [k for k, v in (("height", height), ("width", width), ("steps", steps), ("num_frames", num_frames))
             if v is not None]
    if given:
        raise ConfigError(f"give either stages or {given}, not both (each stage has its own size and steps)")
    if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"stages must be a non-empty list of dicts with keys {list(STAGE_KEYS)}, got {_shown(stages)}")
    if len(stages) > MAX_STEPS:
        raise ConfigError(f"stages: at most {MAX_STEPS}, got {len(stages)}")
    out = []
    for i, stage in enumerate(stages):
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        missing = [k for k in ("height", "width", "steps") if k not in stage]
        if unknown or missing:
            raise ConfigError(f"stages[{i}]: " + (f"unknown key(s) {unknown}" if unknown else f"missing {missing}") +
                              f"; a stage has {list(STAGE_KEYS)}")
        out.append({"num_frames": None, **stage})
    if sum(s["steps"] if isinstance(s["steps"], int) else 0 for s in out) > MAX_STEPS:
        raise ConfigError(f"stages: at most {MAX_STEPS} steps in all")
    return out

