"""Token-merging benchmark: baseline, fastdiff ToMe / ToDo at three ratios, and tomesd — one process, one model,
the same seeds and steps.

    python -m fastdiff.eval.bench_merge --model sd15 --size 128 --samples 2 --steps 10 --threads 1 \\
        --out eval/results/merge-sd15

--model: a tiny family ("sd15", "dit", "pixart", "flux", ...: seeded random weights) or a reference model the
project trained ("ref-digits"). --size: output height/width in pixels for tiny families; merging only pays with
many tokens, so benchmark at sizes where the merged level holds 1000+ of them (the tiny VAE is 2x: --size 128 is a
64x64 latent, 4096 tokens at a UNet's level 0, 32x32 = 1024 tokens for a patch-2 DiT). Tiny DiTs take their size
from the transformer config, so for them a DiT of that sample size is built with the tiny config.

--methods "tome (self-attn),tomesd": only these rows (FASTDIFF's method names, "tomesd") after the baseline.

--sweep 32,64,128,256: instead, where merging starts to pay: baseline vs ToMe 0.5 and ToDo 2x2 at each size
(fewer steps), with the tokens of the merged level, written to <out>/sweep.md and sweep.json.

Writes <out>/results.json, results.csv and README.md (the table, device, versions, command). Speedup = baseline
median time / method median time, measured here; PSNR/SSIM against the baseline output of the same seeds; "FLOPs x"
is fastdiff's own accounting of what the run computed (summary()). tomesd is applied to the denoiser (it raises on
a DiT/PixArt pipeline object); it measures downsampling against the latent, so on patch-2 DiTs it needs
max_downsample=2 to merge at all — the benchmark gives it that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
from pathlib import Path

import torch

import fastdiff
from fastdiff.integrations.diffusers import find_parts

from . import timing, tiny, workloads

RATIOS = (0.3, 0.5, 0.7)
# method -> level (ratio) -> merge section; ToDo's key reduction is set by its factor, not a ratio
FASTDIFF = {
    "tome (self-attn)": {r: {"method": "tome", "ratio": r} for r in RATIOS},
    "tome per level (self-attn)": {r: {"method": "tome", "ratio": r, "share": "level"} for r in RATIOS},
    "tome (self-attn + mlp)": {r: {"method": "tome", "ratio": r, "targets": ["self_attention", "mlp"]} for r in RATIOS},
    "tome proportional (self-attn)": {r: {"method": "tome", "ratio": r, "proportional": True} for r in RATIOS},
    "todo": {"f2": {"method": "todo", "factor": 2}, "f3": {"method": "todo", "factor": 3}},
}


def load(args) -> workloads.Workload:
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    if args.model not in tiny.FAMILIES or not args.size:
        return wl
    if args.model == "dit":  # DiTPipeline samples at transformer.config.sample_size: build one of that size
        import diffusers

        config = dict(wl.pipe.transformer.config)
        config["sample_size"] = args.size // 2  # the tiny VAE is 2x
        torch.manual_seed(args.seed)
        wl.pipe.register_modules(transformer=diffusers.DiTTransformer2DModel.from_config(config).eval())
        wl.describe += f", DiT sample_size {config['sample_size']}"
        return wl
    make = wl.make_kwargs
    wl.make_kwargs = lambda indices=None: {**make(indices), "height": args.size, "width": args.size}
    wl.describe += f", {args.size}x{args.size} px"
    return wl


def arm(name: str, wl: workloads.Workload, **kw) -> timing.Arm:
    """A workload arm whose output is reshaped to an image grid (Flux's packed latents)."""
    a = timing.workload_arm(name, wl, **kw)
    call = a.call
    a.call = lambda prepared: _as_grid(call(prepared))
    return a


def _as_grid(x: torch.Tensor) -> torch.Tensor:
    """Packed (B, tokens, C) latents (Flux's latent output) as (B, C, h, w) on their square grid, for SSIM."""
    if x.ndim != 3:
        return x
    b, n, c = x.shape
    side = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, side, n // side) if side * side == n else x




def run(args):
    """Check every method applies, then time baseline, fastdiff and tomesd in one interleaved comparison."""
    wl = load(args)
    classify = timing.class_accuracy(args.model)
    arms = [arm("baseline", wl)]
    meta = {"baseline": dict(method="baseline", level="-", config="baseline", tokens="", note="")}
    refused = []
    for method, levels in FASTDIFF.items():
        if args.methods and method not in args.methods:
            continue
        for level, merge in levels.items():
            try:
                with fastdiff.accelerated(wl.pipe, merge=merge):  # refused here, before any timing
                    pass
            except fastdiff.UnsupportedModelError as err:
                refused.append(dict(method=f"fastdiff {method}", level=str(level), config="-", note=f"refused: {err}"))
                continue
            name = f"fastdiff {method} / {level}"
            arms.append(arm(name, wl, session=lambda merge=merge: fastdiff.accelerated(wl.pipe, merge=merge),
                            finish=lambda h: h.summary()))
            meta[name] = dict(method=f"fastdiff {method}", level=str(level), note="")
    if not args.no_tomesd and (not args.methods or "tomesd" in args.methods):
        refused += tomesd_arms(wl, arms, meta)

    timed = timing.interleaved(arms, args.repeats, warmup=1)

    def flops_of(name, s):
        return s.estimated_speedup if s is not None else (1.0 if name == "baseline" else None)

    def tokens(name, t, row):
        if t.extra is not None:
            merged = next((d for r in t.extra.per_step for d in r.decisions if d), "")
            row.update(config=t.extra.config, tokens=merged.replace("merge=", ""))

    rows = timing.result_rows(timed, meta, wl.trained, flops_of, classify, tokens)
    for row in rows:
        print(_line(row), flush=True)
    return rows + refused, wl


def tomesd_arms(wl, arms, meta) -> list[dict]:
    """Append an arm per tomesd ratio (applied to the denoiser around every timed call); returns the rows of what
    fails: handing tomesd the pipeline, and sampling with it (tried once here, before any timing)."""
    try:
        import tomesd
    except ImportError:
        return [dict(method="tomesd", level="-", config="-", note="not installed (pip install tomesd --no-deps)")]
    _, denoiser, _ = find_parts(wl.pipe)
    failed = []
    try:  # what users do first: hand it the pipeline
        tomesd.apply_patch(wl.pipe, ratio=0.5)
        tomesd.remove_patch(wl.pipe)
    except Exception as err:  # noqa: BLE001  (a peer's failure is a result)
        failed.append(dict(method="tomesd", level="pipeline", config="-",
                           note=f"apply_patch(pipe) fails: {type(err).__name__}: {err}"))
    # the latent it measures downsampling on is the patch grid times the patch size on DiTs
    md = 2 if getattr(denoiser.config, "patch_size", None) == 2 else 1
    for ratio in RATIOS:
        kwargs = dict(ratio=ratio, max_downsample=md, sx=2, sy=2, use_rand=True, merge_attn=True,
                      merge_crossattn=False, merge_mlp=False)

        @contextlib.contextmanager
        def session(kwargs=kwargs):
            tomesd.apply_patch(denoiser, **kwargs)
            try:
                yield None
            finally:
                tomesd.remove_patch(denoiser)

        try:
            with session(), torch.no_grad():
                wl.pipe(**wl.make_kwargs())
        except Exception as err:  # noqa: BLE001
            failed.append(dict(method="tomesd", level=str(ratio), config="-",
                               note=f"apply_patch(denoiser) then sampling fails: {type(err).__name__}: {err}"))
            break
        name = f"tomesd / {ratio}"
        arms.append(arm(name, wl, session=session))
        meta[name] = dict(method="tomesd (self-attn)", level=str(ratio), config=json.dumps(kwargs), tokens="",
                          note=f"tomesd {getattr(tomesd, '__version__', '0.1.3')} applied to {type(denoiser).__name__}")
    return failed


SWEEP = {"tome 0.5": {"method": "tome", "ratio": 0.5}, "todo f2": {"method": "todo", "factor": 2}}


def sweep(args) -> list[dict]:
    """Measured speedup of ToMe 0.5 and ToDo 2x2 over baseline at each size: where merging starts to pay."""
    rows = []
    for size in args.sweep:
        args.size = size
        wl = load(args)
        arms = [arm("baseline", wl)]
        for name, merge in SWEEP.items():
            try:
                with fastdiff.accelerated(wl.pipe, merge=merge):
                    pass
            except fastdiff.UnsupportedModelError:
                continue
            arms.append(arm(name, wl, session=lambda merge=merge: fastdiff.accelerated(wl.pipe, merge=merge),
                            finish=lambda h: h.summary()))
        timed = timing.interleaved(arms, args.repeats, warmup=1)
        row = dict(size=size, baseline_s=timed["baseline"].median, baseline_spread=timed["baseline"].spread)
        for name, t in timed.items():
            if name == "baseline":
                continue
            s = t.extra
            decision = next((d for r in s.per_step for d in r.decisions if d), "").replace("merge=", "")
            row["tokens"] = decision.replace("kv ", "").split(">")[0]
            row[name] = dict(timing.fields(timed["baseline"], t, s.estimated_speedup), flops=s.estimated_speedup)
        rows.append(row)
        print(row, flush=True)
    return rows


def write_sweep(rows, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    names = [n for n in SWEEP if any(n in r for r in rows)]
    lines = [f"# Where token merging starts to pay: {args.model}", "",
             f"- **device**: {timing.device()}, {torch.get_num_threads()} thread(s); torch {torch.__version__}, "
             f"diffusers {__import__('diffusers').__version__}",
             "- **command**: python -m fastdiff.eval.bench_merge " + shlex.join(sys.argv[1:]), "", timing.TABLE_NOTE, "",
             "| size px | tokens on the merged level | baseline s | " + " | ".join(f"{n} speedup (FLOPs x)" for n in names)
             + " |", "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = [f"{timing.speed_cell(r[n])} ({r[n]['flops']:.2f})" if n in r else "-" for n in names]
        lines.append(f"| {r['size']} | {r.get('tokens', '-')} | {r['baseline_s']:.3f} ±{r['baseline_spread']:.0%} | "
                     + " | ".join(cells) + " |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")






def _line(r) -> str:
    fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}x"
    acc = f"  acc {r['accuracy']:.3f}" if "accuracy" in r else ""
    return (f"{r['method']:<32} {r['level']:<8} {timing.time_cell(r)} s  {timing.speed_cell(r)}  PSNR {r['psnr']:6.2f}  "
            f"SSIM {r['ssim']:.4f}  FLOPs {fl}{acc}  {r.get('tokens', '')}")


def write(rows, wl, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = timing.environment("fastdiff.eval.bench_merge", wl, tomesd=_version("tomesd"))
    timing.write_results(out, env, rows, ["method", "level", *timing.RESULT_KEYS, "tokens", "config", "note"])
    lines = [f"# Token-merging benchmark: {wl.name}", "", *(f"- **{k}**: {v}" for k, v in env.items()), "",
             timing.TABLE_NOTE, "",
             "| method | ratio | time s ± spread | speedup [per-round range] | PSNR dB | SSIM | FLOPs x | class acc | "
             "tokens (per merged level) | config / note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "time_s" not in r:
            lines.append(f"| {r['method']} | {r['level']} | - | - | - | - | - | - | - | {r['note']} |")
            continue
        fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}"
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        lines.append(f"| {r['method']} | {r['level']} | {timing.time_cell(r)} | {timing.speed_cell(r)} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {fl} | {acc} | {r.get('tokens', '')} | `{r['config']}` "
                     f"{r.get('note', '')} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"




def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--size", type=int, default=128, help="tiny families: output height/width in pixels")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-tomesd", action="store_true")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",")], default=None,
                    help=f"comma-separated subset of {list(FASTDIFF)} and 'tomesd' (default: all)")
    ap.add_argument("--sweep", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="comma-separated sizes: measure where merging starts to pay instead")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    unknown = set(args.methods or ()) - set(FASTDIFF) - {"tomesd"}
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose among {list(FASTDIFF)} and 'tomesd'")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        write_sweep(sweep(args), args)
        print(f"wrote {args.out}/sweep.md, sweep.json")
        return
    rows, wl = run(args)
    write(rows, wl, args.out)
    print(f"wrote {args.out}/README.md, results.json, results.csv")


if __name__ == "__main__":
    main()
