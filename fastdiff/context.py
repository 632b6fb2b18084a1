"""What every mechanism sees of the sampling loop: StepContext (this call) and RunState (this run)."""

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

    Args:
        run: index of the sampling run (pipeline call) since apply; bumps on every reset.
        step: denoising step index within the run, from 0.
        num_steps: steps in the run when known (from the scheduler), else None.
        timestep: the timestep value passed to the denoiser (first sample's).
        call: index of this denoiser call within the step (separate cond/uncond calls give 0, 1).
        branches: one label per batch row: "cond", "uncond" or "?" when the pipeline does not say.
        layout: token grid and text tokens of this call.
    """

    run: int
    step: int
    num_steps: int | None
    timestep: float
    call: int
    branches: tuple[str, ...]
    layout: TokenLayout

    @property
    def batch_size(self) -> int:
        return len(self.branches)

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step == self.num_steps - 1


@dataclass
class RunState:
    """Per-run, per-call (branch), per-mechanism state. Rows within a call are the mechanism's business.

    `slot(name, call, factory)` returns the state object that mechanism `name` keeps for denoiser call
    `call` of each step, creating it with `factory()` on first use. `reset()` drops everything: the
    clock calls it at the start of every sampling run, and `fastdiff.reset(pipe)` calls it explicitly.
    """

    slots: dict[tuple[str, int], Any] = field(default_factory=dict)

    def slot(self, name: str, call: int, factory: Callable[[], Any]) -> Any:
        key = (name, call)
        if key not in self.slots:
            self.slots[key] = factory()
        return self.slots[key]

    def reset(self) -> None:
        self.slots.clear()
