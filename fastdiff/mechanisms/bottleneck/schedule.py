"""Stage schedules of resolution-bottleneck sampling, as data and pure arithmetic over a flow-matching scheduler.

A run of N steps is cut into stages; each stage denoises at its own latent scale (1 = full size, 2 = half the
side), from its own starting noise level (`strength`) down to a clean estimate, on its own shifted sigma schedule
(the shift a flow-matching scheduler gives that stage's token count, or a fixed `shift`). The scheduler's own
`set_timesteps` makes each stage's sigmas, so its shift type, terminal handling and timestep scale are its own.

Strength: whether w is the stage's first sigma (`strength_is="sigma"`) or the unshifted time the shift is then
applied to (`"time"`, as Bottleneck Sampling's code does it) is an option: the two differ by the stage's shift.
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
        strength: the noise level the stage starts from, in (0, 1]; 1 (pure noise) is only for a first stage.
        shift: a fixed flow shift for this stage; None: the scheduler's own rule at this stage's token count.
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


def _dynamic_rule(cfg) -> tuple[float, float, float, float]:
    """(base tokens, max tokens, base mu, max mu) of a dynamic-shift scheduler: mu is linear in the token count
    between the two, as diffusers' flow pipelines compute it (with their defaults)."""
    return (cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15))


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
