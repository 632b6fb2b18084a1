"""Resolution-bottleneck benchmark: baseline, stage schedules, the same step budget spent at full size, and
bottleneck composed with caching — one process, one model, the same seeds, timed interleaved.

    python -m fastdiff.eval.bench_bottleneck --model ref-flux --samples 20 --steps 20 --out eval/results/bottleneck-ref-flux

Fidelity: a bottleneck run follows another trajectory than the baseline, so PSNR to the baseline's output is a
strict measure (it is printed); what the samples are is judged by the reference classifier (class accuracy) and the
Fréchet distance of its features to held-out real images. The control row "fewer steps" spends about the same
compute at full size with fewer steps: a stage schedule is worth having only where it beats that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastdiff

from . import timing, workloads

TWO = [{"scale": 2, "steps": 0.6, "strength": 1.0}, {"scale": 1, "steps": 0.4}]
THREE = [{"scale": 1, "steps": 0.2, "strength": 1.0}, {"scale": 2, "steps": 0.5, "strength": 0.8},
         {"scale": 1, "steps": 0.3, "strength": 0.6}]


def _two(strength, low=0.6, **kw):
    return {"bottleneck": {"stages": [dict(TWO[0], steps=low), dict(TWO[1], steps=round(1 - low, 3),
                                                                   strength=strength)], **kw}}


CONFIGS = {
    "low 60% then full, strength 0.5": _two(0.5),
    "low 60% then full, strength 0.7": _two(0.7),
    "low 60% then full, strength 0.85": _two(0.85),
    "low 60% then full, strength 0.7, sigma rule": _two(0.7, strength_is="sigma"),
    "low 60% then full, strength 0.7, lanczos": _two(0.7, resize="lanczos"),
    "low 80% then full, strength 0.7": _two(0.7, low=0.8),
    "full-low-full (Bottleneck Sampling)": {"bottleneck": {"stages": THREE}},
    "full-low-full, sigma rule": {"bottleneck": {"stages": THREE, "strength_is": "sigma"}},
    "low 60% then full 0.7 + static cache (interval 2)": {**_two(0.7), "cache": {"policy": "static", "interval": 2,
                                                                               "warmup": 1, "cooldown": 1}},
}


def run(args):
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    classify, frechet = timing.class_accuracy(args.model), timing.frechet_to_real(args.model)
    arms = [timing.workload_arm("baseline", wl)]
    meta = {"baseline": dict(method="baseline", config="-", note="")}
    for name, cfg in CONFIGS.items():
        with fastdiff.accelerated(wl.pipe, cfg):  # refused here, before any timing
            pass
        arms.append(timing.workload_arm(name, wl, session=lambda cfg=cfg: fastdiff.accelerated(wl.pipe, cfg),
                                        finish=lambda h: h.summary()))
        meta[name] = dict(method=name, config=json.dumps(cfg), note="")
    # the control: about the compute of the cheapest schedule above, spent at full size with fewer steps
    few = max(2, round(args.steps * args.control_fraction))
    arms.append(timing.Arm(f"fewer steps ({few})", lambda kw: wl.to_images(wl.pipe(**kw)).float().cpu(),
                           prepare=lambda: {**wl.make_kwargs(), "num_inference_steps": few}))
    meta[f"fewer steps ({few})"] = dict(method=f"fewer steps ({few})", config=f"num_inference_steps={few}", note="")
    timed = timing.interleaved(arms, args.repeats, warmup=1)

    def flops_of(name, s):
        if hasattr(s, "estimated_speedup"):
            return s.estimated_speedup
        return 1.0 if name == "baseline" else args.steps / few

    rows = timing.result_rows(timed, meta, wl.trained, flops_of, classify, frechet=frechet)
    for r in rows:
        print(f"{r['method']:<48} {timing.time_cell(r)} s  {timing.speed_cell(r)}  PSNR {r['psnr']:6.2f}  "
              f"acc {r.get('accuracy', float('nan')):.2f}  FD {r.get('fd_real', float('nan')):.1f}", flush=True)
    return rows, wl


def write(rows, wl, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = timing.environment("fastdiff.eval.bench_bottleneck", wl)
    (out / "results.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1, default=str))
    lines = [f"# Resolution-bottleneck benchmark: {wl.name}", "", *(f"- **{k}**: {v}" for k, v in env.items()), "",
             timing.TABLE_NOTE, "",
             "| method | time s ± spread | speedup [per-round range] | FLOPs x | PSNR dB | SSIM | class acc | FD (clf) "
             "| config |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}"
        lines.append(f"| {r['method']} | {timing.time_cell(r)} | {timing.speed_cell(r)} | {fl} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r.get('accuracy', float('nan')):.2f} | {r.get('fd_real', float('nan')):.1f} | "
                     f"`{r['config']}` |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-flux")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control-fraction", type=float, default=0.55,
                    help="the control row's steps as a fraction of --steps (about a 2-stage schedule's compute)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, wl = run(args)
    write(rows, wl, args, args.out)
    print(f"wrote {args.out}/README.md, results.json")


if __name__ == "__main__":
    main()
