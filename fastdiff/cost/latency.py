"""Predicted wall time of denoiser calls on this device: the cost model's terms, each at a calibrated price.

FLOPs mispredict time wherever the work is not a large matmul: a merge's matching and gathers, a sparse path's
masks and gathers, the Python of small modules and of hooks. So every term of `CostModel` is priced in seconds:

    per sample:  linear × FLOPs of each linear/conv
               + attention × FLOPs of each dense attention, or, for a sparsified one,
                 sparse × FLOPs × density + sparse_pairs × dense FLOPs (masks, scores and gathers paid at any density)
               + match × matching FLOPs + merge × tokens × width of each merged site (gather, scatter, unmerge)
    per call:    op per linear/conv/attention module run (dispatch, the small-tensor floor)
               + under a session: hook per block run, site per hooked merge/sparse site, call per denoiser call

`LatencyModel` answers `block_flops(layout, reductions)` in seconds instead of FLOPs, so the mechanisms'
`estimate_cost` (which scales, zeroes or re-prices a row's columns through `table.model.block_flops`) prices time
with no code of their own: a reused block costs nothing, a merged one its reduced terms plus the merge.

Coefficients come from `calibrate`: a few replays of one recorded denoiser call of the user's own model, at a few
token counts, dense and with merging and sparse attention, fitted by non-negative least squares. A calibration is
cached as JSON per device and model (`cache_dir()`, `FASTDIFF_CACHE_DIR` overrides); with none cached, the shipped
default (`fastdiff/configs/latency-default.json`) is used and reported as such (`Calibration.source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters.base import IMAGE
from ..context import TokenLayout
from ..errors import ConfigError, FastDiffError
from .model import CostModel, Reduction, tokens

VERSION = 1  # of the calibration file format
PER_CALL = ("op", "hook", "site", "call")  # coefficients paid once per call, whatever the batch


@dataclass(frozen=True)
class Coefficients:
    """Seconds per unit of each term (see the module docstring)."""

    linear: float = 0.0
    attention: float = 0.0
    sparse: float = 0.0
    sparse_pairs: float = 0.0
    match: float = 0.0
    merge: float = 0.0
    op: float = 0.0
    hook: float = 0.0
    site: float = 0.0
    call: float = 0.0

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def basis(cls, name: str) -> "Coefficients":
        """1 for `name`, 0 elsewhere: pricing with it counts that term's units (the calibration's features)."""
        return cls(**{name: 1.0})


@dataclass(frozen=True)
class Calibration:
    """Coefficients measured for one model on one device (or the shipped default), and where they came from."""

    coefficients: Coefficients
    device: str
    model: str
    source: str  # "default (...)" or "measured ..."
    points: list = field(default_factory=list, compare=False)  # the fit's: (what, measured s, fitted s, features)
    path: str | None = field(default=None, compare=False)

    @property
    def is_default(self) -> bool:
        return self.source.startswith("default")

    def to_dict(self) -> dict:
        return dict(version=VERSION, device=self.device, model=self.model, source=self.source,
                    coefficients=dataclasses.asdict(self.coefficients), points=self.points)

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "Calibration":
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise FastDiffError(f"latency calibration {path or ''}: not a version-{VERSION} calibration file "
                                "(delete it to recalibrate)")
        coef = d.get("coefficients", {})
        unknown = sorted(set(coef) - set(Coefficients.names()))
        if unknown or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in coef.values()):
            raise FastDiffError(f"latency calibration {path or ''}: bad coefficients {coef!r:.200}")
        return cls(Coefficients(**{k: float(v) for k, v in coef.items()}), str(d["device"]), str(d["model"]),
                   str(d["source"]), list(d.get("points", [])), path)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    @classmethod
    def read(cls, path: str | Path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))


def cache_dir() -> Path:
    """Where calibrations are kept: $FASTDIFF_CACHE_DIR, else ~/.cache/fastdiff (XDG_CACHE_HOME respected)."""
    if os.environ.get("FASTDIFF_CACHE_DIR"):
        return Path(os.environ["FASTDIFF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastdiff"


def device_key(device: torch.device | str | None = None) -> str:
    """This device as a calibration is keyed: the accelerator's name, or the CPU with the threads torch uses."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def model_key(denoiser: torch.nn.Module) -> str:
    """The denoiser's class and a hash of its config (same architecture, same key; the weights do not matter)."""
    config = getattr(denoiser, "config", None)
    text = json.dumps(dict(config) if config is not None else
                      [(n, tuple(p.shape)) for n, p in denoiser.named_parameters()], sort_keys=True, default=str)
    return f"{type(denoiser).__name__}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def cache_path(denoiser: torch.nn.Module, directory: str | Path | None = None, device=None) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{device_key(device)}--{model_key(denoiser)}")
    return Path(directory or cache_dir()) / f"latency-{slug}.json"


def default() -> Calibration:
    """The shipped default coefficients (used where this device and model have no calibration)."""
    text = (resources.files("fastdiff.configs") / "latency-default.json").read_text()
    return Calibration.from_dict(json.loads(text), "fastdiff/configs/latency-default.json")


def load(denoiser: torch.nn.Module, directory: str | Path | None = None) -> Calibration:
    """The cached calibration of `denoiser` on this device, else the shipped default (`is_default`)."""
    path = cache_path(denoiser, directory)
    return Calibration.read(path) if path.exists() else default()


def resolve(calibration: Any, denoiser: torch.nn.Module) -> Calibration:
    """A `calibration=` argument as a Calibration: None (cached or default), a Calibration, or a file path."""
    if calibration is None:
        return load(denoiser)
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, (str, Path)):
        return Calibration.read(calibration)
    raise ConfigError(f"calibration must be None, a Calibration or a path to one, got {type(calibration).__name__}")


class LatencyModel:
    """Seconds of one denoiser call per block, in `CostModel`'s shape (what mechanisms price through).

    `block_flops` returns seconds per sample: the per-call terms are spread over the call's `batch` rows, so a row's
    total (`CostRow.total` = batch × Σ columns) is the call's time. `hooked`: the call runs under a session.
    """

    def __init__(self, cost: CostModel, coefficients: Coefficients, *, batch: int = 1, hooked: bool = False):
        self.cost, self.c, self.batch, self.hooked = cost, coefficients, batch, hooked
        self.adapter = cost.adapter
        self._memo: dict = {}

    def block_flops(self, layout: TokenLayout, reductions: dict[str, Reduction] | None = None) -> list[float]:
        key = (layout, tuple(sorted((reductions or {}).items())))
        if key not in self._memo:
            self._memo[key] = self._price(layout, reductions or {})
        return list(self._memo[key])

    def _price(self, layout: TokenLayout, reductions: dict[str, Reduction]) -> list[float]:
        c, cost, per_call = self.c, self.cost, 1.0 / self.batch
        out = [0.0] * (len(self.adapter.blocks) + 1)
        owner: dict[str, Reduction] = {}
        for path, red in reductions.items():
            for term in cost._under(path):
                owner[term.path] = red
        for term in cost.terms:
            col = -1 if term.block is None else term.block
            red = owner.get(term.path)
            flops = cost.term_flops(term, layout, red)
            if term.kind != "attention":
                out[col] += c.linear * flops
            elif red is not None and red.density < 1:
                out[col] += c.sparse * flops + c.sparse_pairs * cost.term_flops(
                    term, layout, dataclasses.replace(red, density=1.0))
            else:
                out[col] += c.attention * flops
            out[col] += c.op * per_call
        for path, red in reductions.items():
            col = cost.block_of(path)
            if red.density < 1:
                out[col] += c.site * per_call if self.hooked else 0.0
                continue
            attn = next((t for t in cost._under(path) if t.kind == "attention"), None)
            width = attn.coef / 4 if attn is not None else 1.0
            level = attn.level if attn is not None else 0
            out[col] += c.match * red.extra + c.merge * tokens(IMAGE, layout, level) * width
            out[col] += c.site * per_call if self.hooked else 0.0
        if self.hooked:
            for block in self.adapter.blocks:
                out[block.index] += c.hook * per_call
            out[-1] += c.call * per_call
        return out


def features(cost: CostModel, price: Callable[[Coefficients], float]) -> list[float]:
    """The units of every term in one priced thing: `price` evaluated at each coefficient's basis (time is linear
    in the coefficients, so these are the least-squares fit's columns)."""
    return [price(Coefficients.basis(name)) for name in Coefficients.names()]


def fit(rows: list[list[float]], seconds: list[float]) -> Coefficients:
    """Non-negative least squares of measured `seconds` on feature `rows`, in relative error (each measurement
    weighted by 1/its time, so small calls count as much as large ones)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(rows, dtype=float)
    t = np.asarray(seconds, dtype=float)
    a, ones = a / t[:, None], np.ones_like(t)
    scale = np.where(a.max(axis=0) > 0, a.max(axis=0), 1.0)
    x, _ = nnls(a / scale, ones)
    return Coefficients(**{n: float(v) for n, v in zip(Coefficients.names(), x / scale)})


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

    from ..mechanisms import registry

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
    """The recorded call with its latents resized by `scale` per spatial axis (4-D latents only), or None."""
    bound = adapter.bind(args, kwargs)
    x = bound.get(adapter.spec.hidden_arg)
    if scale == 1.0:
        return args, kwargs
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None  # packed or video latents: only the recorded size is replayed
    step = 8 if min(x.shape[-2:]) >= 16 else 2  # UNets need sides divisible by their downsampling; DiTs by the patch
    h, w = (max(step, int(round(s * scale / step)) * step) for s in x.shape[-2:])
    if (h, w) == tuple(x.shape[-2:]):
        return None
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="nearest")
    names = list(adapter.signature.parameters)[1:]
    if adapter.spec.hidden_arg in kwargs:
        return args, {**kwargs, adapter.spec.hidden_arg: y}
    i = names.index(adapter.spec.hidden_arg)
    return args[:i] + (y,) + args[i + 1:], kwargs


def calibrate(pipe_or_denoiser: Any, call: Callable[[], Any], *, scales=(0.5, 0.75, 1.0), repeats: int = 3,
              directory: str | Path | None = None, save: bool = True,
              clock: Callable[[], float] = time.perf_counter) -> Calibration:
    """Measure this model's latency coefficients on this device and cache them (seconds on CPU at small sizes).

    One denoiser call of `call()` (e.g. `lambda: pipe(**kwargs)`) is recorded and replayed, at its own size and at
    `scales` of its latent side (4-D latents), bare, under a session, and with each of `PROBES` (merging at two
    ratios, a sparse window, top-k); the medians of `repeats` interleaved rounds are fitted to the terms. The model
    is left as it was (each probe is applied and removed around its replays).
    """
    import fastdiff

    from ..integrations.diffusers import find_parts

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
                        denoiser(*args, **kwargs)  # untimed: builds what a run builds once (maps, geometry)
                        start = clock()
                        denoiser(*args, **kwargs)
                        elapsed = clock() - start
                if r:
                    times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}

