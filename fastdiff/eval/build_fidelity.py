"""Build `fastdiff/configs/fidelity.json`, the planner's expected-fidelity table, from the measured benchmarks.

    python -m fastdiff.eval.build_fidelity            # reads eval/results/, writes fastdiff/configs/fidelity.json

Every option the planner may choose is a setting a benchmark measured on a trained reference model: its config
section is taken from the benchmark's own table (bench_cache.FASTDIFF, bench_merge.FASTDIFF, bench_sparse.PATTERNS,
the bottleneck rows' config), and each point says which results file and row it came from, with the PSNR against
the dense samples of the same seeds, the class accuracy, and the measured wall and FLOPs speedups. Dynamic caching
policies (residual, EasyCache) are left out: their thresholds were tuned per call, so no fixed setting was measured.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import bench_cache, bench_merge, bench_sparse

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fastdiff" / "configs" / "fidelity.json"
# results directory -> the reference model it measured
CACHE = {"cache-ref-digits": "ref-digits", "cache-ref-unet": "ref-unet", "cache-ref-flux": "ref-flux"}
MERGE = {"merge-ref-digits": "ref-digits", "merge-ref-unet": "ref-unet"}
BOTTLENECK = {"bottleneck-ref-flux": "ref-flux"}
STATIC_CACHE = ("static (FORA/DeepCache)", "static + Taylor-1", "static + Taylor-2", "static + FoCa", "delta-DiT",
                "CFG skip")
DENOISER = {"ref-digits": "DiTTransformer2DModel", "ref-unet": "UNet2DConditionModel",
            "ref-flux": "FluxTransformer2DModel"}


def _point(reference: str, row: dict, source: str) -> dict:
    return dict(reference=reference, denoiser=DENOISER[reference], psnr=_finite(row["psnr"]),
                accuracy=row.get("accuracy"), speedup=row["speedup"], flops_speedup=row.get("flops_speedup"),
                source=source)


def _finite(x):
    return x if x is None or math.isfinite(x) else 99.0  # bit-identical to dense: no error to measure


def build(results: Path) -> dict:
    options: dict[str, dict] = {}

    def add(mechanism: str, name: str, section: dict, point: dict):
        key = f"{mechanism}: {name}"
        entry = options.setdefault(key, dict(mechanism=mechanism, name=name, section=section, points=[]))
        if entry["section"] != section:
            raise ValueError(f"{key}: two configs for one option ({entry['section']} / {section})")
        entry["points"].append(point)

    for d, ref in CACHE.items():
        rows = json.loads((results / d / "results.json").read_text())["rows"]
        for row in rows:
            method = row["method"].removeprefix("fastdiff ")
            if method not in STATIC_CACHE:
                continue
            cfg = bench_cache.FASTDIFF[method][row["level"]]
            (mechanism, section), = cfg.items()
            add(mechanism, f"{method} / {row['level']}", section,
                _point(ref, row, f"eval/results/{d}/results.json: {row['method']} / {row['level']}"))
    for d, ref in MERGE.items():
        for row in json.loads((results / d / "results.json").read_text())["rows"]:
            method = row["method"].removeprefix("fastdiff ")
            if method not in bench_merge.FASTDIFF:
                continue
            levels = bench_merge.FASTDIFF[method]
            level = row["level"] if row["level"] in levels else float(row["level"])
            add("merge", f"{method} / {row['level']}", levels[level],
                _point(ref, row, f"eval/results/{d}/results.json: {row['method']} / {row['level']}"))
    sparse = json.loads((results / "sparse-cpu" / "results.json").read_text())["fidelity"]
    for row in sparse:
        if row["method"] in bench_sparse.PATTERNS:
            add("sparse", row["method"], bench_sparse.PATTERNS[row["method"]],
                _point(row["model"], row, f"eval/results/sparse-cpu/results.json: fidelity / {row['method']}"))
    for d, ref in BOTTLENECK.items():
        for row in json.loads((results / d / "results.json").read_text())["rows"]:
            try:
                cfg = json.loads(row["config"])
            except (json.JSONDecodeError, TypeError):
                continue  # the baseline and the fewer-steps row
            if set(cfg) != {"bottleneck"}:
                continue  # compositions are the planner's to make
            add("bottleneck", row["method"], cfg["bottleneck"],
                _point(ref, row, f"eval/results/{d}/results.json: {row['method']}"))
    return dict(
        about="Expected fidelity of each option the planner composes: measured points (PSNR in dB against the dense "
              "samples of the same seeds, class accuracy) of trained reference models; built by "
              "`python -m fastdiff.eval.build_fidelity` from eval/results/ (each point names its file and row).",
        options=sorted(options.values(), key=lambda o: (o["mechanism"], o["name"])))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "eval" / "results")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    table = build(args.results)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table['options'])} options, {sum(len(o['points']) for o in table['options'])} points -> {args.out}")


if __name__ == "__main__":
    main()
