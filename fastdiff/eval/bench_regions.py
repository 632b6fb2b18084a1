"""Region-adaptive upsampling benchmark: a bottleneck region stage against the plain bottleneck at equal cost, the
same stage list at fraction 0 and 1, fewer steps at equal cost, and caching stacked — one process, the same seeds,
timed interleaved (`bench_bottleneck`'s measures: class accuracy and Fréchet distance judge a re-noised run; PSNR to
the full run is printed but strict).

    python -m fastdiff.eval.bench_regions --model ref-flux --samples 20 --steps 20 --out eval/results/regions-ref-flux

Every arm samples in calls of `--batch` images: in a region stage each image with its own regions is its own
transformer call (FLUX takes one set of positions per call), and with true CFG a step may make at most 4 calls.
"Equal cost" arms are chosen by `fastdiff.estimate`: the plain two-stage schedule (same final strength) and the step
count whose estimated FLOPs are nearest the region row's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastdiff

from . import timing, workloads
from .bench_bottleneck import table


def regions(r: float | None, low=0.5, mid=0.25, strength=(0.7, 0.6)) -> dict:
    """low at half size, then a region stage of fraction r (None: a plain scale-2 stage), then full size."""
    middle = {"scale": 2} if r is None else {"scale": 2, "regions": r}
    return {"bottleneck": {"stages": [{"scale": 2, "steps": low, "strength": 1.0},
                                      {**middle, "steps": mid, "strength": strength[0]},
                                      {"scale": 1, "steps": round(1 - low - mid, 3), "strength": strength[1]}]}}


def plain(n_low: int, steps: int, strength: float) -> dict:
    return {"bottleneck": {"stages": [{"scale": 2, "steps": n_low, "strength": 1.0},
                                      {"scale": 1, "steps": steps - n_low, "strength": strength}]}}


def _sizes(wl) -> dict:
    """The call's size and text tokens, for `fastdiff.estimate`: a tiny pipeline's call gives them, a reference
    pipeline's are its own defaults."""
    kw = wl.make_kwargs([0])
    if "height" in kw:
        return dict(height=kw["height"], width=kw["width"], text_tokens=kw["prompt_embeds"].shape[1])
    size = wl.pipe.config.sample_size
    return dict(height=size, width=size, text_tokens=wl.pipe.class_prompt(torch.tensor([0]))[0].shape[1])


def configs(wl, steps: int, fractions: list[float], strength: float) -> tuple[dict, dict]:
    """(name -> fastdiff config, name -> steps of a fewer-steps arm) of every arm but the baseline."""
    size = _sizes(wl)

    def speed(cfg):
        return fastdiff.estimate(wl.pipe, cfg, steps=steps, **size).speedup

    out, few = {}, {}
    for r in fractions:
        cfg = regions(r, strength=(0.7, strength))
        out[f"regions {r:g}"] = cfg
        target = speed(cfg)
        n_low = min(range(1, steps), key=lambda n: abs(speed(plain(n, steps, strength)) - target))
        if plain(n_low, steps, strength) not in out.values():
            out[f"plain {n_low}/{steps - n_low} (equal cost to regions {r:g})"] = plain(n_low, steps, strength)
        n = max(1, round(steps / target))
        if n not in few.values():
            few[f"fewer steps ({n}, equal cost to regions {r:g})"] = n
    out["same stages, fraction 0 (plain scale-2 middle)"] = regions(0.0, strength=(0.7, strength))
    out["same stages, fraction 1 (earlier full-size switch)"] = regions(1.0, strength=(0.7, strength))
    mid = fractions[len(fractions) // 2]
    out[f"regions {mid:g} + static cache (interval 2)"] = {
        **regions(mid, strength=(0.7, strength)), "cache": {"policy": "static", "interval": 2, "warmup": 1, "cooldown": 1}}
    return out, few


def _arm(name, wl, batch, session=None, finish=None, steps=None):
    """An arm sampling the workload in calls of `batch` images (sample i is the same whatever call it is in)."""
    chunks = [list(range(i, min(i + batch, wl.samples))) for i in range(0, wl.samples, batch)]

    def prepare():
        kws = [wl.make_kwargs(c) for c in chunks]
        return kws if steps is None else [{**kw, "num_inference_steps": steps} for kw in kws]

    def call(kws):
        out = torch.cat([wl.to_images(wl.pipe(**kw)).float().cpu() for kw in kws])
        return out.unsqueeze(1) if out.ndim == 3 else out  # a tiny pipeline's packed latents, as one-channel images

    kw = {} if session is None else dict(session=session, finish=finish)
    return timing.Arm(name, call, prepare=prepare, **kw)


def run(args):
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    classify, frechet = timing.class_accuracy(args.model), timing.frechet_to_real(args.model)
    cfgs, few = configs(wl, args.steps, args.fractions, args.strength)
    arms = [_arm("baseline", wl, args.batch)]
    meta = {"baseline": dict(method="baseline", config="-", note="")}
    for name, cfg in cfgs.items():
        with fastdiff.accelerated(wl.pipe, cfg):  # refused here, before any timing
            pass
        arms.append(_arm(name, wl, args.batch, session=lambda cfg=cfg: fastdiff.accelerated(wl.pipe, cfg),
                         finish=lambda h: h.summary()))
        meta[name] = dict(method=name, config=json.dumps(cfg), note="")
    for name, n in few.items():
        arms.append(_arm(name, wl, args.batch, steps=n))
        meta[name] = dict(method=name, config=f"num_inference_steps={n}", note="")
    timed = timing.interleaved(arms, args.repeats, warmup=1)

    def flops_of(name, s):
        if hasattr(s, "estimated_speedup"):
            return s.estimated_speedup
        return 1.0 if name == "baseline" else args.steps / few[name]

    rows = timing.result_rows(timed, meta, wl.trained, flops_of, classify, frechet=frechet)
    for r in rows:
        print(f"{r['method']:<56} {timing.time_cell(r)} s  {timing.speed_cell(r)}  PSNR {r['psnr']:6.2f}  "
              f"acc {r.get('accuracy', float('nan')):.2f}  FD {r.get('fd_real', float('nan')):.1f}", flush=True)
    return rows, wl


def write(rows, wl, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = timing.environment("fastdiff.eval.bench_regions", wl)
    timing.write_results(out, env, rows, ["method", *timing.RESULT_KEYS, "fd_real", "config"])
    lines = [f"# Region-adaptive upsampling benchmark: {wl.name}", "", *(f"- **{k}**: {v}" for k, v in env.items()),
             "", timing.TABLE_NOTE, "", *table(rows)]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-flux")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2, help="images per pipeline call (true CFG: at most 2)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--strength", type=float, default=0.6, help="the full-size stage's strength (plain arms too)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, wl = run(args)
    write(rows, wl, args.out)
    print(f"wrote {args.out}/README.md, results.json, results.csv")


if __name__ == "__main__":
    main()
