"""Caching benchmark: baseline, every fastdiff caching policy at 3 aggressiveness levels, and the peers
(diffusers' cache hooks, cache-dit when installed) — one process, one model, the same seeds and steps.

    python -m fastdiff.eval.bench_cache --model ref-digits --samples 20 --steps 20 --out eval/results/cache-ref-digits

Writes <out>/results.json, results.csv, README.md (the table, device, versions, command) and pareto.png.
Speedup = baseline median time / method median time, measured here; PSNR/SSIM against the baseline output
of the same seeds; "FLOPs x" is fastdiff's own accounting of what the run computed (summary()).
Dynamic policies are tuned to a target FLOPs speedup with `fastdiff.plan` on the benchmark call itself, as
the peers' thresholds are searched to a target skip fraction (`peers.apply_peer(target_skip=...)`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastdiff

from . import timing, workloads

LEVELS = ("safe", "fast", "ultra")
TIMING_NOTE = timing.TABLE_NOTE
# FLOPs speedups the tuned (dynamic) policies aim for; peers with a threshold are searched to the matching
# skipped fraction of block computations, 1 - 1/target (equal compute)
TARGETS = {"safe": 1.5, "fast": 2.5, "ultra": 4.0}

# method -> level -> config; "plan" entries are tuned to TARGETS[level] on the benchmark call
FASTDIFF = {
    "static (FORA/DeepCache)": {lv: {"cache": {"policy": "static", "interval": i, "warmup": 1, "cooldown": 1}}
                                for lv, i in zip(LEVELS, (2, 4, 6))},
    "static + Taylor-1": {lv: {"cache": {"policy": "static", "interval": i, "estimator": "taylor", "order": 1,
                                         "warmup": 2, "cooldown": 1}} for lv, i in zip(LEVELS, (3, 5, 8))},
    "static + Taylor-2": {lv: {"cache": {"policy": "static", "interval": i, "estimator": "taylor", "order": 2,
                                         "warmup": 2, "cooldown": 1}} for lv, i in zip(LEVELS, (3, 5, 8))},
    "static + FoCa": {lv: {"cache": {"policy": "static", "interval": i, "estimator": "foca", "warmup": 2,
                                     "cooldown": 1}} for lv, i in zip(LEVELS, (3, 5, 8))},
    "delta-DiT": {lv: {"cache": {"policy": "delta", "interval": i, "warmup": 1}} for lv, i in zip(LEVELS, (2, 3, 4))},
    "residual (Fn=1)": {lv: {"plan": True, "cache": {"policy": "residual", "head": 1, "max_skip": m, "warmup": 1}}
                        for lv, m in zip(LEVELS, (2, 4, 8))},
    "residual + Taylor-1": {lv: {"plan": True, "cache": {"policy": "residual", "head": 1, "max_skip": m, "warmup": 2,
                                                         "estimator": "taylor"}} for lv, m in zip(LEVELS, (2, 4, 8))},
    "EasyCache": {lv: {"plan": True, "cache": {"policy": "easycache", "max_skip": m, "warmup": 1}}
                  for lv, m in zip(LEVELS, (2, 4, 8))},
    "CFG skip": {lv: {"guidance": {"mode": "step", "start": s}} for lv, s in zip(LEVELS, (0.7, 0.5, 0.3))},
    # fastdiff.plan at a FLOPs target, on the policy it tunes by default (EasyCache's threshold)
    "plan 2x / 3x": {lv: {"plan": t, "cache": {"policy": "easycache", "max_skip": 8, "warmup": 1}}
                     for lv, t in (("2x", 2.0), ("3x", 3.0))},
    "presets": {lv: {"preset": f"cache-{lv}"} for lv in LEVELS},
}






def run(args) -> list[dict]:
    """Plan the tuned policies and check every method applies, then time them all in one interleaved comparison."""
    wl = workloads.load(args.model, samples=args.samples, steps=args.steps, seed=args.seed)
    classify, frechet = timing.class_accuracy(args.model), timing.frechet_to_real(args.model)
    call = lambda: wl.pipe(**wl.make_kwargs())  # noqa: E731  (the call dynamic policies are tuned on)
    arms = [timing.workload_arm("baseline", wl)]
    meta = {"baseline": dict(method="baseline", level="-", config="baseline", note="")}
    refused = []

    for method, levels in FASTDIFF.items():
        if args.only and not any(o in method for o in args.only):
            continue
        for level, cfg in levels.items():
            cfg = dict(cfg)
            note = ""
            try:
                plan = cfg.pop("plan", False)
                if plan:
                    target = TARGETS[level] if plan is True else plan
                    with torch.no_grad():
                        p = fastdiff.plan(wl.pipe, cfg, target=target, call=call)
                    cfg = p.config
                    note = (f"threshold {p.value:.3g}: {p.speedup:.2f}x FLOPs on the tuning call for a {target}x "
                            f"target ({p.runs} runs)")
                preset = cfg.pop("preset", None) if isinstance(cfg, dict) else None
                cfg = cfg if cfg else None
                with fastdiff.accelerated(wl.pipe, cfg, preset=preset):  # refused here, before any timing
                    pass
            except (fastdiff.UnsupportedModelError, fastdiff.ConfigError) as err:
                refused.append(dict(method=f"fastdiff {method}", level=level, config="-", note=f"unsupported: {err}"))
                continue
            name = f"fastdiff {method} / {level}"
            arms.append(timing.workload_arm(
                name, wl, session=lambda cfg=cfg, preset=preset: fastdiff.accelerated(wl.pipe, cfg, preset=preset),
                finish=lambda h: h.summary()))
            meta[name] = dict(method=f"fastdiff {method}", level=level, note=note)

    if not args.no_peers:
        refused += peer_arms(wl, arms, meta)
    timed = timing.interleaved(arms, args.repeats, warmup=1)

    def flops_of(name, s):
        return s.estimated_speedup if hasattr(s, "estimated_speedup") else (1.0 if name == "baseline" else None)

    def config(name, t, row):
        s = t.extra
        if hasattr(s, "config"):
            row["config"] = s.config
        elif "config" not in row:
            row["config"] = json.dumps(s.kwargs, default=str)
            row["note"] += f", skip {s.skip:.2f} (searched)" if s.skip is not None else ""

    rows = timing.result_rows(timed, meta, wl.trained, flops_of, classify, config, frechet)
    for row in rows:
        print(_line(row), flush=True)
    return rows + refused, wl


def peer_arms(wl, arms, meta) -> list[dict]:
    """Append an arm per runnable peer level (threshold searched once here; the search is cached, so applying the
    peer around every timed call finds it again); returns the rows of peers that cannot run."""
    from . import peers

    refused = []
    for name, peer in peers.PEERS.items():
        for level in LEVELS:
            kw = wl.make_kwargs()
            target = 1 - 1 / TARGETS[level] if peer.threshold is not None else None

            def session(name=name, level=level, kw=kw, target=target):
                remove = peers.apply_peer(wl.pipe, name, level, call_kwargs=kw, target_skip=target)
                return _removing(remove)

            try:
                with torch.no_grad(), session():
                    pass
            except (peers.PeerError, KeyError) as err:
                refused.append(dict(method=f"{name}", level=level, config="-", note=f"not run: {err}"))
                break
            arms.append(timing.workload_arm(f"{name} / {level}", wl, session=session, finish=lambda remove: remove))
            meta[f"{name} / {level}"] = dict(method=name, level=level, note=f"{peer.source}")
    return refused


class _removing:
    """A peer's remover as a context: yields it, calls it on exit."""

    def __init__(self, remove):
        self.remove = remove

    def __enter__(self):
        return self.remove

    def __exit__(self, *exc):
        self.remove()
        return False


def _line(r) -> str:
    fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}x"
    acc = f" acc {r['accuracy']:.2f}" if "accuracy" in r else ""
    return (f"{r['method']:<34} {r['level']:<6} {timing.time_cell(r)} s  {timing.speed_cell(r)}  PSNR {r['psnr']:6.2f}  "
            f"SSIM {r['ssim']:.4f}  FLOPs {fl}{acc}  {r.get('note', '')}")


def write(rows, wl, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = timing.environment("fastdiff.eval.bench_cache", wl)
    timing.write_results(out, env, rows, ["method", "level", *timing.RESULT_KEYS, "fd_real", "config", "note"])
    lines = [f"# Caching benchmark: {wl.name}", "", *(f"- **{k}**: {v}" for k, v in env.items()), "", TIMING_NOTE, "",
             "| method | level | time s ± spread | speedup [per-round range] | PSNR dB | SSIM | FLOPs x | class acc | "
             "FD (clf) | config / note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "time_s" not in r:
            lines.append(f"| {r['method']} | {r['level']} | - | - | - | - | - | - | - | {r['note']} |")
            continue
        fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}"
        acc = f"{r['accuracy']:.2f}" if "accuracy" in r else "-"
        fd = f"{r['fd_real']:.1f}" if "fd_real" in r else "-"
        lines.append(f"| {r['method']} | {r['level']} | {timing.time_cell(r)} | {timing.speed_cell(r)} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {fl} | {acc} | {fd} | `{r['config']}` {r.get('note', '')} |")
    lines += ["", *best_table(rows)]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    pareto(rows, out / "pareto.png", wl)


def best_table(rows, floors=(30.0, 25.0)) -> list[str]:
    """Each method's best measured speedup among its rows with PSNR at or above each floor (reliable timings only:
    a flagged row is not a result)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if "time_s" in r and r["method"] != "baseline"))
    out = ["Best reliable speedup per method at a PSNR floor (same run; '-': no row reaches the floor):", "",
           "| method | " + " | ".join(f"PSNR >= {f:g} dB" for f in floors) + " |",
           "|---|" + "---|" * len(floors)]
    for m in methods:
        cells = []
        for f in floors:
            ok = [r for r in rows if r["method"] == m and "time_s" in r and r["reliable"] and r["psnr"] >= f]
            best = max(ok, key=lambda r: r["speedup"], default=None)
            cells.append("-" if best is None else f"{best['speedup']:.2f}x ({best['level']}, {best['psnr']:.1f} dB)")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def pareto(rows, path: Path, wl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    by = {}
    for r in rows:
        if "time_s" in r and r["method"] != "baseline":
            by.setdefault(r["method"], []).append(r)
    for method, rs in by.items():
        rs = sorted(rs, key=lambda r: r["speedup"])
        ax.plot([r["speedup"] for r in rs], [min(r["psnr"], 80) for r in rs], "o-" if "fastdiff" in method else "s--",
                label=method, markersize=4)
    ax.axhline(30, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("measured speedup over baseline (same run)")
    ax.set_ylabel("PSNR vs baseline, dB")
    ax.set_title(f"{wl.name}: speed vs fidelity" + ("" if wl.trained else " (RANDOM weights)"))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-digits")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--only", action="append", help="run only fastdiff methods whose name contains this")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, wl = run(args)
    write(rows, wl, args, args.out)
    print(f"wrote {args.out}/README.md, results.json, results.csv, pareto.png")


if __name__ == "__main__":
    main()
