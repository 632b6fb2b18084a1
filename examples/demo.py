"""The main job on the embedded default model: baseline vs fastdiff, measured side by side in one run.

The default model is `ref-digits`, a class-conditional DiTTransformer2DModel this project trained on the digits
bundled with scikit-learn (weights ship in fastdiff.eval.reference), sampled through its diffusers pipeline.
Because it learned something, fidelity means something: besides PSNR against the unaccelerated output, the
reference classifier says whether the accelerated samples are still the digits that were asked for.
Usage: python examples/demo.py [--steps 20] [--preset cache-safe --preset cache-ultra ...] [--grid out.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdiff
from fastdiff.eval import metrics, reference


def timed(pipe, make_kwargs, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        kwargs = make_kwargs()
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs).images
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), (max(times) - min(times)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", action="append", help="fastdiff preset(s) to compare (default: the cache presets)")
    parser.add_argument("--grid", default="demo-samples.png", help="where to write the sample grid")
    args = parser.parse_args()

    pipe = reference.load("ref-digits")
    clf = reference.load_classifier("ref-digits")
    labels = [i % 10 for i in range(args.samples)]

    def make_kwargs():
        return dict(class_labels=labels, num_inference_steps=args.steps, guidance_scale=3.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(args.samples)])

    timed(pipe, make_kwargs, 1)  # warm-up
    base, t_base, spread = timed(pipe, make_kwargs, args.repeats)
    target = torch.tensor(labels)
    rows = [("baseline", t_base, spread, 1.0, float("inf"), clf.accuracy(base, target), 1.0)]
    grids = [base[:10]]
    summary = None
    for preset in args.preset or ["cache-safe", "cache-fast", "cache-ultra"]:
        with fastdiff.accelerated(pipe, preset=preset) as handle:
            timed(pipe, make_kwargs, 1)
            out, t, spread = timed(pipe, make_kwargs, args.repeats)
            summary = handle.summary()
        rows.append((preset, t, spread, t_base / t, metrics.psnr(out, base), clf.accuracy(out, target),
                     summary.estimated_speedup))
        grids.append(out[:10])
    print(f"fastdiff demo: ref-digits (DiTTransformer2DModel trained by fastdiff), {args.samples} samples, "
          f"{args.steps} steps, CFG 3, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'config':<14} {'time s':>8} {'±':>6} {'speedup':>8} {'PSNR dB':>8} {'class acc':>10} {'est. FLOPs':>11}")
    for name, t, sp, speed, p, acc, est in rows:
        print(f"{name:<14} {t:>8.3f} {sp:>6.3f} {speed:>7.2f}x {p:>8.2f} {acc:>9.1%} {est:>10.2f}x")
    from fastdiff.eval.cli import grid

    grid(torch.cat(grids), args.grid)
    print(f"sample grid (rows: baseline, then each preset; columns: classes 0-9): {args.grid}")
    print()
    print(summary)


if __name__ == "__main__":
    main()
