"""The step clock: one hook on the denoiser's forward turns a stream of calls into (run, stage, step, call).

Signals, strongest first:
- a driver's `begin_stage` (resolution-bottleneck sampling, through `Session.begin_stage`): the next call begins the
  next stage of the run in progress (or, with `new_run`, the first stage of a new run), whatever else it signals —
  a new latent shape, a new `set_timesteps` or a timestep above the last are then the stage's, not a new run's;
- the pipeline's scheduler (when fastdiff was applied to a pipeline): `set_timesteps` starts a run and
  `step` ends a denoising step — exact for every sampler, second-order ones included;
- otherwise the timestep itself: a repeated timestep is another call (CFG branch) of the same step.
Without a driver, a larger timestep than the last one, or a new latent shape for the same call slot, starts a run.
The pipeline's scheduler is the one it holds *now* (`pipe.scheduler = X.from_config(...)` after apply is followed).
Steps count on across the stages of a run (the global step); each stage also counts its own (`stage_step`).

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
    """What one denoiser call was (its context, as the clock saw it), which blocks ran with how many tokens
    (telemetry), what each mechanism decided for it (e.g. {"cache": "reuse", "guidance": "skip-uncond"}), which batch
    rows ran when a mechanism ran fewer (guidance), and which submodules ran on fewer tokens (token merging: module
    path -> cost-model Reduction), so that its FLOPs are accounted as run. `summary()` is built from records."""

    ctx: StepContext
    part: str = "denoiser"  # which of the session's denoisers made the call (its pipeline attribute)
    blocks: dict[int, int] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    rows: tuple[int, ...] | None = None  # the batch rows that ran, when a mechanism asked for fewer (None: all)
    reductions: dict[str, Any] = field(default_factory=dict)
    dense_layout: TokenLayout | None = None  # the layout the model without fastdiff runs the call at, where a driver
    # (resolution bottleneck) runs it smaller; None: the call's own

    @property
    def branches(self) -> tuple[str, ...]:
        """The branches of the rows that ran."""
        return self.ctx.branches if self.rows is None else tuple(self.ctx.branches[i] for i in self.rows)


def _timestep(value: Any) -> float:
    if value is None:
        return float("nan")
    if hasattr(value, "reshape"):
        return float(value.reshape(-1)[0])  # one host sync per call, never per block
    return float(value)


@dataclass(frozen=True)
class _StageRequest:
    num_steps: int | None  # the stage's steps (None: the scheduler's, when it drives the stage)
    run_steps: int | None  # the run's steps over all its stages, when the driver knows them
    new_run: bool  # the stage is the first of a new run


class StepClock:
    def __init__(self, scheduler: Any = None):
        self.scheduler = scheduler
        self.run = -1
        self._pending_run = False  # set_timesteps / reset seen since the last call
        self._from_scheduler = False  # ... and it came from set_timesteps
        self._forced = False  # ... or reset() asked for a new run
        self._scheduler_run = False  # this stage is driven by scheduler.step
        self._stage_request: _StageRequest | None = None  # a driver's begin_stage, for the next call
        self._last_t: float | None = None
        self._step_t: float | None = None
        self.step = 0  # the run's step (global over stages)
        self.call = 0
        self._calls_since_step = 0
        self._shapes: dict[int, tuple] = {}
        self.stage = 0
        self.stage_start = 0
        self.stage_steps: int | None = None
        self._run_steps: int | None = None

    @property
    def num_steps(self) -> int | None:
        """The run's steps: the driver's `run_steps`, else the stages so far plus this one's (when known)."""
        if self._run_steps is not None:
            return self._run_steps
        return None if self.stage_steps is None else self.stage_start + self.stage_steps

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

    def begin_stage(self, num_steps: int | None = None, run_steps: int | None = None, new_run: bool = False) -> None:
        """A driver says the next call begins a stage: the next one of the run in progress, or the first of a new run
        (`new_run`, or when no run is in progress). See `Session.begin_stage`."""
        self._stage_request = _StageRequest(num_steps, run_steps, new_run)

    def reset(self) -> None:
        self._pending_run = True
        self._from_scheduler = False
        self._forced = True
        self._stage_request = None

    # -- a denoiser call ----------------------------------------------------------------------------
    def tick(self, timestep: Any, shape: tuple, layout: TokenLayout | None) -> tuple[StepContext, bool]:
        """The context of this call (branches left empty for the caller), and whether it opened a new run."""
        t = _timestep(timestep)
        request, self._stage_request = self._stage_request, None
        new_stage = request is not None and not request.new_run and self.run >= 0 and not self._forced
        if request is not None:
            new_run = not new_stage
        else:
            # A timestep above the last one starts a run even in a scheduler-driven run: then another pipeline (one
            # whose scheduler fastdiff does not follow) is calling the shared denoiser. Continuing the old run there
            # would reuse another run's features; a new run is never wrong.
            new_run = self._pending_run or self._last_t is None or t > self._last_t
        if not new_run and not new_stage:
            slot = self._calls_since_step if self._scheduler_run else (self.call + 1 if t == self._step_t else 0)
            # a different latent shape where this call slot had another one: a new run
            new_run = slot in self._shapes and self._shapes[slot] != shape
            # more calls in one step than any pipeline makes: a new run
            new_run = new_run or slot >= MAX_CALLS_PER_STEP
        if new_run or new_stage:
            if new_run:
                self.run += 1
                self.stage, self.step = 0, 0
                self._run_steps = request.run_steps if request is not None else None
            else:  # the global step goes on: the next one after the last stage's (its scheduler.step counted it)
                self.stage += 1
                self.step += 0 if self._scheduler_run and self._calls_since_step == 0 else 1
                if request.run_steps is not None:
                    self._run_steps = request.run_steps
            self.stage_start = self.step
            self._scheduler_run = self._pending_run and self._from_scheduler
            self._pending_run = self._from_scheduler = self._forced = False
            self.call, self._calls_since_step = 0, 0
            self._shapes = {}
            given = request.num_steps if request is not None else None
            self.stage_steps = given if given is not None else self._scheduler_steps(t) if self._scheduler_run else None
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
        ctx = StepContext(self.run, self.step, self.num_steps, t, self.call, (), layout, self.stage, self.stage_start,
                          self.stage_steps)
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
