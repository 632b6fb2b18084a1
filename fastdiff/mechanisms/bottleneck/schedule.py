"""Stage schedules of resolution-bottleneck sampling, as data and pure arithmetic over the pipeline's scheduler.

A run of N steps is cut into stages; each stage denoises at its own latent scale (1 = full size, 2 = half the
side), from its own starting noise level (`strength`) down to a clean estimate. The scheduler's own `set_timesteps`
makes each stage's schedule, so its spacing, shift type, terminal handling and timestep scale are its own.

FlowMatchEuler (stateless): each stage on its own shifted sigma schedule (the shift the scheduler gives that
stage's token count, or a fixed `shift`), all of them one flat schedule. Whether the strength w is the stage's first
sigma (`strength_is="sigma"`) or the unshifted time the shift is then applied to (`"time"`, as Bottleneck
Sampling's code does it) is an option: the two differ by the stage's shift.

DDIM, DPM-Solver, Euler, UniPC (stateful): below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import ConfigError

STRENGTH_RULES = ("sigma", "time")


@dataclass(frozen=True)
class Stage:
    """One stage.

    Args:
        scale: latent downscale factor of the stage (1: full size; 2: half the height and width).
        steps: a fraction of the run's steps (a float in (0, 1]) or a count (an int >= 1).
        strength: the noise level the stage starts from, in (0, 1]; 1 (pure noise) is only for a first stage. With
            a stateful sampler, img2img's strength: the stage runs the last `strength` of its own schedule.
        shift: a fixed flow shift for this stage (FlowMatchEuler); None: the scheduler's own rule at this stage's
            token count.
    """

    scale: int = 1
    steps: float = 0.5
    strength: float = 1.0
    shift: float | None = None


def split_steps(total: int, stages: tuple[Stage, ...]) -> list[int]:
    """Steps per stage for a run of `total` steps: counts as given, fractions of what is left by largest
    remainder; every stage gets at least one. ConfigError when the run is too short for the stages."""
    for s in stages:
        bad = s.steps < 1 if isinstance(s.steps, int) else not 0 < s.steps <= 1
        if isinstance(s.steps, bool) or not isinstance(s.steps, (int, float)) or bad:
            raise ConfigError(f"bottleneck: a stage's steps is a fraction in (0, 1] or a count >= 1, got {s.steps!r}")
    fixed = [s.steps if isinstance(s.steps, int) else None for s in stages]
    left = total - sum(f for f in fixed if f is not None)
    fracs = [(i, s.steps) for i, (s, f) in enumerate(zip(stages, fixed)) if f is None]
    if left < len(fracs) or (not fracs and left != 0):
        raise ConfigError(f"bottleneck: {total} steps cannot be split into stages {[s.steps for s in stages]} "
                          f"(every stage needs at least one step; fixed counts must add up to at most the run)")
    if fracs:
        weight = sum(f for _, f in fracs)
        raw = {i: left * f / weight for i, f in fracs}
        counts = {i: max(1, math.floor(r)) for i, r in raw.items()}
        order = sorted(raw, key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
        k = 0
        while sum(counts.values()) < left:
            counts[order[k % len(order)]] += 1
            k += 1
        while sum(counts.values()) > left:  # the max(1, ...) floors took more than there was
            i = max(counts, key=lambda i: (counts[i], -raw[i]))
            counts[i] -= 1
    return [int(f) if f is not None else counts[i] for i, f in enumerate(fixed)]


# (base tokens, max tokens, base mu, max mu): diffusers' flow pipelines' defaults, also ComfyUI's ModelSamplingFlux's
DYNAMIC_RULE = (256, 4096, 0.5, 1.15)


def _dynamic_rule(cfg) -> tuple[float, float, float, float]:
    """(base tokens, max tokens, base mu, max mu) of a dynamic-shift scheduler: mu is linear in the token count
    between the two, as diffusers' flow pipelines compute it (with their defaults, `DYNAMIC_RULE`)."""
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    return tuple(cfg.get(k, d) for k, d in zip(keys, DYNAMIC_RULE))


def tokens_of_mu(scheduler, mu: float) -> int:
    """The token count a pipeline's `mu` stands for (the inverse of the dynamic rule)."""
    base, top, lo, hi = _dynamic_rule(scheduler.config)
    return round(base + (float(mu) - lo) * (top - base) / (hi - lo))


def shift_factor(scheduler, tokens: int, shift: float | None) -> float:
    """The factor S of the flow shift sigma = S t / (1 + (S - 1) t) the scheduler applies at `tokens` image tokens
    (its dynamic rule, `_dynamic_rule`), or `shift`."""
    cfg = scheduler.config
    if shift is not None:
        return float(shift)
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    base, top, lo, hi = _dynamic_rule(cfg)
    mu = lo + (hi - lo) * (tokens - base) / (top - base)
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu


def stage_sigmas(scheduler, stage: Stage, steps: int, tokens: int, strength_is: str = "time") -> torch.Tensor:
    """The `steps` sigmas the stage is evaluated at (its terminal 0 left out), made by the scheduler's own
    `set_timesteps` on a fresh copy of it."""
    if strength_is not in STRENGTH_RULES:
        raise ConfigError(f"bottleneck: strength_is must be one of {STRENGTH_RULES}, got {strength_is!r}")
    s = shift_factor(scheduler, tokens, stage.shift)
    w = float(stage.strength)
    start = w if strength_is == "time" else w / (s - (s - 1) * w)  # the time whose shifted sigma is w
    grid = torch.linspace(start, 0.0, steps + 1)[:-1].tolist()
    fresh = type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False, shift=s)
    fresh.set_timesteps(sigmas=grid)
    return fresh.sigmas[:-1].float()


def flat_schedule(scheduler, stages: tuple[Stage, ...], counts: list[int], full_tokens: int,
                  strength_is: str = "time") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas with the terminal 0, timesteps) of the whole run, stage after stage, in the scheduler's units."""
    parts = [stage_sigmas(scheduler, st, n, max(1, full_tokens // st.scale ** 2), strength_is)
             for st, n in zip(stages, counts)]
    sigmas = torch.cat([*parts, torch.zeros(1)])
    return sigmas, sigmas[:-1] * scheduler.config.num_train_timesteps


# -- samplers whose solver keeps state: each stage is its own schedule ---------------------------------------------
#
# DDIM, DPM-Solver++, Euler and UniPC keep state across steps (the multistep solvers their last model outputs), and
# their schedules are their own rules of a step count, so a stage is what an img2img call of the scheduler is: the
# scheduler's `set_timesteps` for N steps, entered at `begin` so that the stage runs its n steps from about its
# strength down (n / N = strength, rounded; below 1 whenever the strength is). `set_timesteps` resets the solver's
# state, so each stage starts as a first-order solver by construction.

STAGED_SAMPLERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


def sampler_problem(scheduler) -> str | None:
    """Why a sampler of STAGED_SAMPLERS cannot run stages (None: it can): a stochastic step (its noise is not the
    run's per-row noise), a prediction type without a clean estimate, or per-step dynamic thresholding."""
    cfg = scheduler.config
    if str(cfg.get("algorithm_type", "")).startswith("sde"):
        return f"its algorithm_type {cfg.get('algorithm_type')!r} is stochastic (use 'dpmsolver++' or 'dpmsolver')"
    if cfg.get("prediction_type", "epsilon") not in PREDICTIONS:
        return f"its prediction_type {cfg.get('prediction_type')!r} is not one of {PREDICTIONS}"
    if cfg.get("thresholding", False):
        return "it thresholds each step's clean estimate (thresholding=True), which a stage boundary would not repeat"
    return None


@dataclass(frozen=True)
class StageSchedule:
    """One stage of a stateful sampler: the scheduler's schedule for `total` steps, entered at `begin`.

    timesteps: the scheduler's whole schedule (what its solver indexes); the stage runs `timesteps[begin:]`.
    alpha, sigma: x = alpha x0 + sigma noise at each of the stage's steps (the sampler's own noise levels).
    """

    total: int
    begin: int
    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def steps(self) -> torch.Tensor:
        return self.timesteps[self.begin:]


def stage_length(steps: int, strength: float) -> tuple[int, int]:
    """(N, begin): the schedule of N steps whose last `steps` start nearest `strength` (n / N), below 1 when the
    strength is."""
    if strength >= 1:
        return steps, 0
    total = max(steps + 1, round(steps / strength))
    return total, total - steps


def _noise_levels(scheduler, begin: int, steps: int, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = scheduler.config
    if type(scheduler).__name__ == "DDIMScheduler":  # no sigmas: the noise schedule at the timestep itself
        a = scheduler.alphas_cumprod[timesteps[begin:].long().cpu()].double()
        return a.sqrt(), (1 - a).sqrt()
    s = scheduler.sigmas[begin:begin + steps].double().cpu()
    if cfg.get("use_flow_sigmas", False):
        return 1 - s, s
    alpha = 1 / (s ** 2 + 1).sqrt()
    return alpha, s * alpha


def enter_stage(scheduler, call: dict, steps: int, strength: float) -> StageSchedule:
    """Set `scheduler` for a stage of `steps` steps from `strength`: its class's own `set_timesteps` with the call's
    arguments (`call`: the pipeline's, bound by name) for N steps, and its begin index (as img2img pipelines do).
    The class's methods, not the instance's attributes: hooks on the instance (the step clock's, this driver's)
    hear nothing, since the stage is not a new run."""
    total, begin = stage_length(steps, strength)
    cls = type(scheduler)
    cls.set_timesteps(scheduler, **{**call, "num_inference_steps": total})
    if hasattr(cls, "set_begin_index"):
        cls.set_begin_index(scheduler, begin)
    ts = scheduler.timesteps
    alpha, sigma = _noise_levels(scheduler, begin, steps, ts)
    return StageSchedule(total, begin, ts, alpha, sigma)


def stage_schedules(scheduler, call: dict, stages: tuple[Stage, ...], counts: list[int]) -> list[StageSchedule]:
    """Every stage's schedule, made on a fresh copy of `scheduler` (its config, the call's arguments): pure."""
    fresh = type(scheduler).from_config(scheduler.config)
    return [enter_stage(fresh, call, n, st.strength) for st, n in zip(stages, counts)]


def clean_estimate(scheduler, output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """x0 from a model output at a step with noise levels (alpha, sigma), by the scheduler's prediction type, in
    float32. Euler's samples are in sigma space (x = x0 + (sigma / alpha) noise); the others' x = alpha x0 + sigma
    noise (flow: alpha = 1 - sigma). A learned-variance output (twice the channels) gives its first half."""
    cfg = scheduler.config
    e, x = output.float(), sample.float()
    if e.shape[1] != x.shape[1]:
        e = e[:, :x.shape[1]]
    if type(scheduler).__name__ == "EulerDiscreteScheduler":
        x = x * alpha  # to the x = alpha x0 + sigma noise the model's input was scaled to
    kind = cfg.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0 = (x - sigma * e) / alpha
    elif kind == "v_prediction":
        x0 = alpha * x - sigma * e
    elif kind == "flow_prediction":
        x0 = x - sigma * e
    else:
        x0 = e
    if cfg.get("clip_sample", False):
        r = cfg.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-r, r)
    return x0
