"""`fastdiff-eval`: baseline vs fastdiff configs on the same seeds — latency, paired fidelity, sample quality.

    fastdiff-eval --model ref-digits --preset cache-safe --preset cache-fast --samples 100 --steps 20 --out runs/x
    fastdiff-eval --model ref-digits --speedup 2 --speedup 3 --out runs/y        # the planner's configs for the call
    accelerate launch --num_processes 4 -m fastdiff.eval.cli --model ... --out ...   # samples split over processes

Per config it writes <out>/<name>.json and a sample grid PNG; then <out>/results.csv, results.json and
pareto.png over all configs. Sweeps resume: an existing <name>.json is kept unless --force, but only after it is
checked to be a result of that very config (known keys and types; else a clear refusal). Nothing is written or read
through a link: --out and its entries may not be symbolic links, files are replaced by renaming (see outdir.py),
and CSV cells that a spreadsheet would run as formulas are quoted.

Every sample i is drawn from its own seed (seed + i), so a sample is the same whichever process or batch computes
it and the multi-process numbers equal the single-process ones. Latency (timing.interleaved): every config is
warmed up once, then --repeats (default 3) timed rounds interleave baseline and configs, with a device sync around
each call; medians end to end and inside the denoiser alone, the spread of the rounds, and the speedup
(baseline / config, this run) with the range of the per-round ratios. A row is flagged UNRELIABLE when a spread is
over 20%, fewer than 3 rounds were timed, or the speedup is above the FLOPs bound of fastdiff's own accounting.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.integrations.diffusers import find_parts

from . import metrics, timing, workloads
from .outdir import OutDir, csv_cell


class DenoiserTimer:
    """Wall time spent inside the denoiser's forward (fastdiff's own hooks included), via a forward hook pair."""

    def __init__(self, denoiser):
        self.total = 0.0
        self._start = None
        self._handles = [denoiser.register_forward_pre_hook(self._pre), denoiser.register_forward_hook(self._post)]

    def _pre(self, *_):
        timing.sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        timing.sync()
        self.total += time.perf_counter() - self._start

    def close(self):
        for h in self._handles:
            h.remove()


def arm(name: str, cfg, wl: workloads.Workload, indices: list[int], batch_size: int, inner: dict) -> timing.Arm:
    """The arm that samples this process's `indices` batch by batch under `cfg` (None: the baseline). Each call
    appends the seconds spent inside the denoiser to inner[name]; the summary of the last timed call is its extra."""
    batches = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    denoiser = find_parts(wl.pipe)[1]

    @contextlib.contextmanager
    def session():
        with (fastdiff.accelerated(wl.pipe, cfg) if cfg is not None else contextlib.nullcontext()) as handle:
            timer = DenoiserTimer(denoiser)
            try:
                yield handle
            finally:
                timer.close()
                inner.setdefault(name, []).append(timer.total)

    def call(calls):
        outs = [wl.to_images(wl.pipe(**kw)).float().cpu() for kw in calls]
        return torch.cat(outs) if outs else torch.empty(0)

    return timing.Arm(name, call, prepare=lambda: [wl.make_kwargs(b) for b in batches], session=session,
                      finish=lambda handle: handle.summary() if handle is not None else None)


def evaluate(images, base, wl, refs) -> dict:
    data_range = 1.0 if wl.trained else float(base.max() - base.min()) or 1.0
    out = {"psnr": metrics.psnr(images, base, data_range), "ssim": metrics.ssim(images, base, data_range)}
    if refs.get("classifier") is not None:
        clf, real = refs["classifier"], refs["real"]
        labels = torch.tensor([i % 10 for i in range(len(images))])
        out["class_accuracy"] = clf.accuracy(images, labels)
        with torch.no_grad():
            feats = clf.features(images)
            out["fd_classifier_vs_real"] = metrics.frechet_distance(feats, clf.features(real))
            out["fd_classifier_vs_baseline"] = metrics.frechet_distance(feats, clf.features(base))
    if refs.get("inception"):
        out["fid_vs_baseline"] = metrics.fid_inception(images, base, refs["inception"])
    return out


def _references(args, wl) -> dict:
    refs = {"inception": args.inception_weights}
    reference = workloads._reference()
    if reference is not None and args.model in reference.names():
        refs["classifier"] = reference.load_classifier(args.model)
        refs["real"] = reference.held_out(args.model)[0]  # the model's data set, at its size
    if args.lpips_weights:
        print("LPIPS: torchmetrics' LPIPS builds its backbone through torchvision, which does not import beside this "
              "torch build; skipped")
    return refs


def configs(args) -> list[tuple[str, object]]:
    out = [("baseline", None)]
    for preset in args.preset or []:
        out.append((preset, fastdiff.load_config(preset=preset)))
    for path in args.config or []:
        cfg = fastdiff.load_config(path)
        out.append((cfg.strify(), cfg))
    if args.speedup or args.latency:
        out += planned(args)
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"two configs share a name: {names}")
    return out


def planned(args) -> list[tuple[str, object]]:
    """`--speedup X` / `--latency S`: the planner's config for this workload's call (its steps, size and batch),
    named plan-Xx / plan-Ss; an unreachable target is refused here, before anything is written."""
    wl = workloads.load(args.model, samples=1, steps=args.steps, seed=args.seed)
    kw = wl.make_kwargs([0])
    with torch.no_grad():  # one 1-step sample: the output size a call of this workload makes
        size = wl.to_images(wl.pipe(**{**kw, "num_inference_steps": 1})).shape[-2:]
    shape = dict(height=int(size[0]), width=int(size[1]), steps=args.steps, batch=min(args.batch_size, args.samples),
                 cfg=kw.get("guidance_scale", 1.0) != 1.0)
    out = []
    for key, values in (("speedup", args.speedup), ("latency", args.latency)):
        for v in values or []:
            try:
                p = fastdiff.plan(wl.pipe, **{key: v}, **shape)
            except fastdiff.ConfigError as err:
                raise SystemExit(f"--{key} {v:g}: {err}") from None
            print(f"plan {key}={v:g}: {' + '.join(p.choices) or 'nothing'} (predicted {p.speedup:.2f}x, "
                  f"{p.seconds:.3g} s; expected PSNR {p.psnr:.1f} dB; latency: {p.latency})", flush=True)
            out.append((f"plan-{v:g}{'x' if key == 'speedup' else 's'}", p.config))
    return out


# The keys a result file holds and their types: the only ones read back from a file this run did not write.
_NUM = (int, float)
ROW_FIELDS = {
    "name": (str,), "config": (dict, type(None)), "samples": (int,), "processes": (int,), "repeats": (int,),
    "time_s": _NUM, "times_s": (list,), "spread": _NUM, "denoiser_s": _NUM, "flops_speedup": _NUM, "speedup": _NUM,
    "speedup_low": _NUM, "speedup_high": _NUM, "denoiser_speedup": _NUM, "baseline_time_s": _NUM, "reliable": (bool,),
    "timing_note": (str,), "psnr": _NUM, "ssim": _NUM,
}
OPTIONAL_FIELDS = {"class_accuracy": _NUM, "fd_classifier_vs_real": _NUM, "fd_classifier_vs_baseline": _NUM,
                   "fid_vs_baseline": _NUM}
# results.csv: fixed columns (never the keys of a row), in this order
COLUMNS = ["name", "time_s", "spread", "speedup", "speedup_low", "speedup_high", "flops_speedup", "reliable",
           "timing_note", "denoiser_s", "denoiser_speedup", "psnr", "ssim", "class_accuracy", "fd_classifier_vs_real",
           "fd_classifier_vs_baseline", "fid_vs_baseline", "samples", "processes", "repeats", "baseline_time_s",
           "resumed"]


def validate_row(row, name: str, cfg) -> str | None:
    """Why a result file read back is not this config's result (None: it is)."""
    if not isinstance(row, dict):
        return "not a JSON object"
    unknown = sorted(set(row) - set(ROW_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        return f"unknown keys {unknown[:5]}"
    missing = sorted(set(ROW_FIELDS) - set(row))
    if missing:
        return f"missing keys {missing[:5]}"
    for key, value in row.items():
        types = ROW_FIELDS.get(key) or OPTIONAL_FIELDS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"{key}: {type(value).__name__} is not {'/'.join(t.__name__ for t in types)}"
    if not all(isinstance(t, _NUM) and not isinstance(t, bool) for t in row["times_s"]):
        return "times_s: not a list of numbers"
    if row["name"] != name:
        return f"name {row['name']!r} is not {name!r}"
    if row["config"] != json.loads(json.dumps(cfg.to_dict(), default=_json)):  # as this run would write it
        return "its config is not this config"
    return None


def _resume(out: OutDir, name: str, cfg):
    """The validated row of an earlier run of this config, or a clear refusal naming the file."""
    path = out.path / f"{name}.json"
    try:
        row = json.loads(out.read_text(f"{name}.json"))
    except (ValueError, UnicodeDecodeError) as err:
        raise SystemExit(f"{path} is not a fastdiff-eval result ({err}); delete it or pass --force") from None
    why = validate_row(row, name, cfg)
    if why is not None:
        raise SystemExit(f"{path} is not a fastdiff-eval result of this config ({why}); delete it or pass --force")
    return {**row, "resumed": True}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="fastdiff-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-digits", help="reference model name or tiny family name")
    ap.add_argument("--preset", action="append", help="fastdiff preset (repeatable)")
    ap.add_argument("--config", action="append", help="fastdiff YAML config (repeatable)")
    ap.add_argument("--speedup", type=float, action="append",
                    help="a config planned for this call at this predicted speedup (fastdiff.plan; repeatable)")
    ap.add_argument("--latency", type=float, action="append",
                    help="a config planned for this call within this many seconds of denoiser time (repeatable)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=timing.MIN_REPEATS,
                    help=f"timed rounds, interleaved over the configs (median reported; < {timing.MIN_REPEATS} is "
                    "flagged unreliable)")
    ap.add_argument("--inception-weights", help="local Inception weights file for FID (never downloaded)")
    ap.add_argument("--lpips-weights", help="local LPIPS weights (see README)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="recompute configs whose result file exists")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import PartialState
    from accelerate.utils import gather_object

    # the output folder and every entry this run writes or reads: no links, checked before any work
    todo = configs(args)  # a bad preset or config is refused before the folder is made
    out = OutDir(args.out)
    out.check("results.csv", "results.json", "pareto.png", "baseline.pt",
              *(f"{name}{ext}" for name, _ in todo for ext in (".json", ".png")))
    kept = {name: _resume(out, name, cfg) for name, cfg in todo
            if name != "baseline" and not args.force and out.exists(f"{name}.json")}

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    if torch.cuda.is_available():
        wl.pipe.to(state.device)
    with state.split_between_processes(list(range(args.samples))) as mine:
        mine = list(mine)
    refs = _references(args, wl) if state.is_main_process else {}

    # baseline and every config not kept: warmed up, then timed in interleaved rounds (baseline, A, B, baseline, ...)
    inner: dict[str, list[float]] = {}
    arms = [arm(name, cfg, wl, mine, args.batch_size, inner) for name, cfg in todo if name not in kept]
    timed = timing.interleaved(arms, args.repeats, warmup=1)
    gathered = gather_object([(mine, {n: (t.output, t.times, inner[n][-args.repeats:]) for n, t in timed.items()})])
    if not state.is_main_process:
        return

    def total(name, k):  # seconds per timed round, summed over processes
        return [sum(p[1][name][k][r] for p in gathered) for r in range(args.repeats)]

    e2e = {name: timing.Timing(name, total(name, 1)) for name in timed}
    den = {name: timing.Timing(name, total(name, 2)) for name in timed}
    base = None
    rows = []
    for name, cfg in todo:
        if name in kept:
            rows.append(kept[name])
            continue
        order = sorted(((i, img) for idx, per in gathered for i, img in zip(idx, per[name][0])), key=lambda p: p[0])
        images = torch.stack([img for _, img in order])
        summary = timed[name].extra
        bound = summary.estimated_speedup if summary is not None else 1.0
        speed = timing.compare(e2e["baseline"], e2e[name], bound)
        row = {"name": name, "config": cfg.to_dict() if cfg is not None else None, "samples": len(images),
               "processes": state.num_processes, "repeats": args.repeats, "time_s": e2e[name].median,
               "times_s": e2e[name].times, "spread": e2e[name].spread, "denoiser_s": den[name].median,
               "flops_speedup": bound, "speedup": speed.ratio, "speedup_low": speed.low, "speedup_high": speed.high,
               "denoiser_speedup": den["baseline"].median / den[name].median if den[name].median > 0 else math.inf,
               "baseline_time_s": e2e["baseline"].median, "reliable": speed.reliable, "timing_note": speed.note}
        if name == "baseline":
            base = images
            buf = io.BytesIO()
            torch.save(images, buf)
            out.write_bytes("baseline.pt", buf.getvalue())
        row.update(evaluate(images, base, wl, refs))
        out.write_text(f"{name}.json", json.dumps(row, indent=1, default=_json))
        buf = io.BytesIO()
        grid(images[:40], buf)
        out.write_bytes(f"{name}.png", buf.getvalue())
        rows.append(row)
    print(table(rows, wl, args.repeats), flush=True)
    write_tables(rows, out, wl)


def table(rows, wl, repeats: int) -> str:
    """The printed table: time with its spread, speedup with the range of the per-round ratios, the FLOPs bound, and
    why a row's timing is not to be trusted."""
    lines = [f"{wl.describe}; median of {repeats} interleaved rounds after a warm-up; speedup [range of per-round "
             f"ratios]; UNRELIABLE: spread > {timing.SPREAD_LIMIT:.0%}, < {timing.MIN_REPEATS} rounds, or above the "
             "FLOPs bound",
             f"{'config':<28} {'time s':>8} {'spread':>7} {'speedup [range]':<35} {'FLOPs x':>8} {'PSNR':>7} "
             f"{'SSIM':>7} {'acc':>6}  note"]
    for r in rows:
        cell = f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}]"
        cell += "" if r["reliable"] else " UNRELIABLE"
        acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
        note = r["timing_note"] + ("; resumed: timed in an earlier run" if r.get("resumed") else "")
        lines.append(f"{r['name'][:28]:<28} {r['time_s']:>8.3f} {r['spread']:>6.1%} {cell:<35} "
                     f"{r['flops_speedup']:>7.2f}x {r['psnr']:>7.2f} {r['ssim']:>7.4f} {acc:>6}  {note}")
    return "\n".join(lines)


def _json(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return str(v)


def grid(images: torch.Tensor, target, cols: int = 10) -> None:
    """A PNG grid of (N, C, H, W) images in [0, 1] (first three channels; latents are min-max scaled), written to a
    path or a binary file object."""
    from PIL import Image

    x = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    if x.ndim != 4 or len(x) == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        x = (x - lo) / max(hi - lo, 1e-8)
    n, _, h, w = x.shape
    rows = math.ceil(n / cols)
    canvas = torch.ones(3, rows * (h + 1), min(n, cols) * (w + 1))
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = x[i]
    arr = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    scale = max(1, 256 // max(h, w))
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(target, format="PNG")


def write_tables(rows, out: OutDir, wl) -> None:
    text = io.StringIO()
    w = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows({k: csv_cell(v) for k, v in r.items() if k in COLUMNS} for r in rows)
    out.write_text("results.csv", text.getvalue())
    out.write_text("results.json", json.dumps({"workload": wl.describe, "rows": rows}, indent=1, default=_json))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows[1:]:
        ax.scatter(r["speedup"], min(r["psnr"], 80), marker="o" if r["reliable"] else "x")
        ax.annotate(r["name"] + ("" if r["reliable"] else " (unreliable)"), (r["speedup"], min(r["psnr"], 80)),
                    fontsize=6)
    ax.set_xlabel("speedup (same run, interleaved)")
    ax.set_ylabel("PSNR vs baseline, dB")
    ax.set_title(wl.name + ("" if wl.trained else " (random weights)"))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out.write_bytes("pareto.png", buf.getvalue())


if __name__ == "__main__":
    main()
