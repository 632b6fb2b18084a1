"""From "I want 3x" (or "under 2 s") to a config.

`plan(pipe, speedup=3.0, height=..., width=..., steps=...)` searches the whole space: every measured setting of
caching, CFG skipping, token merging, sparse attention and resolution-bottleneck sampling, composed one per
mechanism, for the most expected fidelity whose *predicted wall time* (`fastdiff.estimate`'s latency model) meets
the target. Expected fidelity comes from `fastdiff/configs/fidelity.json` (PSNR against dense and class accuracy,
measured on the trained references; `python -m fastdiff.eval.build_fidelity` rebuilds it): the median of the
points of references with the same denoiser class, else the worst point of the others. Errors of composed
mechanisms are taken to add as independent noise (their mean squared errors sum). The plan comes from the cost
model and the table alone (no model run), optionally refined by probe runs of the user's own call (`call=`); a
target that cannot be reached is refused, before anything runs, naming the reachable range.

`plan(pipe, config, target=2.0)` tunes one caching knob of a given config against FLOPs: schedules fixed in
advance (static interval, Δ-DiT) from the cost model alone; dynamic policies (residual, EasyCache) by bisecting
their threshold on the user's own call until the run's accounted FLOPs speedup reaches the target.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from .config import SECTIONS, FastDiffConfig
from .context import TokenLayout
from .cost import latency
from .cost.estimate import Estimate, check_int, check_run, dense_table, schedule, token_patch
from .cost.latency import Calibration, Coefficients, LatencyModel, cache_path, device_key, features, fit, model_key
from .cost.model import CostModel, Reduction
from .errors import ConfigError, FastDiffError
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
    # whole-space plans (speedup= / latency=): predicted wall time, expected fidelity, what was chosen and why not
    seconds: float | None = None  # predicted seconds of the call's denoiser calls with `config`
    dense_seconds: float | None = None  # and of the bare model
    psnr: float | None = None  # expected dB against dense (inf: exact)
    accuracy: float | None = None  # expected class accuracy (product of the options' measured ones)
    choices: tuple[str, ...] = ()  # the options composed, "mechanism: setting"
    latency: str = ""  # the latency calibration that priced it
    notes: tuple[str, ...] = ()  # options left out and why (does not pay at this size, unsupported)


def plan(pipe: Any, config: Any = None, *, speedup: float | None = None, latency: float | None = None,
         target: float | None = None, call: Callable[[], Any] | None = None, tolerance: float = 0.05,
         max_runs: int = 10, mechanisms: tuple[str, ...] | None = None, calibration: Any = None, probes: int = 3,
         **shape) -> Plan:
    """A config for `pipe` at a target cost.

    Whole space (`speedup=` or `latency=`): the composition of measured settings with the most expected fidelity
    whose predicted wall time is at most the dense time / `speedup` (or `latency` seconds for the run's denoiser
    calls), within `tolerance`. Needs the call's size: `height`, `width`, `steps` (and `batch`, `cfg`,
    `num_frames`, `text_tokens` as `fastdiff.estimate` takes them). `config` may only hold non-mechanism sections
    (telemetry, families); `mechanisms` limits the search (e.g. ("cache", "guidance")); `calibration` as in
    `fastdiff.estimate`. Runs no model; raises ConfigError naming the reachable speedups when the target cannot be
    met. The result's `config` is a FastDiffConfig (`to_yaml()`, `strify()`) to reuse without planning again.
    With `call` (`lambda: pipe(**kwargs)` returning tensors, e.g. output_type="pt" or "latent"), the `probes` best
    candidates by expected fidelity are refined on the user's own call: one dense run and one run of each, and the
    one with the highest measured PSNR against the dense output is chosen (`runs`, `trace`: (expected, measured)).

    One caching knob (`target=`, FLOPs): the config's cache policy decides which knob is planned: static/delta ->
    cache.interval from the cost model (give the size); residual/easycache -> cache.threshold, tuned on `call`
    (`lambda: pipe(**kwargs)`, one representative sampling call) to the closest FLOPs speedup not above `target`.
    """
    import fastdiff

    if speedup is not None or latency is not None:
        if target is not None:
            raise ConfigError("plan(speedup=/latency=) plans the whole space by predicted time: drop target= "
                              "(it tunes one caching knob by FLOPs)")
        return plan_space(pipe, config, speedup=speedup, latency=latency, tolerance=tolerance,
                          mechanisms=mechanisms, calibration=calibration, call=call, probes=probes, **shape)
    if target is None:
        raise ConfigError("plan() needs speedup= or latency= (the whole space, by predicted time) or target= "
                          "(one caching knob of `config`, by FLOPs)")
    if mechanisms is not None or calibration is not None or probes != 3:
        raise ConfigError("plan(target=) tunes the given config's cache knob: mechanisms=, calibration= and probes= "
                          "belong to plan(speedup=/latency=)")

    _check_real("target speedup", target, 1.0, 100.0)
    _check_real("tolerance", tolerance, 0.0, 0.5)
    check_int("max_runs", max_runs, 1, 100)
    _check_call_and_shape(call, shape)
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


def _check_call_and_shape(call: Any, shape: dict) -> None:
    if call is not None and not callable(call):
        raise ConfigError(f"call must be a function of no arguments (e.g. lambda: pipe(**kwargs)), got "
                          f"{type(call).__name__}")
    unknown = sorted(set(shape) - set(SHAPE_KEYS))
    if unknown:
        raise ConfigError(f"plan() got unknown size argument(s) {unknown}; fastdiff.estimate's are {list(SHAPE_KEYS)}")


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


# -- the whole space ---------------------------------------------------------------------------------------------

FIDELITY = "fidelity.json"
SPACE = ("bottleneck", "cache", "guidance", "merge", "sparse")  # mechanisms the planner composes


@dataclass(frozen=True)
class Option:
    """One setting of one mechanism (its config section) and its expected fidelity."""

    mechanism: str
    name: str
    section: dict
    psnr: float = math.inf  # dB against dense
    accuracy: float | None = 1.0
    basis: str = ""  # which measured points it rests on
    same_class: bool = True  # measured on a reference of the planned denoiser's class (else on others)

    @property
    def label(self) -> str:
        return f"{self.mechanism}: {self.name}"


def compose_psnr(psnrs) -> float:
    """PSNR of composed mechanisms whose errors add as independent noise: their mean squared errors sum."""
    mse = sum(10 ** (-p / 10) for p in psnrs if math.isfinite(p))
    return math.inf if mse == 0 else -10 * math.log10(mse)


@dataclass(frozen=True)
class Candidate:
    options: tuple[Option, ...]  # the mechanisms on, one option each
    seconds: float

    @property
    def psnr(self) -> float:
        return compose_psnr(o.psnr for o in self.options)

    @property
    def accuracy(self) -> float | None:
        known = [o.accuracy for o in self.options if o.accuracy is not None]
        return math.prod(known) if known else None

    def sections(self) -> dict:
        """The config sections, copied (the shipped table is shared by every plan)."""
        return {o.mechanism: copy.deepcopy(o.section) for o in self.options}


def search(options: dict[str, list[Option]], price: Callable[[dict], float], dense_seconds: float,
           budget: float, tolerance: float = 0.0, base_seconds: float | None = None) -> tuple[Candidate, list[str]]:
    """The best of `ranked(..., top=1)`: see there."""
    found, notes = ranked(options, price, dense_seconds, budget, tolerance, base_seconds, top=1)
    return found[0], notes


def ranked(options: dict[str, list[Option]], price: Callable[[dict], float], dense_seconds: float,
           budget: float, tolerance: float = 0.0, base_seconds: float | None = None,
           top: int = 1) -> tuple[list[Candidate], list[str]]:
    """The `top` compositions (at most one option per mechanism) with the highest expected PSNR whose
    `price(sections)` is at most `budget` (x (1 + tolerance)), best first; among equals, the fastest. Options that
    do not pay alone (priced at least `base_seconds`, the run with none of them, default `price({})`) or that
    `price` refuses (ConfigError / FastDiffError) are never picked; the returned notes say which and why.
    ConfigError naming the reachable speedup range when nothing meets the budget."""
    notes: list[str] = []
    base = price({}) if base_seconds is None else base_seconds
    kept: dict[str, list[tuple[Option, float]]] = {}
    for mechanism, opts in options.items():
        priced = []
        for opt in opts:
            try:
                t = price({mechanism: opt.section})
            except (ConfigError, FastDiffError) as err:
                notes.append(f"{opt.label}: not applicable ({str(err).splitlines()[0][:160]})")
                continue
            if t >= base:
                notes.append(f"{opt.label}: does not pay at this size (predicted {t:.4g} s, {base:.4g} s without)")
                continue
            priced.append((opt, t))
        # alone, an option slower and no better than another of its mechanism is never worth composing
        kept[mechanism] = [(o, t) for o, t in priced
                           if not any((t2 <= t and o2.psnr > o.psnr) or (t2 < t and o2.psnr >= o.psnr)
                                      for o2, t2 in priced)]
    lists = [[None] + [o for o, _ in kept[m]] for m in kept]
    combos = [tuple(o for o in combo if o is not None) for combo in itertools.product(*lists)]
    alone = {o.label: t for m in kept for o, t in kept[m]}
    combos.sort(key=lambda c: (-compose_psnr(o.psnr for o in c), sum(alone[o.label] - base for o in c)))
    limit = budget * (1 + tolerance)
    fastest: Candidate | None = None
    best: Candidate | None = None
    found: list[Candidate] = []  # feasible, one per fidelity level (the fastest of each), best first
    for combo in combos:
        psnr = compose_psnr(o.psnr for o in combo)
        if best is not None and psnr < best.psnr:
            found.append(best)
            best = None
            if len(found) >= top:
                break  # sorted by fidelity: nothing later is better
        try:
            t = base if not combo else price({o.mechanism: o.section for o in combo})
        except (ConfigError, FastDiffError) as err:
            notes.append(f"{' + '.join(o.label for o in combo)}: not composable ({str(err).splitlines()[0][:160]})")
            continue
        cand = Candidate(combo, t)
        if fastest is None or t < fastest.seconds:
            fastest = cand
        if t <= limit and (best is None or t < best.seconds):
            best = cand
    if best is not None and len(found) < top:
        found.append(best)
    if not found:
        reach = dense_seconds / fastest.seconds if fastest else 1.0
        raise ConfigError(
            f"the target ({dense_seconds / budget:.2f}x, {budget:.4g} s) cannot be reached on this call: predicted "
            f"reachable range 1.00x-{reach:.2f}x ({dense_seconds:.4g} s dense, fastest {fastest.seconds:.4g} s with "
            f"{', '.join(o.label for o in fastest.options) or 'nothing'})" if fastest else "nothing could be priced")
    return found, notes


@lru_cache(maxsize=1)
def fidelity_table() -> tuple[dict, ...]:
    """The shipped options and their measured points (`fastdiff/configs/fidelity.json`)."""
    text = (resources.files("fastdiff.configs") / FIDELITY).read_text()
    return tuple(json.loads(text)["options"])


def options_for(denoiser_class: str, mechanisms=SPACE, table=None) -> dict[str, list[Option]]:
    """Every shipped option of `mechanisms` with its expected PSNR and accuracy for a denoiser of this class: the
    median of the points measured on a reference of that class, else the worst over the other references (a
    setting's fidelity varies between models far more than between runs: see eval/results/merge-*)."""
    out: dict[str, list[Option]] = {m: [] for m in mechanisms}
    for entry in table if table is not None else fidelity_table():
        if entry["mechanism"] not in out:
            continue
        own = [p for p in entry["points"] if p["denoiser"] == denoiser_class]
        points = own or entry["points"]
        psnrs = [p["psnr"] for p in points if p["psnr"] is not None]
        accs = [p["accuracy"] for p in points if p["accuracy"] is not None]
        basis = ", ".join(sorted({p["reference"] for p in points}))
        pick = statistics.median if own else min  # measured on other models only: their worst, not their typical
        out[entry["mechanism"]].append(Option(entry["mechanism"], entry["name"], entry["section"],
                                              pick(psnrs) if psnrs else math.inf, pick(accs) if accs else None,
                                              basis, bool(own)))
    return out


def plan_space(pipe: Any, config: Any = None, *, speedup: float | None = None, latency: float | None = None,
               tolerance: float = 0.05, mechanisms: tuple[str, ...] | None = None, calibration: Any = None,
               call: Callable[[], Any] | None = None, probes: int = 3, **shape) -> Plan:
    """`plan(pipe, speedup=...)` / `plan(pipe, latency=...)`; see `plan`."""
    import fastdiff

    if (speedup is None) == (latency is None):
        raise ConfigError("give either speedup= (over the bare model) or latency= (seconds), not both")
    if speedup is not None:
        _check_real("speedup", speedup, 1.0, 100.0)
    else:
        _check_real("latency", latency, 1e-9, 1e9)
    _check_real("tolerance", tolerance, 0.0, 0.5)
    check_int("probes", probes, 1, 20)
    _check_call_and_shape(call, shape)
    missing = [k for k in ("height", "width", "steps") if k not in shape]
    if missing:
        raise ConfigError(f"plan(speedup=/latency=) prices the call: it needs the call's size, missing {missing} "
                          "(fastdiff.estimate's arguments)")
    run = {"num_frames": None, "batch": 1, "cfg": True, "text_tokens": None, **shape}
    check_run(**run)
    if mechanisms is None:
        mechanisms = SPACE
    if isinstance(mechanisms, str) or not set(mechanisms) <= set(SPACE) or not mechanisms:
        raise ConfigError(f"mechanisms must be a non-empty list of {list(SPACE)}, got {mechanisms!r:.80}")
    base = fastdiff.load_config(config)
    fixed = [name for name in SECTIONS if name != "telemetry" and getattr(base, name) is not None]
    if fixed:
        raise ConfigError(f"plan(speedup=/latency=) chooses the mechanisms itself: the config may hold only "
                          f"telemetry and families, got section(s) {fixed}")
    pricer = Pricer(pipe, batch=run["batch"], cfg=run["cfg"], text_tokens=run["text_tokens"], calibration=calibration)
    stages = [{k: run[k] for k in ("height", "width", "steps", "num_frames")}]
    options = options_for(type(pricer.denoiser).__name__, tuple(m for m in SPACE if m in mechanisms))
    notes = []
    if "guidance" in options and not _guidance_applies(pricer, run["cfg"]):
        notes += [f"{o.label}: not applicable (no CFG on this call, or its pipeline's CFG layout is unknown)"
                  for o in options.pop("guidance")]
    if "bottleneck" in options and pricer.adapter.spec.resample is None:
        notes += [f"{o.label}: not applicable ('{pricer.adapter.name}' latents cannot be resized)"
                  for o in options.pop("bottleneck")]

    def price(sections: dict) -> float:
        return pricer.estimate(base.merged(sections), stages).seconds

    empty = pricer.estimate(base, stages)
    dense = empty.dense_seconds
    budget = dense / speedup if speedup is not None else latency
    found, why = ranked(options, price, dense, budget, tolerance, empty.seconds, top=probes if call else 1)
    best, runs, trace = found[0], 0, []
    if call is not None:  # refine on the user's call: the candidate with the best measured PSNR against dense
        best, trace = _probe(pipe, base, found, call)
        runs = len(found) + 1
    cfg = base.merged(best.sections())
    est = pricer.estimate(cfg, stages)
    notes += [f"{o.label}: its expected fidelity was measured on {o.basis}, no {type(pricer.denoiser).__name__}"
              for o in best.options if not o.same_class]
    return Plan(cfg, dense / budget, dense / est.seconds, "space", best.psnr, runs, trace, est.seconds, dense,
                best.psnr, best.accuracy, tuple(o.label for o in best.options), pricer.calibration.source,
                tuple(notes + why))


def _probe(pipe: Any, base: FastDiffConfig, found: list[Candidate], call: Callable[[], Any]):
    """Run `call` dense and with each candidate; the one closest to dense (PSNR over the dense output's range)."""
    import fastdiff

    with torch.no_grad():
        dense = _as_tensor(call()).float()
        trace = []
        for cand in found:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # apply prices at the default size; this was priced at the call's
                with fastdiff.accelerated(pipe, base.merged(cand.sections())):
                    out = _as_tensor(call()).float()
            if out.shape != dense.shape:
                raise ConfigError(f"plan: the call returned {tuple(out.shape)} with {cand.sections()} and "
                                  f"{tuple(dense.shape)} without: the call must make the same output each time")
            mse = float(((out - dense) ** 2).mean())
            span = float(dense.max() - dense.min()) or 1.0
            trace.append((cand.psnr, math.inf if mse == 0 else 10 * math.log10(span ** 2 / mse)))
    best = max(range(len(found)), key=lambda i: (trace[i][1], -found[i].seconds))
    return found[best], trace


def _as_tensor(out: Any) -> torch.Tensor:
    """A pipeline call's output as one tensor (`.images` / `.frames` / the first of a tuple)."""
    import numpy as np

    for value in (out, getattr(out, "images", None), getattr(out, "frames", None),
                  out[0] if isinstance(out, (tuple, list)) and out else None):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
    raise ConfigError(f"plan(call=...): the call returned {type(out).__name__}, not tensors; call the pipeline with "
                      "output_type='pt' (or 'latent', or 'np')")


def _guidance_applies(pricer, cfg: bool) -> bool:
    """CFG skipping needs CFG and the branch of each row: from the pipeline's CFG layout or the inputs (as apply)."""
    spec = pricer.adapter.spec
    if not cfg:
        return False
    if pricer.pipeline is None:
        return spec.row_branches is not None
    return spec.cfg_layout(pricer.pipeline) is not None or spec.row_branches is not None


def unpaid(pipe_or_denoiser: Any, config: FastDiffConfig, steps: int = 20) -> list[str]:
    """What `apply` warns of: the merge and sparse sections of `config` predicted to make a run at the denoiser's
    default sample size (its config's `sample_size`) no faster than without them, each with the predicted times.
    Empty when neither section is set or the denoiser declares no default size (nothing to price at)."""
    from .integrations.diffusers import latent_dims
    from .mechanisms import registry

    sections = [(n, getattr(config, n)) for n in ("merge", "sparse") if getattr(config, n) is not None]
    if not sections:
        return []
    from . import adapters
    from .integrations.diffusers import find_parts

    if adapters.resolve(find_parts(pipe_or_denoiser)[1]).spec.layout is None:
        return []  # the auto fallback knows no token layout: the cost model cannot price it
    pricer = Pricer(pipe_or_denoiser, batch=1, cfg=False)
    size = getattr(getattr(pricer.denoiser, "config", None), "sample_size", None)
    size = size[0] if isinstance(size, (tuple, list)) and size else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return []
    spec = pricer.adapter.spec
    try:
        grid = spec.latent_grid(pricer.denoiser.config, *latent_dims(None, size, size, None, pricer.patch))
    except ConfigError:
        return []  # the declared size makes no token grid: there is no default call to price
    layout = TokenLayout(grid, pricer.n_text if spec.text_position != "none" else 0, spec.text_position)
    contexts = schedule([(layout, steps)], 1, False)
    without = dense_table(pricer.hooked, contexts).flops
    out = []
    for name, section in sections:
        mechanism = registry.MECHANISMS[name](section)
        mechanism.validate(pricer.adapter)
        with_it = mechanism.estimate_cost(dense_table(pricer.hooked, contexts)).flops
        if with_it >= without:
            out.append(f"{name} ({section.strify()}) is predicted not to pay on {type(pricer.denoiser).__name__} at "
                       f"its default size ({math.prod(grid)} tokens): {with_it:.4g} s per {steps}-step run against "
                       f"{without:.4g} s without it ("
                       + ("the shipped default latency calibration: fastdiff.calibrate_latency measures this model)"
                          if pricer.calibration.is_default else f"latency calibration {pricer.calibration.path})"))
    return out


class Pricer:
    """Prices sampling runs of one pipeline (or denoiser) at one batch and CFG setting: FLOPs and predicted time.

    The cost model, the token layouts and the latency model's per-layout prices are built once and kept, so the
    planner can price many configs; `fastdiff.estimate` is one `Pricer(...).estimate(config, stages)`.
    """

    def __init__(self, pipe_or_denoiser: Any, *, batch: int = 1, cfg: bool = True, text_tokens: int | None = None,
                 calibration: Any = None):
        from . import adapters
        from .integrations.diffusers import find_parts

        self.pipeline, self.denoiser, _ = find_parts(pipe_or_denoiser)
        self.adapter = adapters.resolve(self.denoiser)
        self.model = CostModel(self.adapter)
        spec = self.adapter.spec
        self.patch = token_patch(spec.latent_grid, self.denoiser.config)
        self.n_text = spec.text_tokens if text_tokens is None else text_tokens
        self.batch, self.cfg = batch, cfg
        self.calibration = latency.resolve(calibration, self.denoiser)
        coef = self.calibration.coefficients
        self.bare = latency.LatencyModel(self.model, coef, batch=batch)
        self.hooked = latency.LatencyModel(self.model, coef, batch=batch, hooked=True)

    def layouts(self, stages: list[dict]) -> list[tuple[TokenLayout, int]]:
        from .integrations.diffusers import latent_dims

        spec, out = self.adapter.spec, []
        for st in stages:
            grid = spec.latent_grid(self.denoiser.config, *latent_dims(self.pipeline, st["height"], st["width"],
                                                                       st["num_frames"], self.patch))
            out.append((TokenLayout(grid, self.n_text if spec.text_position != "none" else 0, spec.text_position),
                        st["steps"]))
        return out

    def estimate(self, config, stages: list[dict]) -> Estimate:
        """The run of `stages` (checked `check_stages` dicts) with `config` (a loaded FastDiffConfig)."""
        from .mechanisms import registry

        config = config.for_family(self.adapter.name)
        layouts = self.layouts(stages)
        contexts = schedule(layouts, self.batch, self.cfg)
        dense = dense_table(self.model, contexts)
        dense_time = dense_table(self.bare, contexts)
        table = dense
        mechanisms = registry.build(config)
        for mechanism in mechanisms:
            mechanism.validate(self.adapter)  # what apply() would refuse, estimate refuses too
        if config.bottleneck is not None:  # the call runs the section's stages; the baseline stays the call at full size
            from .mechanisms.bottleneck.mechanism import stage_sizes

            for m in mechanisms:
                if m.outer:
                    m.check_call(self.adapter, self.pipeline, getattr(self.pipeline, "scheduler", None), mechanisms)
            if len(stages) != 1:
                raise ConfigError("estimate: give the call's height/width/steps with a bottleneck section, not stages "
                                  "(the section makes the stages)")
            layouts = self.layouts(stage_sizes(config.bottleneck, **stages[0]))
            contexts = schedule(layouts, self.batch, self.cfg)
            table = dense_table(self.model, contexts)
        timed = dense_table(self.hooked, contexts)
        for mechanism in mechanisms:
            table = mechanism.estimate_cost(table)
            timed = mechanism.estimate_cost(timed)
        # each stage's layout as its calls run it (a region stage's is its mixed token set, not the grid it was built at)
        ran = tuple({row.ctx.stage: (row.ctx.layout, row.ctx.stage_steps) for row in table.rows}.values())
        return Estimate(table.flops, dense.flops, ran[-1][0], sum(n for _, n in layouts), 2 if self.cfg else 1,
                        self.batch, ran, timed.flops, dense_time.flops, self.calibration.source)


# -- the microbenchmark ------------------------------------------------------------------------------------------

PROBES = {  # what one calibration measures at each token count, beside the bare call
    "session": {},
    "merge r0.3": {"merge": {"method": "tome", "ratio": 0.3}},
    "merge r0.6": {"merge": {"method": "tome", "ratio": 0.6}},
    "sparse window": {"sparse": {"pattern": "window", "window": [3, 3, 3], "start": 0.0}},
    "sparse top-k 25%": {"sparse": {"pattern": "topk", "density": 0.25, "start": 0.0}},
}


def probe_reductions(probe: dict | None, adapter, layout: TokenLayout) -> dict[str, Reduction]:
    """The token reductions a probe's merge or sparse section makes on `layout` (what its replay runs)."""
    import fastdiff

    from .mechanisms import registry

    out: dict[str, Reduction] = {}
    for m in registry.build(fastdiff.load_config(probe or {})) if probe is not None else []:
        if m.name == "merge":
            out.update(m.reductions(m.sites(adapter), layout, m.config.ratio))
        elif m.name == "sparse":
            out.update(m.reductions(m.sites(adapter), layout, adapter))
    return out


def record_call(denoiser: torch.nn.Module, call: Callable[[], Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the first forward of `denoiser` during `call()` (hook removed after)."""
    seen: list = []

    def pre(module, args, kwargs):
        if not seen:
            seen.append((args, dict(kwargs)))

    handle = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    if not seen:
        raise FastDiffError(f"calibrate: the call never ran {type(denoiser).__name__}")
    return seen[0]


def _resized(adapter, args, kwargs, scale: float):
    """The recorded call with its latents resized by `scale` per spatial axis, or None: 4-D latents, and packed
    ones (B, tokens, C) on a full token grid whose family rebuilds the positions for a grid
    (`FamilySpec.resample.positions`, FLUX's img_ids); video latents are replayed at the recorded size only."""
    bound = adapter.bind(args, kwargs)
    x = bound.get(adapter.spec.hidden_arg)
    if scale == 1.0:
        return args, kwargs
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        return _resized_packed(adapter, bound, args, kwargs, x, scale)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    step = 8 if min(x.shape[-2:]) >= 16 else 2  # UNets need sides divisible by their downsampling; DiTs by the patch
    h, w = (max(step, int(round(s * scale / step)) * step) for s in x.shape[-2:])
    if (h, w) == tuple(x.shape[-2:]):
        return None
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="nearest")
    return _replaced(adapter, args, kwargs, {adapter.spec.hidden_arg: y})


def _resized_packed(adapter, bound, args, kwargs, x, scale: float):
    """Packed latents on an (h, w) token grid resized to (h, w) x `scale` tokens, with the positions rebuilt."""
    resample = adapter.spec.resample
    if resample is None or resample.positions is None:
        return None
    f, h, w = adapter.layout(bound).grid
    if f != 1 or h * w != x.shape[1] or h < 2 or w < 2:
        return None  # not a full image grid (a flat sequence): its positions cannot be rebuilt
    nh, nw = (max(1, int(round(s * scale))) for s in (h, w))
    if (nh, nw) == (h, w):
        return None
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    y = torch.nn.functional.interpolate(grid, size=(nh, nw), mode="nearest").flatten(2).transpose(1, 2).contiguous()
    return _replaced(adapter, args, kwargs, {adapter.spec.hidden_arg: y, **resample.positions(bound, (nh, nw))})


def _replaced(adapter, args, kwargs, values: dict):
    """The call's arguments with `values` (name -> new value) put where the call passed them."""
    names = list(adapter.signature.parameters)[1:]
    args, kwargs = list(args), dict(kwargs)
    for name, value in values.items():
        i = names.index(name)
        if name in kwargs or i >= len(args):
            kwargs[name] = value
        else:
            args[i] = value
    return tuple(args), kwargs


def calibrate_latency(pipe_or_denoiser: Any, call: Callable[[], Any], *, scales=(0.5, 0.75, 1.0), repeats: int = 3,
              directory: str | Path | None = None, save: bool = True,
              clock: Callable[[], float] = time.perf_counter) -> Calibration:
    """Measure this model's latency coefficients on this device and cache them (seconds on CPU at small sizes).

    One denoiser call of `call()` (e.g. `lambda: pipe(**kwargs)`) is recorded and replayed, at its own size and at
    `scales` of its latent side (4-D latents, and packed ones on a token grid with their positions rebuilt), bare,
    under a session, and with each of `PROBES` (merging at two ratios, a sparse window, top-k); the medians of
    `repeats` interleaved rounds are fitted to the terms. The model is left as it was (each probe is applied and
    removed around its replays).
    """
    import fastdiff

    from .integrations.diffusers import find_parts

    if not callable(call):
        raise ConfigError(f"call must be a function of no arguments (e.g. lambda: pipe(**kwargs)), got "
                          f"{type(call).__name__}")
    _, denoiser, _ = find_parts(pipe_or_denoiser)
    if fastdiff.session_of(denoiser) is not None:
        raise FastDiffError("calibrate: fastdiff is applied to this model; remove it first (the bare call is timed)")
    args, kwargs = record_call(denoiser, call)
    cost = CostModel(fastdiff.adapters.resolve(denoiser))
    adapter = cost.adapter
    rows, seconds, points = [], [], []
    for scale in sorted(set(scales)):
        replay = _resized(adapter, args, kwargs, scale)
        if replay is None:
            continue
        a, kw = replay
        bound = adapter.bind(a, kw)
        layout = adapter.layout(bound)
        batch = adapter.hidden_input(bound).shape[0]
        arms = {"bare": None, **PROBES}
        timed = _interleaved(denoiser, a, kw, arms, repeats, clock)
        for name, probe in arms.items():
            reductions = probe_reductions(probe, adapter, layout)

            def price(coef, reductions=reductions, hooked=probe is not None):
                return batch * sum(LatencyModel(cost, coef, batch=batch, hooked=hooked).block_flops(layout, reductions))

            rows.append(features(cost, price))
            seconds.append(timed[name])
            points.append([f"{name} @ {math.prod(layout.grid)} tokens x{batch}", timed[name]])
    if len(rows) < len(Coefficients.names()) // 2:
        raise FastDiffError(f"calibrate: only {len(rows)} measurements; the call's latents could not be resized")
    coef = fit(rows, seconds)
    for point, row in zip(points, rows):  # what was measured, its seconds, the fit's, and its features (refits)
        point += [sum(getattr(coef, n) * f for n, f in zip(Coefficients.names(), row)), row]
    cal = Calibration(coef, device_key(), model_key(denoiser),
                      f"measured {time.strftime('%Y-%m-%d %H:%M')} ({len(rows)} points, {repeats} rounds)", points)
    if save:
        path = cal.save(cache_path(denoiser, directory))
        cal = dataclasses.replace(cal, path=str(path))
    return cal


def _interleaved(denoiser, args, kwargs, arms: dict, repeats: int, clock) -> dict[str, float]:
    """Median seconds of one replay per arm (None: bare; a config: applied around it), rounds interleaved."""
    import fastdiff

    times: dict[str, list[float]] = {name: [] for name in arms}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a probe predicted not to pay is measured on purpose
        for r in range(repeats + 1):  # the first round warms up
            for name, probe in arms.items():
                if probe is None:
                    start = clock()
                    denoiser(*args, **kwargs)
                    elapsed = clock() - start
                else:
                    with fastdiff.accelerated(denoiser, probe):
                        start = clock()
                        denoiser(*args, **kwargs)
                        elapsed = clock() - start
                if r:
                    times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}

