"""Latency-model benchmark: predicted against measured speedups, and the planner's picks against single mechanisms.

    python -m fastdiff.eval.bench_latency --threads 1 --out eval/results/latency-model            # the full run
    python -m fastdiff.eval.bench_latency --quick --out /tmp/latency-smoke                         # a smoke run

Part 1 (the model): on ref-digits, ref-unet, ref-flux and medium random DiTs (1024 and 4096 tokens) and UNet (2304
tokens at its finest level), each model is first calibrated (`fastdiff.calibrate_latency`, timed and reported),
then dense and each config are run as whole sampling calls, interleaved (fastdiff.eval.timing). The denoiser's own
time per run is summed by hooks around its calls (the mechanisms' wrappers run inside them); the latency model
predicts that time (`fastdiff.estimate(...).seconds`), so the table compares the predicted and measured speedups
of the denoiser time (error = predicted / measured - 1) and shows the whole call's wall speedup beside them.

Part 2 (the planner): at 2x and 3x on ref-digits and ref-flux, `fastdiff.plan(speedup=...)`'s pick is run beside
single-mechanism settings; the best single setting whose measured speedup is at least the pick's (within 3%) is
compared by PSNR against the dense samples and class accuracy, and so is cache-dit's best setting (DBCache, and
DBCache + TaylorSeer, thresholds searched to the targets' equal compute by fastdiff.eval.peers) at that speedup.

Writes results.json, results.csv and README.md under --out, and the calibrations under --out/calibrations/.
`--write-default` also stores a joint fit over every model's calibration points as the shipped default
(fastdiff/configs/latency-default.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import fastdiff
from fastdiff.cost import latency as _latency
from fastdiff.integrations.diffusers import find_parts

from . import timing, workloads

ROOT = Path(__file__).resolve().parents[2]
CACHE = lambda i: {"cache": {"policy": "static", "interval": i, "warmup": 1, "cooldown": 1}}  # noqa: E731
TOME = lambda r: {"merge": {"method": "tome", "ratio": r}}  # noqa: E731
WINDOW = {"sparse": {"pattern": "window", "window": [3, 3, 3]}}
TOPK = lambda d: {"sparse": {"pattern": "topk", "density": d}}  # noqa: E731
SKIP = {"guidance": {"mode": "step", "start": 0.5}}
LOW60 = {"bottleneck": {"stages": [{"scale": 2, "steps": 0.6, "strength": 1.0},
                                   {"scale": 1, "steps": 0.4, "strength": 0.7}]}}

# model -> (workload kwargs, configs): >= 20 configs in all, caching, merging, sparse and compositions
MODELS = {
    "ref-digits": (dict(samples=4, steps=10), {
        "static i2": CACHE(2), "static i4": CACHE(4), "tome 0.5": TOME(0.5), "CFG skip 0.5": SKIP,
        "static i3 + tome 0.5": {**CACHE(3), **TOME(0.5)}}),
    "ref-unet": (dict(samples=2, steps=10), {
        "static i2": CACHE(2), "window 3x3": WINDOW, "top-k 25%": TOPK(0.25), "tome 0.5": TOME(0.5),
        "static i2 + CFG skip 0.5": {**CACHE(2), **SKIP}}),
    "ref-flux": (dict(samples=2, steps=10), {
        "static i4": CACHE(4), "CFG skip 0.5": SKIP, "bottleneck 60%": LOW60, "bottleneck 60% + static i2": {
            **LOW60, **CACHE(2)}}),
    "dit-1k": (dict(samples=1, steps=6, side=128, heads=4), {
        "window 3x3": WINDOW, "top-k 10%": TOPK(0.1), "tome 0.5": TOME(0.5), "static i2": CACHE(2),
        "static i2 + window 3x3": {**CACHE(2), **WINDOW}}),
    "dit-4k": (dict(samples=1, steps=4, side=256, heads=2), {
        "window 3x3": WINDOW, "tome 0.5": TOME(0.5), "static i2": CACHE(2)}),
    "unet-2k": (dict(samples=1, steps=4, size=96), {
        "window 3x3": WINDOW, "tome 0.5": TOME(0.5), "static i2": CACHE(2)}),
}
PLAN_MODELS = {"ref-digits": dict(samples=10, steps=20), "ref-flux": dict(samples=4, steps=20)}
TARGETS = (2.0, 3.0)
# cache-dit's skip fractions, 1 - 1/target: one past 3x too, as a skip's measured speedup falls short of
# 1 / (1 - skip) (the work outside the blocks), so that some setting of theirs can reach the 3x pick's speedup
PEER_TARGETS = (2.0, 3.0, 4.0)
SINGLES = {  # the single-mechanism settings the planner's picks are compared with (fidelity.json names)
    "cache": ["static (FORA/DeepCache) / safe", "static (FORA/DeepCache) / fast", "static (FORA/DeepCache) / ultra",
              "static + Taylor-1 / safe", "static + Taylor-1 / fast", "static + Taylor-1 / ultra"],
    "guidance": ["CFG skip / safe", "CFG skip / fast", "CFG skip / ultra"],
    "merge": ["tome (self-attn) / 0.5", "tome (self-attn) / 0.7"],
    "bottleneck": ["low 60% then full, strength 0.7", "low 80% then full, strength 0.7"],
}


def load(name: str, kw: dict) -> workloads.Workload:
    """A reference workload, or a medium random DiT / UNet in the tiny pipelines (seeded random weights)."""
    import diffusers

    kw = dict(kw)
    if name.startswith("ref-"):
        return workloads.load(name, samples=kw["samples"], steps=kw["steps"])
    family = "dit" if name.startswith("dit") else "sd15"
    wl = workloads.load(family, samples=kw["samples"], steps=kw["steps"])
    torch.manual_seed(0)
    if family == "dit":
        # the tiny VAE is 2x and the patch 2: a `side`-pixel sample is (side / 4)^2 tokens
        config = dict(wl.pipe.transformer.config, sample_size=kw["side"] // 2, num_layers=4,
                      num_attention_heads=kw["heads"], attention_head_dim=64)
        wl.pipe.register_modules(transformer=diffusers.DiTTransformer2DModel.from_config(config).eval())
        tokens = (config["sample_size"] // 2) ** 2
        wl.describe = f"random DiT (4 layers, {kw['heads']}x64 heads, {tokens} tokens), {kw['steps']} steps, CFG"
    else:
        config = dict(wl.pipe.unet.config, block_out_channels=(32, 64, 64), attention_head_dim=4)
        wl.pipe.register_modules(unet=diffusers.UNet2DConditionModel.from_config(config).eval())
        make = wl.make_kwargs
        wl.make_kwargs = lambda indices=None: {**make(indices), "height": kw["size"], "width": kw["size"]}
        wl.describe = (f"random UNet (channels 32/64/64, {(kw['size'] // 2) ** 2} tokens at level 0), "
                       f"{kw['steps']} steps, CFG")
    return wl


def call_size(wl) -> tuple[int, int]:
    """The call's height and width as the pipeline takes them (what fastdiff.estimate prices): the workload's own
    when it passes them (the random UNet's tiny VAE does not match the pipeline's scale factor, so its images are
    not the call's size), else read off a one-sample run."""
    kwargs = wl.make_kwargs([0])
    if kwargs.get("height") is not None and kwargs.get("width") is not None:
        return int(kwargs["height"]), int(kwargs["width"])
    with torch.no_grad():
        out = wl.to_images(wl.pipe(**{**wl.make_kwargs([0]), "num_inference_steps": 2}))
    return int(out.shape[-2]), int(out.shape[-1])


def call_text_tokens(wl) -> int:
    """The text tokens the denoiser sees in this workload's call (what fastdiff.estimate takes as text_tokens; its
    default is the family's usual prompt length, far longer than the references' prompts)."""
    from fastdiff import planner

    _, denoiser, _ = find_parts(wl.pipe)
    args, kwargs = planner.record_call(denoiser, lambda: wl.pipe(**{**wl.make_kwargs([0]), "num_inference_steps": 1}))
    adapter = fastdiff.adapters.resolve(denoiser)
    return adapter.layout(adapter.bind(args, kwargs)).text_tokens


class DenoiserClock:
    """Seconds spent inside the denoiser's calls per run, by forward hooks around them (arm -> list per round)."""

    def __init__(self, denoiser):
        self.times: dict[str, list[float]] = {}
        self.current: str | None = None
        self._start = 0.0
        self.handles = [denoiser.register_forward_pre_hook(self._pre), denoiser.register_forward_hook(self._post)]

    def on_call(self, phase: str, name: str) -> None:
        self.current = name if phase == "timed" else None
        if self.current is not None:
            self.times.setdefault(name, []).append(0.0)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self.current is not None:
            self.times[self.current][-1] += time.perf_counter() - self._start

    def close(self):
        for h in self.handles:
            h.remove()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def calibrate(name: str, wl, args, out: Path):
    t0 = time.perf_counter()
    # the timed runs' own call (every sample, so the batch too): at one sample the small references are all per-call
    # overhead and the fit cannot see how their time grows with tokens (a bottleneck stage was priced as no saving)
    cal = fastdiff.calibrate_latency(wl.pipe, lambda: wl.pipe(**{**wl.make_kwargs(), "num_inference_steps": 2}),
                             scales=args.scales, repeats=args.cal_repeats, directory=out / "calibrations")
    took = time.perf_counter() - t0
    print(f"  calibrated {name} in {took:.1f} s: {cal.path}", flush=True)
    return cal, took


def part1(args, out: Path) -> tuple[list[dict], list[dict]]:
    rows, cals = [], []
    for name, (kw, configs) in MODELS.items():
        if args.models and name not in args.models:
            continue
        if args.quick:
            kw = dict(kw, samples=1, steps=3)
            configs = dict(list(configs.items())[:2])
        wl = load(name, kw)
        height, width = call_size(wl)
        cal, took = calibrate(name, wl, args, out)
        cals.append(dict(model=name, seconds=took, source=cal.source, path=cal.path,
                         coefficients=dataclasses.asdict(cal.coefficients),
                         points=[p[:3] for p in cal.points]))
        _, denoiser, _ = find_parts(wl.pipe)
        arms = [timing.workload_arm("baseline", wl)]
        for label, cfg in configs.items():
            fastdiff.load_config(cfg)  # a config the library refuses is a bug of this table: fail before timing
            arms.append(timing.workload_arm(label, wl, session=lambda cfg=cfg: fastdiff.accelerated(wl.pipe, cfg)))
        clock = DenoiserClock(denoiser)
        try:
            timed = timing.interleaved(arms, args.repeats, warmup=1, on_call=clock.on_call)
        finally:
            clock.close()
        cfg_on = wl.make_kwargs([0]).get("guidance_scale", getattr(wl.pipe, "_guidance_scale", 2.0)) != 1.0
        size = dict(height=height, width=width, steps=kw["steps"], batch=kw["samples"], cfg=bool(cfg_on),
                    text_tokens=call_text_tokens(wl))
        dense = fastdiff.estimate(wl.pipe, None, calibration=cal, **size)
        base_den = median(clock.times["baseline"])
        for label, cfg in configs.items():
            est = fastdiff.estimate(wl.pipe, cfg, calibration=cal, **size)
            measured = base_den / median(clock.times[label])
            predicted = dense.dense_seconds / est.seconds
            wall = timing.compare(timed["baseline"], timed[label])
            row = dict(model=name, workload=wl.describe, config=label, section=json.dumps(cfg),
                       flops_speedup=est.speedup, predicted=predicted, measured=measured,
                       error=predicted / measured - 1, flops_error=est.speedup / measured - 1,
                       predicted_s=est.seconds, measured_s=median(clock.times[label]),
                       dense_predicted_s=dense.dense_seconds, dense_measured_s=base_den,
                       wall_speedup=wall.ratio, reliable=wall.reliable, timing_note=wall.note)
            rows.append(row)
            print(f"  {name:10} {label:28} FLOPs {est.speedup:5.2f}x  predicted {predicted:5.2f}x  measured "
                  f"{measured:5.2f}x  error {row['error']:+6.1%}  (wall {wall.ratio:.2f}x{'' if wall.reliable else ' ?'})",
                  flush=True)
    return rows, cals


def part2(args) -> list[dict]:
    from fastdiff import planner

    rows = []
    for name, kw in PLAN_MODELS.items():
        if args.models and name not in args.models:
            continue
        if args.quick:
            kw = dict(kw, samples=2, steps=6)
        wl = load(name, kw)
        height, width = call_size(wl)
        cal = _latency.load(find_parts(wl.pipe)[1], ROOT / args.out / "calibrations")
        size = dict(height=height, width=width, steps=kw["steps"], batch=kw["samples"], text_tokens=call_text_tokens(wl))
        classify = timing.class_accuracy(name)
        arms = [timing.workload_arm("baseline", wl)]
        meta = {"baseline": dict(kind="baseline", target=None, choice="-", predicted=1.0)}
        for target in TARGETS:
            try:
                p = fastdiff.plan(wl.pipe, speedup=target, calibration=cal, **size)
            except fastdiff.ConfigError as err:
                rows.append(dict(model=name, kind="plan", target=target, choice="refused", note=str(err)))
                continue
            label = f"plan {target:g}x"
            arms.append(timing.workload_arm(label, wl, session=lambda c=p.config: fastdiff.accelerated(wl.pipe, c)))
            meta[label] = dict(kind="plan", target=target, choice=" + ".join(p.choices), predicted=p.speedup,
                               expected_psnr=p.psnr)
        options = planner.options_for(type(find_parts(wl.pipe)[1]).__name__)
        for mechanism, names in SINGLES.items():
            for opt in options.get(mechanism, []):
                if opt.name not in names:
                    continue
                cfg = {mechanism: opt.section}
                try:
                    est = fastdiff.estimate(wl.pipe, cfg, calibration=cal, **size)
                except (fastdiff.ConfigError, fastdiff.UnsupportedModelError):
                    continue
                if est.time_speedup <= 1.0:
                    continue  # predicted not to pay: never a rival at 2x or 3x (part 1 measures the prediction)
                label = opt.label
                arms.append(timing.workload_arm(label, wl, session=lambda c=cfg: fastdiff.accelerated(wl.pipe, c)))
                meta[label] = dict(kind="single", target=None, choice=label, predicted=est.time_speedup,
                                   expected_psnr=opt.psnr)
        refused = peer_arms(name, wl, arms, meta)
        timed = timing.interleaved(arms, args.plan_repeats, warmup=1)
        result = timing.result_rows(timed, meta, wl.trained, lambda n, s: None, classify)
        for r in result:
            r["model"] = name
        for kind, col in (("single", "best_single"), ("peer", "cache_dit")):
            rivals_of = [s for s in result if s["kind"] == kind]
            for r in result:
                if r["kind"] != "plan":
                    continue
                rival = [s for s in rivals_of if s["speedup"] >= 0.97 * r["speedup"]]
                best = max(rival, key=lambda s: s["psnr"], default=None)
                r[col] = best["choice"] if best else "none reaches this speedup"
                r[f"{col}_speedup"] = best["speedup"] if best else None
                r[f"{col}_psnr"] = best["psnr"] if best else None
                r[f"{col}_accuracy"] = best.get("accuracy") if best else None
        for r in result:
            if r["kind"] == "plan":
                print(f"  {name:10} {r['choice'][:60]:60} target {r['target']}x measured {r['speedup']:.2f}x PSNR "
                      f"{r['psnr']:.1f} acc {r.get('accuracy')} | best single: {r['best_single']} "
                      f"{r['best_single_speedup'] or 0:.2f}x {r['best_single_psnr'] or 0:.1f} dB | cache-dit: "
                      f"{r['cache_dit']} {r['cache_dit_speedup'] or 0:.2f}x {r['cache_dit_psnr'] or 0:.1f} dB",
                      flush=True)
        rows += result + refused
    return rows


def peer_arms(name: str, wl, arms, meta) -> list[dict]:
    """An arm per cache-dit setting (DBCache, DBCache + TaylorSeer; fastdiff.eval.peers drives them as
    bench_cache does) at each target: its residual threshold searched so the call skips 1 - 1/target of its block
    computations (equal compute, bench_cache's matching); returns rows naming the settings that cannot run here."""
    from . import peers
    from .bench_cache import _removing

    refused = []
    for peer in [p for p in peers.PEERS if p.startswith("cache-dit")]:
        for target in PEER_TARGETS:
            kw = wl.make_kwargs()

            def session(peer=peer, kw=kw, skip=1 - 1 / target):
                return _removing(peers.apply_peer(wl.pipe, peer, "fast", call_kwargs=kw, target_skip=skip))

            try:
                with torch.no_grad(), session():
                    pass
            except (peers.PeerError, KeyError) as err:
                refused.append(dict(model=name, kind="peer refused", target=None, choice=peer, note=str(err)))
                print(f"  {name:10} {peer}: not run ({err})", flush=True)
                break
            label = f"{peer} @ skip {1 - 1 / target:.2f}"
            arms.append(timing.workload_arm(label, wl, session=session, finish=lambda remove: remove))
            meta[label] = dict(kind="peer", target=target, choice=label, predicted=None)
    return refused


def write(out: Path, env: dict, rows: list[dict], cals: list[dict], plans: list[dict]) -> None:
    timing.write_results(out, dict(env, calibrations=cals), rows + plans,
                         ["model", "config", "flops_speedup", "predicted", "measured", "error", "wall_speedup",
                          "reliable", "kind", "target", "choice", "speedup", "psnr", "accuracy", "best_single",
                          "best_single_speedup", "best_single_psnr", "best_single_accuracy", "cache_dit",
                          "cache_dit_speedup", "cache_dit_psnr", "cache_dit_accuracy"])
    lines = ["# Latency model: predicted vs measured speedups; the planner against single mechanisms", "",
             f"Device {env['device']}, {env['threads']} thread(s), torch {env['torch']}; command: `{env['command']}`",
             "", "Timings are medians of interleaved rounds (fastdiff.eval.timing). 'measured' is the speedup of the "
             "time spent inside the denoiser's calls (summed by hooks), which the latency model predicts; 'wall' is "
             "the whole call's.", "", "## Calibrations", "",
             "| model | seconds | source |", "|---|---|---|"]
    lines += [f"| {c['model']} | {c['seconds']:.1f} | {c['source']} |" for c in cals]
    lines += ["", "## Predicted vs measured (denoiser time)", "",
              "| model | config | FLOPs x | predicted x | measured x | error | FLOPs error | wall x |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['flops_speedup']:.2f} | {r['predicted']:.2f} | "
                     f"{r['measured']:.2f} | {r['error']:+.1%} | {r['flops_error']:+.1%} | {r['wall_speedup']:.2f}"
                     f"{'' if r['reliable'] else ' (unreliable: ' + r['timing_note'] + ')'} |")
    if rows:
        errs = sorted(abs(r["error"]) for r in rows)
        lines += ["", f"{len(rows)} configs: median |error| {median(errs):.1%}, max {errs[-1]:.1%}, "
                  f"within ±10%: {sum(e <= 0.10 for e in errs)}/{len(errs)} (FLOPs: "
                  f"{sum(abs(r['flops_error']) <= 0.10 for r in rows)}/{len(rows)})."]
    lines += ["", "## The planner's pick against the best single mechanism at the same measured speedup", "",
              "| model | target | pick | measured x | PSNR | accuracy | best single (>= 0.97 x the pick's speedup) | "
              "its x | its PSNR | its accuracy | cache-dit's best (>= 0.97 x) | its x | its PSNR | its accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plans:
        if r.get("kind") != "plan":
            continue
        if r.get("choice") == "refused":
            lines.append(f"| {r['model']} | {r['target']}x | refused: {r['note'][:160]} | | | | | | | | | | | |")
            continue
        f = lambda v, p=".2f": "-" if v is None else format(v, p)  # noqa: E731
        lines.append(f"| {r['model']} | {r['target']}x | {r['choice']} | {f(r['speedup'])} | {f(r['psnr'], '.1f')} | "
                     f"{f(r.get('accuracy'))} | {r['best_single']} | {f(r['best_single_speedup'])} | "
                     f"{f(r['best_single_psnr'], '.1f')} | {f(r['best_single_accuracy'])} | {r['cache_dit']} | "
                     f"{f(r['cache_dit_speedup'])} | {f(r['cache_dit_psnr'], '.1f')} | {f(r['cache_dit_accuracy'])} |")
    lines += ["", "Single settings timed:", ""]
    lines += [f"- {r['model']}: {r['choice']}: {r['speedup']:.2f}x, {r['psnr']:.1f} dB, accuracy {r.get('accuracy')}"
              for r in plans if r.get("kind") in ("single", "peer")]
    lines += [f"- {r['model']}: {r['choice']} not run: {r['note'][:200]}" for r in plans if r.get("kind") == "peer refused"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def fit_default(directory: Path, out: Path) -> None:
    """One fit over the calibration points of every model calibrated under `directory` (each point keeps its
    features): the default shipped for models without a calibration of their own."""
    rows, seconds, models = [], [], []
    for path in sorted(directory.glob("latency-*.json")):
        cal = _latency.Calibration.read(path)
        models.append(cal.model)
        for what, measured, fitted, features in cal.points:
            rows.append(features)
            seconds.append(measured)
    if not rows:
        raise SystemExit(f"{directory}: no calibration files (latency-*.json)")
    coef = _latency.fit(rows, seconds)
    cal = _latency.Calibration(coef, _latency.device_key(), "any",
                               f"default (one fit over {len(rows)} points of {', '.join(models)}; "
                               f"python -m fastdiff.eval.bench_latency --fit-default {directory})")
    cal.save(out)
    print(f"default -> {out}: {coef}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/latency-model"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan-repeats", type=int, default=2)
    ap.add_argument("--cal-repeats", type=int, default=2)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--models", nargs="*", default=None, help="only these models (both parts)")
    ap.add_argument("--no-plan", action="store_true", help="part 1 only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1-2 samples, few steps, two configs per model")
    ap.add_argument("--fit-default", type=Path, default=None, metavar="DIR",
                    help="only fit the shipped default (fastdiff/configs/latency-default.json) from the calibration "
                         "files in DIR (a finished run's <out>/calibrations)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fit_default is not None:
        fit_default(args.fit_default, ROOT / "fastdiff" / "configs" / "latency-default.json")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, cals = part1(args, args.out)
    plans = [] if args.no_plan else part2(args)
    what = SimpleNamespace(describe="per table row (references trained by fastdiff; dit-* and unet-* random)",
                           trained="references only")
    env = timing.environment("fastdiff.eval.bench_latency", what, total_seconds=time.perf_counter() - t0)
    write(args.out, env, rows, cals, plans)
    print(f"done in {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
