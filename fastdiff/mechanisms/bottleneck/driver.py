"""The resolution-bottleneck driver: one pipeline call, several stages at their own latent sizes.

It lives on the pipeline's scheduler and the denoiser's forward, nothing else (the pipeline's class and loop are
untouched, so `pipe(...)` as usual runs the stages):

- `set_timesteps`: after the scheduler made the pipeline's schedule, it is replaced by the stages' schedules back
  to back (same total steps; each stage from its strength down, with its own shift: `schedule.py`).
- the denoiser's forward: in a stage at scale s it sees `pick(latents, s)` and, for families whose positions the
  pipeline passes in (FLUX `img_ids`), positions rebuilt for that grid (adapter data); its output goes back
  nearest-upsampled, so the pipeline's CFG arithmetic works on full-size tensors it never notices are blocky.
- `step`: the scheduler's own update runs on the stage's latents (`pick` of what the pipeline holds); at a stage's
  last step the clean estimate (x - sigma v) is resized smoothly to the next stage's size and re-noised at that
  stage's first sigma with fresh noise (per row, from the row's starting noise: `resample.row_noise`).

`pick(up(y)) == y` exactly and each update is linear, so within a stage nothing is approximated beyond the stage
itself. Flow-matching samplers only (x0 = x - sigma v); epsilon/v samplers are refused by `validate`.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import ConfigError, UnsupportedModelError
from . import resample
from .schedule import Stage, flat_schedule, split_steps, tokens_of_mu

# samplers whose step is x_next = x + (sigma_next - sigma) v on a velocity prediction
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass
class _Run:
    """One pipeline call's stage bookkeeping (per thread: two threads sampling at once each have their own)."""

    counts: list[int]
    bounds: list[int]  # first step of each stage
    sigmas: torch.Tensor
    step: int = 0
    first: torch.Tensor | None = None  # the run's starting latents (the pipeline's noise), for re-noising
    full: tuple[int, int] | None = None  # full latent (H, W) of a packed family, read off the positions

    def stage_of(self, step: int) -> int:
        return max(k for k, b in enumerate(self.bounds) if b <= min(step, self.bounds[-1]))


@dataclass
class Driver:
    """Runs `stages` on every call of a pipeline.

    Args:
        stages: the stages in order; the last must be at scale 1 (the output has the requested size).
        resize: how a clean estimate moves between stages (`resample.METHODS`).
        strength_is: "time" or "sigma" (see `schedule.py`).
        packing: latent patch side packed into one token by the pipeline (FLUX: 2), or 1 (latents are (..., H, W)).
        positions: (bound call args, (h, w) token grid) -> the call args that carry positions for that grid
            (FLUX: `img_ids`), or None when the model derives positions from the shape.
        hidden_arg: the denoiser's latent argument.
        on_stage: called with the stage index when a stage begins inside a run (the step clock's `begin_stage`).
    """

    stages: tuple[Stage, ...]
    resize: str = "bicubic"
    strength_is: str = "time"
    packing: int = 1
    positions: Callable[[dict, tuple[int, int]], dict] | None = None
    hidden_arg: str = "hidden_states"
    on_stage: Callable[[int], None] | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self):
        if not self.stages or self.stages[-1].scale != 1:
            raise ConfigError("bottleneck: the last stage must be at scale 1, so the output has the requested size")
        if any(int(s.scale) != s.scale or s.scale < 1 for s in self.stages):
            raise ConfigError(f"bottleneck: stage scales must be ints >= 1, got {[s.scale for s in self.stages]}")
        if any(not 0 < s.strength <= 1 for s in self.stages):
            raise ConfigError(f"bottleneck: strengths must lie in (0, 1], got {[s.strength for s in self.stages]}")
        if self.resize not in resample.METHODS:
            raise ConfigError(f"bottleneck: resize must be one of {resample.METHODS}, got {self.resize!r}")

    @staticmethod
    def check_scheduler(scheduler: Any, owner: str, pipeline: str = "this pipeline") -> None:
        name = type(scheduler).__name__
        if name not in FLOW_SCHEDULERS:
            raise UnsupportedModelError(
                f"{owner}: resolution-bottleneck sampling re-noises clean estimates by the flow-matching rule and "
                f"needs a flow-matching sampler ({', '.join(FLOW_SCHEDULERS)}); {pipeline} samples with {name}")

    # -- the run --------------------------------------------------------------------------------------
    @property
    def run(self) -> _Run | None:
        return getattr(self._local, "run", None)

    def set_timesteps(self, scheduler, inner, args, kwargs):
        out = inner(*args, **kwargs)
        total = len(scheduler.timesteps)
        counts = split_steps(total, self.stages)
        tokens = self._full_tokens(scheduler, kwargs.get("mu"))
        sigmas, timesteps = flat_schedule(scheduler, self.stages, counts, tokens, self.strength_is)
        device = scheduler.timesteps.device
        scheduler.sigmas = sigmas.to(device=device, dtype=scheduler.sigmas.dtype)
        scheduler.timesteps = timesteps.to(device=device, dtype=scheduler.timesteps.dtype)
        bounds = [sum(counts[:k]) for k in range(len(counts))]
        self._local.run = _Run(counts, bounds, sigmas)
        return out

    def _full_tokens(self, scheduler, mu) -> int:
        """The run's full token count, from the mu a dynamic-shift pipeline passed (the inverse of its rule);
        0 where the shift is static (the stages then need no token count)."""
        if not scheduler.config.get("use_dynamic_shifting", False):
            return 0
        if mu is None:
            raise UnsupportedModelError(
                f"{type(scheduler).__name__} shifts by resolution but the pipeline passed no mu to set_timesteps: "
                "the stages' shifts cannot be derived")
        return tokens_of_mu(scheduler, mu)

    # -- latents in and out ---------------------------------------------------------------------------
    def _to_grid(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        """The pipeline's full-size latents -> (..., H, W) spatial latents."""
        return x if self.packing == 1 else resample.unpack(x, *run.full, self.packing)

    def _from_grid(self, y: torch.Tensor, run: _Run) -> torch.Tensor:
        return y if self.packing == 1 else resample.pack(y, self.packing)

    def _scale(self, run: _Run | None) -> int:
        return 1 if run is None else self.stages[run.stage_of(run.step)].scale

    def forward(self, bind: Callable[[tuple, dict], dict], inner, args, kwargs):
        """`bind`: (args, kwargs) -> the call's arguments by name (the adapter's binder), bound only when needed."""
        run = self._require_run()
        s = self._scale(run)
        if s == 1 and (self.packing == 1 or run.full is not None):
            return inner(*args, **kwargs)
        bound = bind(args, kwargs)
        if self.packing != 1 and run.full is None:
            run.full = self._read_full(bound)
        if s == 1:
            return inner(*args, **kwargs)
        grid = self._to_grid(bound[self.hidden_arg], run)
        if grid.shape[-1] % (s * self.packing) or grid.shape[-2] % (s * self.packing):
            raise ConfigError(
                f"bottleneck: latents of {tuple(grid.shape[-2:])} do not divide into stage scale {s} "
                f"x {self.packing}-latent tokens; choose a size that is a multiple of {s * self.packing} latents")
        low = resample.pick(grid, s)
        call = dict(bound)
        call[self.hidden_arg] = self._from_grid(low, run)
        if self.positions is not None:
            call.update(self.positions(bound, (low.shape[-2] // self.packing, low.shape[-1] // self.packing)))
        out = inner(**call)
        sample = out[0] if isinstance(out, tuple) else out.sample
        if self.packing != 1:
            sample = resample.unpack(sample, low.shape[-2], low.shape[-1], self.packing)
        full = self._from_grid(resample.up(sample, s), run)
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.sample = full
        return out

    def _read_full(self, bound: dict) -> tuple[int, int]:
        ids = bound.get("img_ids")
        if ids is None:
            raise UnsupportedModelError("bottleneck: packed latents but no img_ids to read their grid from")
        ids = ids[0] if ids.ndim == 3 else ids
        return (int(ids[:, 1].max()) + 1) * self.packing, (int(ids[:, 2].max()) + 1) * self.packing

    def _require_run(self) -> _Run:
        run = self.run
        if run is None:
            raise UnsupportedModelError(
                "bottleneck: the denoiser was called before the pipeline's scheduler set its timesteps; "
                "resolution-bottleneck sampling drives a pipeline's call (apply fastdiff to the pipeline)")
        return run

    def step(self, signature: inspect.Signature, inner, args, kwargs):
        run = self._require_run()
        b = signature.bind(*args, **kwargs)
        b.apply_defaults()
        a = dict(b.arguments)
        a.pop("self", None)
        v, sample = a.pop("model_output"), a.pop("sample")
        t = a.pop("timestep")
        if run.step == 0:
            run.first = sample.detach().clone()
        k = run.stage_of(run.step)
        s = self.stages[k].scale
        full_grid = self._to_grid(sample, run)
        y, vy = resample.pick(full_grid, s), resample.pick(self._to_grid(v, run), s)
        last_in_stage = k + 1 < len(self.stages) and run.step == run.bounds[k + 1] - 1
        out = inner(vy, t, y, **a)
        if last_in_stage:
            sigma = float(run.sigmas[run.step])
            x0 = y.float() - sigma * vy.float()  # the flow-matching clean estimate at this step
            nxt = self.stages[k + 1]
            h, w = full_grid.shape[-2:]
            x0 = resample.resize(x0, (h // nxt.scale, w // nxt.scale), self.resize)
            sig = float(run.sigmas[run.step + 1])
            noise = resample.row_noise(self._to_grid(run.first, run), x0.shape, k + 1, x0.dtype, x0.device)
            prev = ((1 - sig) * x0 + sig * noise).to(sample.dtype)
            grid_next = resample.up(prev, nxt.scale)
            if self.on_stage is not None:
                self.on_stage(k + 1)
        else:
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            grid_next = resample.up(prev, s)
        run.step += 1
        full = self._from_grid(grid_next, run)
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.prev_sample = full
        return out
