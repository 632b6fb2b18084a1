"""From "I want 2x" to a config: the planner picks the knob value that reaches a target speedup.

Schedules fixed in advance (static interval, Δ-DiT, CFG skipping from a step) are planned from the cost
model alone (`fastdiff.estimate`, no model run). Dynamic policies (residual, EasyCache) skip as much as the
model lets them, so their threshold is tuned on the user's own call: a few sampling runs, bisecting the
threshold until the run's accounted FLOPs speedup (`summary().estimated_speedup`) reaches the target.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from .config import FastDiffConfig
from .cost.estimate import check_int, check_run
from .errors import ConfigError
from .mechanisms.caching.policies import POLICIES

SHAPE_KEYS = ("height", "width", "steps", "num_frames", "batch", "cfg", "text_tokens")  # fastdiff.estimate's


@dataclass
class Plan:
    """The chosen config and what it is expected to do."""

    config: FastDiffConfig
    target: float
    speedup: float  # predicted (static) or measured FLOPs speedup on the tuning call (dynamic)
    knob: str
    value: float
    runs: int  # sampling runs spent tuning (0 when planned from the cost model alone)
    trace: list[tuple[float, float]]  # (knob value, speedup) tried


def plan(pipe: Any, config: Any, *, target: float, call: Callable[[], Any] | None = None, tolerance: float = 0.05,
         max_runs: int = 10, **shape) -> Plan:
    """A config reaching `target` FLOPs speedup (the closest not above it when it cannot be reached exactly).

    Args:
        pipe: the diffusers pipeline (or denoiser) the config is for.
        config: anything `fastdiff.load_config` takes; its cache policy decides which knob is planned:
            static/delta -> cache.interval, residual/easycache -> cache.threshold (needs `call`).
        target: wanted speedup over dense, e.g. 2.0.
        call: `lambda: pipe(**kwargs)` — one representative sampling call, needed for dynamic policies.
        shape: for static schedules, `fastdiff.estimate`'s size arguments (height, width, steps, ...).
    """
    import fastdiff

    _check_real("target speedup", target, 1.0, 100.0)
    _check_real("tolerance", tolerance, 0.0, 0.5)
    check_int("max_runs", max_runs, 1, 100)
    if call is not None and not callable(call):
        raise ConfigError(f"call must be a function of no arguments (e.g. lambda: pipe(**kwargs)), got "
                          f"{type(call).__name__}")
    unknown = sorted(set(shape) - set(SHAPE_KEYS))
    if unknown:
        raise ConfigError(f"plan() got unknown size argument(s) {unknown}; fastdiff.estimate's are {list(SHAPE_KEYS)}")
    cfg = fastdiff.load_config(config)
    if cfg.cache is None:
        raise ConfigError("plan() tunes the cache section: give a config with a cache policy")
    if not POLICIES[cfg.cache.policy].adaptive:
        missing = [k for k in ("height", "width", "steps") if k not in shape]
        if missing:
            raise ConfigError(f"cache policy '{cfg.cache.policy}' is planned from the cost model: plan() needs the "
                              f"run's size, missing {missing} (fastdiff.estimate's arguments)")
        check_run(**{"num_frames": None, "batch": 1, "cfg": True, "text_tokens": None, **shape})
        trace = []
        for interval in range(1, 101):
            c = cfg.merged({"cache": {"interval": interval}})
            speed = fastdiff.estimate(pipe, c, **shape).speedup
            trace.append((float(interval), speed))
            if speed >= target * (1 - tolerance) or (len(trace) > 1 and speed <= trace[-2][1]):
                break
        value, speed = min(trace, key=lambda t: abs(t[1] - target))
        return Plan(cfg.merged({"cache": {"interval": int(value)}}), target, speed, "cache.interval", value, 0, trace)
    if call is None:
        raise ConfigError(f"cache policy '{cfg.cache.policy}' adapts to the model: plan() needs `call`, "
                          "one representative sampling call (e.g. lambda: pipe(**kwargs)) to tune its threshold on")
    if shape:  # the call fixes the size; sizes given here would be ignored
        raise ConfigError(f"cache policy '{cfg.cache.policy}' is tuned on `call`, which fixes the run's size: "
                          f"drop the size argument(s) {sorted(shape)}")
    trace: list[tuple[float, float]] = []

    def measure(threshold: float) -> float:
        c = cfg.merged({"cache": {"threshold": threshold}})
        with fastdiff.accelerated(pipe, c) as handle:
            call()
            speed = handle.summary().estimated_speedup
        trace.append((threshold, speed))
        return speed

    lo, hi = 0.0, 0.05
    while measure(hi) < target and hi < 10 and len(trace) < max_runs:  # grow until the target is bracketed
        if len(trace) >= 2 and 1.0 < trace[-1][1] <= trace[-2][1]:
            break  # a plateau: warm-up, cool-down and max_skip cap what this policy can skip
        lo, hi = hi, min(10.0, hi * 3)
    bracketed = trace[-1][1] >= target
    while bracketed and len(trace) < max_runs:
        best = min(trace, key=lambda t: abs(t[1] - target))
        if abs(best[1] - target) <= tolerance * target:
            break
        mid = (lo + hi) / 2
        if measure(mid) < target:
            lo = mid
        else:
            hi = mid
    reached = [t for t in trace if t[1] <= target * (1 + tolerance)] or trace
    value, speed = max(reached, key=lambda t: (t[1], -t[0]))
    return Plan(cfg.merged({"cache": {"threshold": value}}), target, speed, "cache.threshold", value, len(trace), trace)


def _check_real(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r:.40}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}], got {value}")


def calibrate(pipe: Any, call: Callable[[], Any], *, head: int = 1, degree: int = 2) -> list[float]:
    """Fit the residual policy's `rescale` polynomial on one dense run of `call` (TeaCache-style calibration).

    Every step is computed (threshold 0) while the change of the first `head` blocks' residual (the policy's
    signal) and the change of the cached span's own residual are recorded step to step; a least-squares
    polynomial of `degree` maps the first to the second. With it, `cache.threshold` is a bound on the
    accumulated change of what is reused rather than of its proxy.
    """
    import numpy as np

    import fastdiff

    if not callable(call):
        raise ConfigError(f"call must be a function of no arguments (e.g. lambda: pipe(**kwargs)), got "
                          f"{type(call).__name__}")
    check_int("head", head, 1)
    check_int("degree", degree, 1, 5)
    cfg = {"cache": {"policy": "residual", "head": head, "threshold": 0.0}}
    with fastdiff.accelerated(pipe, cfg) as handle:
        cache = next(m for m in handle.mechanisms if m.name == "cache")
        cache.trace = []
        call()
        pairs = cache.trace
    if len(pairs) < degree + 2:
        raise ConfigError(f"calibrate: the run gave {len(pairs)} step pairs, too few for a degree-{degree} fit; "
                          "use more steps")
    x, y = np.array(pairs).T
    return [float(c) for c in np.polyfit(x, y, degree)]
