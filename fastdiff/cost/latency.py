"""Predicted wall time of denoiser calls on this device: the cost model's terms, each at a calibrated price.

FLOPs mispredict time wherever the work is not a large matmul: a merge's matching and gathers, a sparse path's
masks and gathers, the Python of small modules and of hooks. So every term of `CostModel` is priced in seconds:

    per sample:  linear × FLOPs of each linear/conv
               + attention × FLOPs of each dense attention, or, for a sparsified one,
                 sparse × FLOPs × density + sparse_pairs × dense FLOPs (masks, scores and gathers paid at any density)
               + match × matching FLOPs + merge × rows moved × width of each merged site (`moved`: the gathers
                 and scatter of merge and unmerge, growing with the tokens merged)
    per call:    op per linear/conv/attention module run (dispatch, the small-tensor floor)
               + under a session: hook per block run, site per hooked merge/sparse site, call per denoiser call

`LatencyModel` answers `block_flops(layout, reductions)` in seconds instead of FLOPs, so the mechanisms'
`estimate_cost` (which scales, zeroes or re-prices a row's columns through `table.model.block_flops`) prices time
with no code of their own: a reused block costs nothing, a merged one its reduced terms plus the merge.

Coefficients come from `fastdiff.calibrate_latency` (in `fastdiff.planner`, which may run mechanisms; this module
is arithmetic): a few replays of one recorded denoiser call of the user's own model, at a few token counts, dense
and with merging and sparse attention, fitted by non-negative least squares (`fit`). A calibration is cached as
JSON per device and model (`cache_dir()`, `FASTDIFF_CACHE_DIR` overrides); with none cached, the shipped default
(`fastdiff/configs/latency-default.json`) is used and reported as such (`Calibration.source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters.base import IMAGE
from ..context import TokenLayout
from ..errors import ConfigError, FastDiffError
from .model import CostModel, Reduction, tokens

VERSION = 2  # of the calibration file format (2: the merge term counts the rows moved, `moved`)
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
            n = tokens(IMAGE, layout, level)
            out[col] += c.match * red.extra + c.merge * moved(n, red.query) * width
            out[col] += c.site * per_call if self.hooked else 0.0
        if self.hooked:
            for block in self.adapter.blocks:
                out[block.index] += c.hook * per_call
            out[-1] += c.call * per_call
        return out


def moved(n: int, kept: int) -> int:
    """Token rows a merged site moves (its merge and unmerge, per unit of width): the merge gathers the `kept` rows
    and each of the n - kept merged sources and its destination, then scatter-adds the sources; the unmerge gathers
    all n. So the gathers grow with the ratio (a ToMe at 0.6 moves more than at 0.3), beside the fixed matching."""
    r = max(0, n - kept)
    return kept + 3 * r + n


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
