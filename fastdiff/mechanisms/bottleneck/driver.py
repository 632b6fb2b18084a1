"""The resolution-bottleneck driver: one pipeline call, several stages at their own latent sizes.

It lives on the pipeline's scheduler and the denoiser's forward, nothing else (the pipeline's class and loop are
untouched, so `pipe(...)` as usual runs the stages):

- `set_timesteps`: after the scheduler made the pipeline's schedule, the pipeline is handed the stages' timesteps
  back to back (same total steps). How a stage is scheduled depends on the sampler (`schedule.py`):
  FlowMatchEuler is stateless, so one flat sigma schedule holds every stage (each from its strength down, with its
  own shift); DDIM, DPM-Solver, Euler and UniPC keep state, so each stage is the scheduler's own schedule for its
  step count, entered part-way as img2img does (`enter_stage`), and the scheduler is set anew at each stage's start:
  the solver's history (DPM/UniPC model outputs, lower-order warm-up, step index) restarts per stage by construction.
- the denoiser's forward: in a stage at scale s it sees `pick(latents, s)` and, for families whose pipeline passes
  positions or sizes in (FLUX `img_ids`, SDXL `time_ids`), those rebuilt for that grid (adapter data); its output
  goes back nearest-upsampled, so the pipeline's CFG arithmetic works on full-size tensors it never notices are
  blocky.
- `step`: the scheduler's own update runs on the stage's latents (`pick` of what the pipeline holds); at a stage's
  last step the clean estimate (by the sampler's prediction type: `schedule.clean_estimate`) is resized smoothly to
  the next stage's size and re-noised at that stage's first timestep with fresh noise (per row, from the row's
  starting noise: `resample.row_noise`), through the sampler's own noise rule (`add_noise`; flow: (1-s) x0 + s n).

`pick(up(y)) == y` exactly and each update is elementwise, so within a stage nothing is approximated beyond the
stage itself. Samplers whose steps draw noise (ancestral, SDE, DDIM with eta > 0) are refused.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import ConfigError, UnsupportedModelError
from . import resample
from .schedule import (
    STAGED_SAMPLERS,
    Stage,
    StageSchedule,
    clean_estimate,
    enter_stage,
    flat_schedule,
    sampler_problem,
    split_steps,
    stage_schedules,
    tokens_of_mu,
)

# samplers whose step is x_next = x + (sigma_next - sigma) v on a velocity prediction: one flat schedule
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SAMPLERS = FLOW_SCHEDULERS + STAGED_SAMPLERS
# step arguments that make a supported sampler draw noise of its own
_STOCHASTIC = {"eta": 0.0, "s_churn": 0.0, "variance_noise": None}


@dataclass
class _Run:
    """One pipeline call's stage bookkeeping (per thread: two threads sampling at once each have their own)."""

    counts: list[int]
    bounds: list[int]  # first step of each stage
    sigmas: torch.Tensor | None  # a flat schedule's sigmas (FlowMatchEuler); None for a stateful sampler
    step: int = 0
    first: torch.Tensor | None = None  # the run's starting latents (the pipeline's noise), for re-noising
    full: tuple[int, int] | None = None  # full latent (H, W) of a packed family, read off the positions
    scheduler: Any = None
    call: dict | None = None  # a stateful sampler's set_timesteps arguments (the pipeline's, by name)
    plans: list[StageSchedule] | None = None  # a stateful sampler's stage schedules
    checked: bool = False  # the latent size was checked against every stage
    start: float | None = None  # the run's first timestep, where the pipeline's first step must be

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
        positions: (bound call args, (h, w) token grid) -> the call args that carry positions or sizes for that
            grid (FLUX: `img_ids`, SDXL: `time_ids`), or None when the model derives them from the shape.
        multiple: what a stage's latent height and width must divide by besides packing (a UNet's downsampling,
            a patch size).
        hidden_arg: the denoiser's latent argument.
        on_stage: called with the stage index when a stage begins inside a run (the step clock's `begin_stage`).
    """

    stages: tuple[Stage, ...]
    resize: str = "bicubic"
    strength_is: str = "time"
    packing: int = 1
    positions: Callable[[dict, tuple[int, int]], dict] | None = None
    multiple: int = 1
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
        if name not in SAMPLERS:
            raise UnsupportedModelError(
                f"{owner}: resolution-bottleneck sampling re-noises each stage's clean estimate through the sampler's "
                f"own noise rule and restarts its state per stage; it runs the deterministic samplers "
                f"{', '.join(SAMPLERS)}, and {pipeline} samples with {name}")
        problem = sampler_problem(scheduler) if name in STAGED_SAMPLERS else None
        if problem is not None:
            raise UnsupportedModelError(f"{owner}: resolution-bottleneck sampling cannot run {pipeline}'s {name}: "
                                        f"{problem}")

    def check_stages(self, scheduler: Any, owner: str) -> None:
        """What the stages ask of the sampler: a stateful one schedules each stage by its own rule from a step count,
        so a per-stage shift or a strength read as a sigma is FlowMatchEuler's alone, and the first stage starts from
        the pipeline's noise."""
        name = type(scheduler).__name__
        if name not in STAGED_SAMPLERS:
            return
        shifted = [i for i, st in enumerate(self.stages) if st.shift is not None]
        why = (f"stages {shifted} set a shift" if shifted else
               f"strength_is={self.strength_is!r}" if self.strength_is != "time" else
               f"the first stage's strength is {self.stages[0].strength}" if self.stages[0].strength != 1 else None)
        if why is not None:
            raise UnsupportedModelError(
                f"{owner}: resolution-bottleneck sampling with {name}: {why}; this sampler schedules each stage "
                f"img2img-style from its own config (strength = the fraction of the stage's schedule, "
                f"strength_is='time', no per-stage shift: that is for {', '.join(FLOW_SCHEDULERS)}), and the first "
                "stage starts from the pipeline's noise (strength 1)")

    # -- the run --------------------------------------------------------------------------------------
    @property
    def run(self) -> _Run | None:
        return getattr(self._local, "run", None)

    def set_timesteps(self, scheduler, inner, args, kwargs):
        if type(scheduler).__name__ in STAGED_SAMPLERS:
            return self._set_stages(scheduler, inner, args, kwargs)
        out = inner(*args, **kwargs)
        total = len(scheduler.timesteps)
        counts = split_steps(total, self.stages)
        tokens = self._full_tokens(scheduler, kwargs.get("mu"))
        sigmas, timesteps = flat_schedule(scheduler, self.stages, counts, tokens, self.strength_is)
        device = scheduler.timesteps.device
        scheduler.sigmas = sigmas.to(device=device, dtype=scheduler.sigmas.dtype)
        scheduler.timesteps = timesteps.to(device=device, dtype=scheduler.timesteps.dtype)
        bounds = [sum(counts[:k]) for k in range(len(counts))]
        self._local.run = _Run(counts, bounds, sigmas, start=float(timesteps[0]))
        return out

    def _set_stages(self, scheduler, inner, args, kwargs):
        """A stateful sampler: every stage's schedule made now (pure, on a copy), the scheduler entered at the first
        stage (the pipeline scales its starting noise by that stage's `init_noise_sigma`), and the pipeline handed
        the stages' timesteps back to back; the scheduler's own schedule returns at the first step."""
        out = inner(*args, **kwargs)
        name = type(scheduler).__name__
        call = inspect.signature(type(scheduler).set_timesteps).bind(scheduler, *args, **kwargs).arguments
        call.pop("self", None)
        custom = sorted(k for k in ("timesteps", "sigmas") if call.pop(k, None) is not None)
        if custom:
            raise UnsupportedModelError(
                f"bottleneck: the pipeline passed {custom} to {name}.set_timesteps; with {name} each stage is the "
                "scheduler's own schedule for its step count: pass num_inference_steps only")
        call.pop("num_inference_steps", None)
        counts = split_steps(len(scheduler.timesteps), self.stages)
        plans = stage_schedules(scheduler, call, self.stages, counts)
        enter_stage(scheduler, call, counts[0], self.stages[0].strength)
        scheduler.timesteps = torch.cat([p.steps for p in plans]).to(scheduler.timesteps.device)
        bounds = [sum(counts[:k]) for k in range(len(counts))]
        self._local.run = _Run(counts, bounds, None, scheduler=scheduler, call=call, plans=plans,
                               start=float(plans[0].steps[0]))
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
        if s == 1 and run.checked:
            return inner(*args, **kwargs)
        bound = bind(args, kwargs)
        if not run.checked:  # the run's first call: every stage's size, before any stage runs
            if self.packing != 1:
                run.full = self._read_full(bound)
            self._check_size(run.full if self.packing != 1 else tuple(bound[self.hidden_arg].shape[-2:]))
            run.checked = True
        if s == 1:
            return inner(*args, **kwargs)
        grid = self._to_grid(bound[self.hidden_arg], run)
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

    def _check_size(self, hw: tuple[int, int]) -> None:
        for st in self.stages:
            m = st.scale * self.packing * self.multiple
            if st.scale != 1 and (hw[0] % m or hw[1] % m):
                raise ConfigError(
                    f"bottleneck: latents of {tuple(hw)} do not divide into stage scale {st.scale} x {self.packing} "
                    f"latents per token x {self.multiple} (the denoiser's own downsampling or patch); choose a size "
                    f"whose latent height and width are multiples of {m}")

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
            if run.start is not None and abs(float(t) - run.start) > 1e-6 * max(1.0, abs(run.start)):
                raise UnsupportedModelError(
                    f"bottleneck: the pipeline's first step is at timestep {float(t):g}, not at the schedule's first "
                    f"({run.start:g}): it starts part-way (img2img, inpainting, a denoising_start); resolution-"
                    "bottleneck sampling runs a call's whole schedule from noise")
            run.first = sample.detach().clone()
            if run.plans is not None:
                self._check_deterministic(run, a)
                run.scheduler.timesteps = run.plans[0].timesteps  # the stage's own schedule, which its solver indexes
        k = run.stage_of(run.step)
        s = self.stages[k].scale
        full_grid = self._to_grid(sample, run)
        y, vy = resample.pick(full_grid, s), resample.pick(self._to_grid(v, run), s)
        last_in_stage = k + 1 < len(self.stages) and run.step == run.bounds[k + 1] - 1
        out = inner(vy, t, y, **a)
        if last_in_stage:
            nxt = self.stages[k + 1]
            h, w = full_grid.shape[-2:]
            if run.plans is None:
                sigma = float(run.sigmas[run.step])
                x0 = y.float() - sigma * vy.float()  # the flow-matching clean estimate at this step
            else:
                plan, j = run.plans[k], run.step - run.bounds[k]
                x0 = clean_estimate(run.scheduler, vy, y, float(plan.alpha[j]), float(plan.sigma[j]))
            x0 = resample.resize(x0, (h // nxt.scale, w // nxt.scale), self.resize)
            noise = resample.row_noise(self._to_grid(run.first, run), x0.shape, k + 1, x0.dtype, x0.device)
            if run.plans is None:
                sig = float(run.sigmas[run.step + 1])
                prev = ((1 - sig) * x0 + sig * noise).to(sample.dtype)
            else:  # the sampler's own noise rule at the next stage's first timestep, the scheduler entered there
                plan = enter_stage(run.scheduler, run.call, run.counts[k + 1], nxt.strength)
                prev = run.scheduler.add_noise(x0, noise, plan.steps[:1]).to(sample.dtype)
            grid_next = resample.up(prev, nxt.scale)
            if self.on_stage is not None:
                self.on_stage(k + 1)
        else:
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            grid_next = resample.up(prev, s)
        run.step += 1
        full = self._from_grid(grid_next, run)
        if isinstance(out, tuple):
            return (full, *(self._lift(o, y, s, run) for o in out[1:]))
        out.prev_sample = full
        if getattr(out, "pred_original_sample", None) is not None:  # DDIM, Euler: the step's x0, at full size too
            out.pred_original_sample = self._lift(out.pred_original_sample, y, s, run)
        return out

    def _lift(self, x, y: torch.Tensor, s: int, run: _Run):
        """A tensor the step returned at the stage's size, as the pipeline's full-size latents hold it."""
        if not torch.is_tensor(x) or x.shape != y.shape:
            return x
        return self._from_grid(resample.up(x, s), run)

    @staticmethod
    def _check_deterministic(run: _Run, step_args: dict) -> None:
        drawn = sorted(k for k, off in _STOCHASTIC.items() if step_args.get(k) is not None
                       and (off is None or float(step_args[k]) != off))
        if drawn:
            raise UnsupportedModelError(
                f"bottleneck: the pipeline steps {type(run.scheduler).__name__} with {drawn}, which draw noise of "
                "their own each step; resolution-bottleneck sampling runs deterministic steps (eta=0, s_churn=0) "
                "and re-noises only at stage boundaries")
