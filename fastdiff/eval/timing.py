"""The one timing helper of the CLI, the benchmarks and the demo, plus device sync, device name and the reference
classifier's class accuracy.

How a comparison is timed (`interleaved`): every arm (baseline, each config, each peer) is first run `warmup` times
(lazy init, allocator, compile caches: a cold first call is not a measurement), then the timed rounds interleave
the arms, A B C A B C ..., so slow drifts of the machine (other jobs, clocks, thermals) hit every arm alike instead
of whichever ran last. An arm's `session` (apply ... remove) is entered around each of its calls, untimed.

How it is reported (`compare`): the speedup is median(baseline) / median(arm), with the range of the per-round
ratios beside it; a row is flagged unreliable when either arm's spread ((max - min) / median of its rounds) is over
`SPREAD_LIMIT`, when fewer than `MIN_REPEATS` rounds were timed, or when the measured speedup is above the FLOPs bound
(what the cost model says the run computed: wall time cannot honestly shrink more than the work, on a model whose
time is its FLOPs; above it, the baseline was slowed by something else).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

SPREAD_LIMIT = 0.20  # a spread over 20% of the median: the machine was not quiet enough to trust the ratio
MIN_REPEATS = 3  # fewer timed rounds cannot show a spread
TABLE_NOTE = (f"Timing: every row warmed up once, then timed rounds interleaved over all rows (A B C A B C ...); median "
              f"seconds ± spread ((max - min) / median of the rounds); speedup = baseline median / row median, with "
              f"the range of the per-round ratios. **unreliable**: spread over {SPREAD_LIMIT:.0%}, fewer than "
              f"{MIN_REPEATS} rounds, or a speedup above the FLOPs bound (fastdiff's own accounting of the run).")


def sync() -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# the result columns every benchmark writes (timing, fidelity); a benchmark appends its own before config and note
RESULT_KEYS = ["time_s", "spread", "speedup", "speedup_low", "speedup_high", "reliable", "timing_note", "psnr", "ssim",
               "flops_speedup", "accuracy"]


def write_results(out, env: dict, rows: list[dict], keys: list[str]) -> None:
    """`out`/results.json (the environment and every row) and `out`/results.csv (the columns `keys`, cells safe to
    open in a spreadsheet)."""
    import csv
    import json

    from .outdir import csv_cell

    (out / "results.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)


def environment(module: str, wl, **extra) -> dict:
    """What a benchmark's results were measured with: device, threads, versions, the exact command (`module` and this
    process's arguments), the workload; `extra`: more entries (another library's version)."""
    import shlex
    import sys

    import diffusers

    import fastdiff

    return dict(device=device(), threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers.__version__, fastdiff=fastdiff.__version__, **extra,
                python=platform.python_version(), command=f"python -m {module} " + shlex.join(sys.argv[1:]),
                workload=wl.describe, trained=wl.trained)


def device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


@dataclass
class Arm:
    """One thing to time. `call(prepared)` is the timed work and returns its output; `prepare()` makes its input
    untimed (fresh generators); `session()` is a context entered around every call, untimed (fastdiff.accelerated,
    a peer's apply/remove); `finish(state)` runs once inside the last session after the last call, untimed (e.g.
    `handle.summary()`), where `state` is what the session yielded."""

    name: str
    call: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None
    session: Callable[[], ContextManager] = contextlib.nullcontext
    finish: Callable[[Any], Any] | None = None


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)  # seconds of each timed round, in round order
    output: Any = None  # the last timed call's output
    extra: Any = None  # what Arm.finish returned
    warmups: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed rounds: 0.1 = the rounds lie within 10% of the median's size."""
        med = self.median
        return (max(self.times) - min(self.times)) / med if med > 0 else float("inf")


def interleaved(arms: list[Arm], repeats: int, *, warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                on_call: Callable[[str, str], None] | None = None) -> dict[str, Timing]:
    """Warm every arm up `warmup` times, then time `repeats` rounds of all arms in turn (A B A B ...).
    `on_call(phase, name)` ("warmup" / "timed") is told of every call in order. Returns {name: Timing}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"two arms share a name: {names}")
    out = {a.name: Timing(a.name) for a in arms}
    rounds = [("warmup", r) for r in range(warmup)] + [("timed", r) for r in range(repeats)]
    for phase, r in rounds:
        last = phase == "timed" and r == repeats - 1
        for arm in arms:
            result = out[arm.name]
            prepared = arm.prepare()
            with arm.session() as state:
                if on_call is not None:
                    on_call(phase, arm.name)
                sync()
                start = clock()
                with torch.no_grad():
                    output = arm.call(prepared)
                sync()
                elapsed = clock() - start
                if last and arm.finish is not None:
                    result.extra = arm.finish(state)
            if phase == "warmup":
                result.warmups += 1
            else:
                result.times.append(elapsed)
                result.output = output
    return out


@dataclass
class Speedup:
    ratio: float  # median(baseline) / median(arm)
    low: float  # smallest per-round ratio (round i of the baseline over round i of the arm)
    high: float  # largest
    spread: float  # the larger of the two arms' relative spreads
    bound: float | None  # the FLOPs speedup the run's accounting allows, if known
    flags: list[str]

    @property
    def reliable(self) -> bool:
        return not self.flags

    @property
    def note(self) -> str:
        return "; ".join(self.flags)

    def cell(self) -> str:
        """'1.61x [1.55-1.70]' with '(unreliable)' when flagged: the table cell."""
        return f"{self.ratio:.2f}x [{self.low:.2f}-{self.high:.2f}]" + ("" if self.reliable else " UNRELIABLE")


def compare(base: Timing, arm: Timing, bound: float | None = None) -> Speedup:
    """Speedup of `arm` over `base` from interleaved rounds, with its spread and the reasons it is not to be trusted."""
    per_round = [b / a for b, a in zip(base.times, arm.times) if a > 0]
    ratio = base.median / arm.median if arm.median > 0 else float("inf")
    spread = max(base.spread, arm.spread)
    flags = []
    if min(len(base.times), len(arm.times)) < MIN_REPEATS:
        flags.append(f"{min(len(base.times), len(arm.times))} timed round(s) < {MIN_REPEATS}: spread unknown")
    if spread > SPREAD_LIMIT:
        flags.append(f"spread {spread:.0%} > {SPREAD_LIMIT:.0%}")
    if bound is not None and ratio > bound:
        flags.append(f"{ratio:.2f}x above the FLOPs bound {bound:.2f}x")
    return Speedup(ratio, min(per_round, default=ratio), max(per_round, default=ratio), spread, bound, flags)


def fields(base: Timing, arm: Timing, bound: float | None = None) -> dict:
    """The timing columns of a result row: median, spread and rounds of `arm`, speedup over `base` with the range of
    the per-round ratios, and whether (and why not) to trust it."""
    s = compare(base, arm, bound)
    return dict(time_s=arm.median, spread=arm.spread, times_s=list(arm.times), speedup=s.ratio, speedup_low=s.low,
                speedup_high=s.high, reliable=s.reliable, timing_note=s.note)


def result_rows(timed: dict, meta: dict, trained: bool, flops_of: Callable[[str, Any], float | None],
                classify: Callable | None = None, extra: Callable[[str, Timing, dict], None] | None = None,
                frechet: Callable | None = None) -> list[dict]:
    """One result row per timed arm against the arm named "baseline": `meta[name]`, the timing columns, the FLOPs
    bound `flops_of(name, summary)`, PSNR/SSIM over the baseline's value range ([0, 1] for trained references), a
    benchmark's own columns (`extra(name, arm, row)`), then class accuracy when a classifier is given and the
    Fréchet distance to held-out real images in the classifier's features (`frechet`, see `frechet_to_real`)."""
    from . import metrics

    base = timed["baseline"].output
    data_range = 1.0 if trained else float(base.max() - base.min())
    rows = []
    for name, t in timed.items():
        flops = flops_of(name, t.extra)
        row = dict(meta[name], **fields(timed["baseline"], t, flops), flops_speedup=flops,
                   psnr=metrics.psnr(t.output, base, data_range), ssim=metrics.ssim(t.output, base, data_range))
        if extra is not None:
            extra(name, t, row)
        if classify:
            row["accuracy"] = classify(t.output)
        if frechet:
            row["fd_real"] = frechet(t.output)
        rows.append(row)
    return rows


def frechet_to_real(model: str):
    """images -> Fréchet distance between their reference-classifier features and the held-out real images' (the
    model's data set at its size), for a trained reference model; else None. Few samples bias it upwards: compare
    rows of one run (the baseline row is the floor), not runs of different sizes."""
    from . import metrics, workloads

    reference = workloads._reference()
    if reference is None or model not in reference.names():
        return None
    clf = reference.load_classifier(model)
    with torch.no_grad():
        real = clf.features(reference.held_out(model)[0])

    def fd(images):
        with torch.no_grad():
            return metrics.frechet_distance(clf.features(images), real)

    return fd


def time_cell(row: dict) -> str:
    """'2.345 ±4%' for a table: median seconds and the spread of the rounds."""
    return f"{row['time_s']:.3f} ±{row['spread']:.0%}"


def speed_cell(row: dict) -> str:
    """'1.61x [1.55-1.70]', plus '**unreliable** (why)' when flagged, for a table."""
    cell = f"{row['speedup']:.2f}x [{row['speedup_low']:.2f}-{row['speedup_high']:.2f}]"
    return cell if row["reliable"] else f"{cell} **unreliable** ({row['timing_note']})"


def workload_arm(name: str, wl, session: Callable[[], ContextManager] = contextlib.nullcontext,
                 finish: Callable[[Any], Any] | None = None) -> Arm:
    """An arm that samples the whole workload once per call; its output is the images on CPU (float)."""
    return Arm(name, lambda kw: wl.to_images(wl.pipe(**kw)).float().cpu(), prepare=wl.make_kwargs, session=session,
               finish=finish)


def class_accuracy(model: str):
    """images -> fraction classified as asked (sample i is class i % 10) for a trained reference model, else None."""
    from . import workloads

    reference = workloads._reference()
    if reference is None or model not in reference.names():
        return None
    clf = reference.load_classifier(model)

    def accuracy(images):
        labels = torch.tensor([i % 10 for i in range(len(images))])
        with torch.no_grad():
            return float(clf.accuracy(images, labels))

    return accuracy
