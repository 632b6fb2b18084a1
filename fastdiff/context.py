"""What every mechanism sees of the sampling loop: StepContext (this call) and RunState (what a run keeps)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

# Branch labels of one batch row.
COND, UNCOND, UNKNOWN = "cond", "uncond", "?"


@dataclass(frozen=True)
class TokenLayout:
    """The token grid one denoiser call works on, per sample.

    Args:
        grid: (frames, height, width) of image tokens after patching (frames=1 for images; for UNets
            the latent grid itself).
        text_tokens: number of text/context tokens (0 for class-conditioned models).
        text_position: where text tokens sit in attention: "first", "last" (concatenated with image
            tokens), "cross" (only as cross-attention keys) or "none".
    """

    grid: tuple[int, int, int]
    text_tokens: int = 0
    text_position: str = "none"

    @property
    def image_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w


def level_grid(grid: tuple[int, int, int], level: int) -> tuple[int, int, int]:
    """The token grid at UNet resolution level `level` (0 = the latent grid)."""
    f, h, w = grid
    for _ in range(level):  # stride-2 convs with padding 1 round up
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return f, h, w


@dataclass(frozen=True)
class StepContext:
    """One denoiser call, as the step clock saw it.

    A run (one image or video) has one or more stages: a driver (e.g. resolution-bottleneck sampling) begins each
    stage after the first with `Session.begin_stage`; a stage may change the latent size and the timestep schedule.
    Steps count on across stages: `step` is the run's (global) step, `stage_step` the step within the stage.

    Args:
        run: index of the sampling run (pipeline call, or a driver's stages) since apply; bumps on every reset.
        step: denoising step index within the run, from 0, continuing across stages.
        num_steps: steps in the run when known (the driver's `run_steps`, else the steps known so far: the stages
            before this one plus this stage's), else None.
        timestep: the timestep value passed to the denoiser (first sample's).
        call: index of this denoiser call within the step (separate cond/uncond calls give 0, 1).
        branches: one label per batch row: "cond", "uncond" or "?" when the pipeline does not say.
        layout: token grid and text tokens of this call.
        stage: index of the stage within the run, from 0.
        stage_start: the run's step at which this stage began.
        stage_steps: steps in this stage when known (the driver's, or the scheduler's for the stage), else None.
    """

    run: int
    step: int
    num_steps: int | None
    timestep: float
    call: int
    branches: tuple[str, ...]
    layout: TokenLayout | None
    stage: int = 0
    stage_start: int = 0
    stage_steps: int | None = None

    @property
    def batch_size(self) -> int:
        return len(self.branches)

    @property
    def stage_step(self) -> int:
        """The step within the stage, from 0."""
        return self.step - self.stage_start

    @property
    def grid(self) -> tuple[int, int, int] | None:
        return None if self.layout is None else self.layout.grid


@dataclass
class RunState:
    """The state the mechanisms of one denoiser keep across the calls of a run: one object per (mechanism, call
    slot, token grid), so concurrent branches, call slots and resolutions never share one.

    `get(name, slot, grid, factory)` returns it, creating it with `factory()` on first use. The stage rule
    (`enter_stage`): a stage on another token grid than the last drops the state of every other grid — what was
    measured or cached on one grid (residuals, patterns, metrics, guidance deltas) is never reused on another — and a
    stage on the same grid keeps it (steps count on, so step distances stay right). `reset()` drops everything: the
    session calls it at the start of every sampling run, and `fastdiff.reset(pipe)` calls it explicitly.
    """

    states: dict[tuple[str, int, Any], Any] = field(default_factory=dict)
    stage: tuple[int, int] = (-1, 0)  # (run, stage) last entered

    def get(self, name: str, slot: int, grid: Any, factory: Callable[[], Any]) -> Any:
        key = (name, slot, grid)
        if key not in self.states:
            self.states[key] = factory()
        return self.states[key]

    def of(self, name: str) -> list[Any]:
        """Every state mechanism `name` keeps now."""
        return [s for (n, _, _), s in self.states.items() if n == name]

    def enter_stage(self, run: int, stage: int, grid: Any) -> None:
        if (run, stage) != self.stage:
            self.stage = (run, stage)
            self.states = {k: v for k, v in self.states.items() if k[2] == grid}

    def reset(self) -> None:
        self.states.clear()
