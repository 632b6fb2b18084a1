"""The step clock: one hook on the denoiser's forward turns a stream of calls into (run, step, call).

Signals, strongest first:
- the pipeline's scheduler (when fastdiff was applied to a pipeline): `set_timesteps` starts a run and
  `step` ends a denoising step — exact for every sampler, second-order ones included;
- otherwise the timestep itself: a repeated timestep is another call (CFG branch) of the same step.
In either mode a larger timestep than the last one, or a new latent shape for the same call slot, starts a run.
The pipeline's scheduler is the one it holds *now* (`pipe.scheduler = X.from_config(...)` after apply is followed).

Either way a step holds at most MAX_CALLS_PER_STEP calls: a denoiser called over and over at one timestep (a
one-step sampler, feature extraction) starts new runs instead of opening call slots without bound, so state stays
bounded. (Not the count the first step had: SD3's skip-layer guidance adds a call in mid-run steps only.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .context import StepContext, TokenLayout

# The most denoiser calls one step makes in any diffusers pipeline: cond/uncond, plus image guidance
# (InstructPix2Pix: 3) or skip-layer guidance (SD3: 3); 4 leaves one to spare.
MAX_CALLS_PER_STEP = 4


@dataclass
class CallRecord:
    """What one denoiser call was, which blocks ran with how many tokens (telemetry), what each mechanism
    decided for it (e.g. {"cache": "reuse", "guidance": "skip-uncond"}), and which submodules ran on fewer
    tokens (token merging: module path -> cost-model Reduction), so that its FLOPs are accounted as run."""

    ctx: StepContext
    part: str = "denoiser"  # which of the session's denoisers made the call (its pipeline attribute)
    blocks: dict[int, int] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    dense_rows: int | None = None  # rows the dense model would have run, when a mechanism ran fewer
    reductions: dict[str, Any] = field(default_factory=dict)


def _timestep(value: Any) -> float:
    if value is None:
        return float("nan")
    if hasattr(value, "reshape"):
        return float(value.reshape(-1)[0])  # one host sync per call, never per block
    return float(value)


class StepClock:
    def __init__(self, scheduler: Any = None):
        self.scheduler = scheduler
        self.run = -1
        self._pending_run = False  # set_timesteps / reset seen since the last call
        self._from_scheduler = False  # ... and it came from set_timesteps
        self._scheduler_run = False  # this run is driven by scheduler.step
        self._last_t: float | None = None
        self._step_t: float | None = None
        self.step = 0
        self.call = 0
        self._calls_since_step = 0
        self._shapes: dict[int, tuple] = {}
        self.num_steps: int | None = None

    # -- signals ------------------------------------------------------------------------------------
    def on_set_timesteps(self) -> None:
        self._pending_run = True
        self._from_scheduler = True

    def on_scheduler_step(self) -> None:
        if self._scheduler_run:
            self.step += 1
            self._calls_since_step = 0

    def begin_scheduler_run(self, scheduler: Any) -> None:
        """The pipeline now drives another scheduler (swapped after apply): its `set_timesteps` came before
        fastdiff saw it, so the next call opens a run that this scheduler drives."""
        self.scheduler = scheduler
        self.on_set_timesteps()

    def reset(self) -> None:
        self._pending_run = True
        self._from_scheduler = False

    # -- a denoiser call ----------------------------------------------------------------------------
    def tick(self, timestep: Any, shape: tuple, layout: TokenLayout | None) -> tuple[StepContext, bool]:
        """The context of this call (branches left empty for the caller), and whether it opened a new run."""
        t = _timestep(timestep)
        # A timestep above the last one starts a run even in a scheduler-driven run: then another pipeline (one
        # whose scheduler fastdiff does not follow) is calling the shared denoiser. Continuing the old run there
        # would reuse another run's features; a new run is never wrong.
        new_run = self._pending_run or self._last_t is None or t > self._last_t
        if not new_run:
            slot = self._calls_since_step if self._scheduler_run else (self.call + 1 if t == self._step_t else 0)
            # a different latent shape where this call slot had another one: a new run
            new_run = slot in self._shapes and self._shapes[slot] != shape
            # more calls in one step than any pipeline makes: a new run
            new_run = new_run or slot >= MAX_CALLS_PER_STEP
        if new_run:
            self.run += 1
            self._scheduler_run = self._pending_run and self._from_scheduler
            self._pending_run = False
            self._from_scheduler = False
            self.step, self.call, self._calls_since_step = 0, 0, 0
            self._shapes = {}
            self.num_steps = self._scheduler_steps(t) if self._scheduler_run else None
        elif self._scheduler_run:
            self.call = self._calls_since_step
        elif t == self._step_t:
            self.call += 1
        else:
            self.step, self.call = self.step + 1, 0
        self._calls_since_step += 1
        self._shapes.setdefault(self.call, shape)
        self._last_t = t
        self._step_t = t
        ctx = StepContext(self.run, self.step, self.num_steps, t, self.call, (), layout)
        return ctx, new_run

    def _scheduler_steps(self, t: float) -> int | None:
        """Denoiser steps left in this run, from the scheduler's own state: its timesteps from `begin_index`
        (img2img pipelines start part-way and say so with `set_begin_index`). Only a scheduler that keeps no
        begin index is matched by this call's timestep, and then an ambiguous match takes the longest run: a
        guess that is too short would turn a run's every step into its cool-down and compute them all."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            return None
        values = [float(v) for v in timesteps]
        if hasattr(self.scheduler, "begin_index"):
            return len(values) - int(self.scheduler.begin_index or 0)
        matches = [i for scale in (1.0, 1000.0) for i, v in enumerate(values)  # some pipelines pass t / 1000
                   if abs(v - t * scale) <= 1e-3 * max(1.0, abs(v))]
        return len(values) - (min(matches) if matches else 0)
