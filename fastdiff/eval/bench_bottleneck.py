"""Resolution-bottleneck benchmark: baseline, stage schedules, the same compute spent at full size with fewer steps,
re-noising without a resolution change, and bottleneck composed with caching — one process, one model, the same
seeds, timed interleaved.

    python -m fastdiff.eval.bench_bottleneck --model ref-flux --samples 20 --steps 20 --out eval/results/bottleneck-ref-flux
    python -m fastdiff.eval.bench_bottleneck --model ref-unet --samples 20 --steps 20 --out eval/results/bottleneck-ref-unet

Any sampler the bottleneck runs: FlowMatchEuler (ref-flux, ref-flux-textures) and the stateful ones (DPM-Solver on
ref-unet and ref-digits, epsilon prediction). Rows that only a flow-matching sampler can run (strength read as a
sigma) are left out on the others, and the table says so.

Fidelity: a bottleneck run follows another trajectory than the baseline, so PSNR to the baseline's output is a
strict measure (it is printed); what the samples are is judged by the reference classifier (class accuracy) and the
Fréchet distance of its features to held-out real images. The control rows "fewer steps (n)" spend the compute of
each schedule above (n = steps / its FLOPs speedup, by fastdiff's cost model of one sample's run) at full size: a
stage schedule is worth having only where it beats the one of equal cost. The row "re-noise at full size" runs the
same re-noising with no resolution change: what the re-noise alone does to the samples.
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


def _two(strength, low=0.6, scale=2, **kw):
    return {"bottleneck": {"stages": [dict(TWO[0], steps=low, scale=scale),
                                      dict(TWO[1], steps=round(1 - low, 3), strength=strength)], **kw}}


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
    "re-noise at full size, strength 0.7 (control: no resolution change)": _two(0.7, scale=1),
}
# rows only a flow-matching sampler runs: a stateful one schedules each stage img2img-style (strength_is="time")
FLOW_ONLY = {name for name, cfg in CONFIGS.items() if cfg["bottleneck"].get("strength_is") == "sigma"}


def configs_for(pipe) -> tuple[dict, list[str]]:
    """The rows this pipeline's sampler runs, and the names of those it does not."""
    from fastdiff.mechanisms.bottleneck.driver import FLOW_SCHEDULERS

    flow = type(pipe.scheduler).__name__ in FLOW_SCHEDULERS
    skipped = [] if flow else sorted(FLOW_ONLY)
    return {k: v for k, v in CONFIGS.items() if k not in skipped}, skipped


def cost_speedup(wl, cfg) -> float:
    """The FLOPs speedup fastdiff's cost model gives one sample's run of `cfg` (untimed)."""
    with fastdiff.accelerated(wl.pipe, cfg) as h:  # a refusal shows here, before any timing
        wl.pipe(**wl.make_kwargs([0]))
        return h.summary().estimated_speedup


def run(args):
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    classify, frechet = timing.class_accuracy(args.model), timing.frechet_to_real(args.model)
    configs, skipped = configs_for(wl.pipe)
    arms = [timing.workload_arm("baseline", wl)]
    meta = {"baseline": dict(method="baseline", config="-", note="")}
    cost = {}
    for name, cfg in configs.items():
        cost[name] = cost_speedup(wl, cfg)
        arms.append(timing.workload_arm(name, wl, session=lambda cfg=cfg: fastdiff.accelerated(wl.pipe, cfg),
                                        finish=lambda h: h.summary()))
        meta[name] = dict(method=name, config=json.dumps(cfg), note="")
    # the controls: each schedule's compute spent at full size with fewer steps
    fewer = sorted({max(2, round(args.steps / sp)) for sp in cost.values() if sp > 1.05}, reverse=True)
    if args.control_steps:
        fewer = sorted(set(args.control_steps), reverse=True)
    for n in fewer:
        name = f"fewer steps ({n})"
        arms.append(timing.Arm(name, lambda kw: wl.to_images(wl.pipe(**kw)).float().cpu(),
                               prepare=lambda n=n: {**wl.make_kwargs(), "num_inference_steps": n}))
        meta[name] = dict(method=name, config=f"num_inference_steps={n}", note="")
    timed = timing.interleaved(arms, args.repeats, warmup=1)

    def flops_of(name, s):
        if hasattr(s, "estimated_speedup"):
            return s.estimated_speedup
        return 1.0 if name == "baseline" else args.steps / int(name.split("(")[1].rstrip(")"))

    rows = timing.result_rows(timed, meta, wl.trained, flops_of, classify, frechet=frechet)
    for r in rows:
        print(f"{r['method']:<68} {timing.time_cell(r)} s  {timing.speed_cell(r)}  FLOPs {r['flops_speedup']:.2f}x  "
              f"PSNR {r['psnr']:6.2f}  acc {_num(r.get('accuracy')):.2f}  FD {_num(r.get('fd_real')):.1f}", flush=True)
    return rows, wl, skipped


def _num(value) -> float:
    return float("nan") if value is None else value


def write(rows, wl, args, out: Path, skipped=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = timing.environment("fastdiff.eval.bench_bottleneck", wl, sampler=type(wl.pipe.scheduler).__name__)
    keys = ["method", *timing.RESULT_KEYS, "fd_real", "config"]
    timing.write_results(out, env, rows, keys)
    lines = [f"# Resolution-bottleneck benchmark: {wl.name}", "", *(f"- **{k}**: {v}" for k, v in env.items()), "",
             timing.TABLE_NOTE, ""]
    if skipped:
        lines += [f"Not run with {type(wl.pipe.scheduler).__name__} (a stateful sampler schedules each stage "
                  f"img2img-style; strength as a sigma is FlowMatchEuler's): {', '.join(skipped)}.", ""]
    (out / "README.md").write_text("\n".join(lines + table(rows)) + "\n")


def table(rows) -> list[str]:
    """The markdown table of a bottleneck benchmark's rows (this one's and bench_regions')."""
    lines = ["| method | time s ± spread | speedup [per-round range] | FLOPs x | PSNR dB | SSIM | class acc | FD (clf) "
             "| config |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}"
        lines.append(f"| {r['method']} | {timing.time_cell(r)} | {timing.speed_cell(r)} | {fl} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {_num(r.get('accuracy')):.2f} | {_num(r.get('fd_real')):.1f} | "
                     f"`{r['config']}` |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-flux")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control-steps", type=int, nargs="*", default=None,
                    help="the fewer-steps rows' step counts (default: each schedule's cost at full size)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, wl, skipped = run(args)
    write(rows, wl, args, args.out, skipped)
    print(f"wrote {args.out}/README.md, results.json, results.csv")


if __name__ == "__main__":
    main()
