"""`fastdiff-eval`: baseline vs fastdiff configs on the same seeds — latency, paired fidelity, sample quality.

    fastdiff-eval --model ref-digits --preset cache-safe --preset cache-fast --samples 100 --steps 20 --out runs/x
    accelerate launch --num_processes 4 -m fastdiff.eval.cli --model ... --out ...   # samples split over processes

Per config it writes <out>/<name>.json (resumable: an existing file is kept unless --force) and a sample
grid PNG; then <out>/results.csv, results.json and pareto.png over all configs. Every sample i is drawn
from its own seed (seed + i), so a sample is the same whichever process or batch computes it and the
multi-process numbers equal the single-process ones. Latency: warm-up call, device sync, median and
spread over --repeats timed batches, end to end and inside the denoiser alone; speedup is baseline /
config, measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.integrations.diffusers import find_parts

from . import metrics, timing, workloads


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


def generate(wl: workloads.Workload, indices: list[int], batch_size: int, repeats: int, progress: bool):
    """Images for `indices` and timings: per timed pass, end-to-end and denoiser seconds over all batches."""
    from tqdm.auto import tqdm

    batches = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    denoiser = find_parts(wl.pipe)[1]
    with torch.no_grad():
        if batches:
            wl.pipe(**wl.make_kwargs(batches[0][:1]))  # warm-up (lazy init, allocator, compile caches)
    e2e, inner, images = [], [], None
    for _ in range(max(1, repeats)):
        timer = DenoiserTimer(denoiser)
        outs, total = [], 0.0
        try:
            for batch in tqdm(batches, disable=not progress, leave=False, desc="batches"):
                kw = wl.make_kwargs(batch)
                timing.sync()
                start = time.perf_counter()
                with torch.no_grad():
                    out = wl.pipe(**kw)
                timing.sync()
                total += time.perf_counter() - start
                outs.append(wl.to_images(out).float().cpu())
        finally:
            timer.close()
        e2e.append(total)
        inner.append(timer.total)
        images = torch.cat(outs) if outs else torch.empty(0)
    return images, e2e, inner


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
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"two configs share a name: {names}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="fastdiff-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-digits", help="reference model name or tiny family name")
    ap.add_argument("--preset", action="append", help="fastdiff preset (repeatable)")
    ap.add_argument("--config", action="append", help="fastdiff YAML config (repeatable)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes over all samples (median reported)")
    ap.add_argument("--inception-weights", help="local Inception weights file for FID (never downloaded)")
    ap.add_argument("--lpips-weights", help="local LPIPS weights (see README)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="recompute configs whose result file exists")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    if torch.cuda.is_available():
        wl.pipe.to(state.device)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = configs(args)
    with state.split_between_processes(list(range(args.samples))) as mine:
        mine = list(mine)
    refs = _references(args, wl) if state.is_main_process else {}
    base = None
    rows = []
    for name, cfg in todo:
        path = args.out / f"{name}.json"
        if path.exists() and not args.force and name != "baseline":
            rows.append(json.loads(path.read_text()))
            continue
        ctx = fastdiff.accelerated(wl.pipe, cfg) if cfg is not None else _nothing()
        with ctx as handle:
            images, e2e, inner = generate(wl, mine, args.batch_size, args.repeats, state.is_main_process)
            summary = handle.summary() if handle is not None else None
        gathered = gather_object([(mine, images, e2e, inner)])  # every process's samples and timings
        if not state.is_main_process:
            continue
        order = sorted(((i, img) for idx, imgs, _, _ in gathered for i, img in zip(idx, imgs)), key=lambda p: p[0])
        images = torch.stack([img for _, img in order])
        e2e = [sum(p[2][k] for p in gathered) for k in range(len(e2e))]  # total over processes, per pass
        inner = [sum(p[3][k] for p in gathered) for k in range(len(inner))]
        row = {"name": name, "config": cfg.to_dict() if cfg is not None else None, "samples": len(images),
               "processes": state.num_processes, "time_s": statistics.median(e2e), "spread_s": timing.spread(e2e),
               "denoiser_s": statistics.median(inner),
               "flops_speedup": summary.estimated_speedup if summary is not None else 1.0}
        if name == "baseline":
            base = images
            torch.save(images, args.out / "baseline.pt")
        elif base is None:
            base = torch.load(args.out / "baseline.pt")
        row.update(evaluate(images, base, wl, refs))
        base_row = rows[0] if rows else row
        row["speedup"] = base_row["time_s"] / row["time_s"]
        row["denoiser_speedup"] = base_row["denoiser_s"] / row["denoiser_s"]
        path.write_text(json.dumps(row, indent=1, default=_json))
        grid(images[:40], args.out / f"{name}.png")
        rows.append(row)
        print(f"{name:<40} {row['time_s']:.3f}s  {row['speedup']:.2f}x  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}"
              + (f"  acc {row['class_accuracy']:.3f}" if "class_accuracy" in row else ""), flush=True)
    if state.is_main_process:
        write_tables(rows, args.out, wl)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _json(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return str(v)


def grid(images: torch.Tensor, path: Path, cols: int = 10) -> None:
    """A PNG grid of (N, C, H, W) images in [0, 1] (first three channels; latents are min-max scaled)."""
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
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def write_tables(rows, out: Path, wl) -> None:
    keys = sorted({k for r in rows for k in r if k != "config"}, key=lambda k: (k != "name", k))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps({"workload": wl.describe, "rows": rows}, indent=1, default=_json))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows[1:]:
        ax.scatter(r["speedup"], min(r["psnr"], 80))
        ax.annotate(r["name"], (r["speedup"], min(r["psnr"], 80)), fontsize=6)
    ax.set_xlabel("speedup (same run)")
    ax.set_ylabel("PSNR vs baseline, dB")
    ax.set_title(wl.name + ("" if wl.trained else " (random weights)"))
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
