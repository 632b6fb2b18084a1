"""The main job on the embedded default model: baseline vs fastdiff, measured side by side in one run.

The default model is `ref-digits`, a class-conditional DiTTransformer2DModel this project trained on the digits
bundled with scikit-learn (weights ship in fastdiff.eval.reference), sampled through its diffusers pipeline.
Because it learned something, fidelity means something: besides PSNR against the unaccelerated output, the
reference classifier says whether the accelerated samples are still the digits that were asked for.
Usage: python examples/demo.py [--steps 20] [--preset cache-safe --preset cache-ultra ...] [--grid out.png]
"""

from __future__ import annotations

import argparse

import torch

import fastdiff
from fastdiff.eval import metrics, reference, timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=timing.MIN_REPEATS, help="interleaved timed rounds")
    parser.add_argument("--preset", action="append", help="fastdiff preset(s) to compare (default: the cache presets)")
    parser.add_argument("--grid", default="demo-samples.png", help="where to write the sample grid")
    args = parser.parse_args()

    pipe = reference.load("ref-digits")
    pipe.set_progress_bar_config(disable=True)
    clf = reference.load_classifier("ref-digits")
    labels = [i % 10 for i in range(args.samples)]

    def make_kwargs():
        return dict(class_labels=labels, num_inference_steps=args.steps, guidance_scale=3.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(args.samples)])

    presets = args.preset or ["cache-safe", "cache-fast", "cache-ultra"]
    call = lambda kw: pipe(**kw).images  # noqa: E731
    # every config warmed up, then timed rounds interleaved (baseline, A, B, ..., baseline, A, B, ...): a cold or
    # drifting machine hits every row alike (fastdiff.eval.timing)
    arms = [timing.Arm("baseline", call, prepare=make_kwargs)]
    arms += [timing.Arm(p, call, prepare=make_kwargs, session=lambda p=p: fastdiff.accelerated(pipe, preset=p),
                        finish=lambda h: h.summary()) for p in presets]
    timed = timing.interleaved(arms, args.repeats, warmup=1)
    base = timed["baseline"].output
    target = torch.tensor(labels)
    print(f"fastdiff demo: ref-digits (DiTTransformer2DModel trained by fastdiff), {args.samples} samples, "
          f"{args.steps} steps, CFG 3, {torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds "
          "after a warm-up")
    print(f"{'config':<14} {'time s':>8} {'spread':>7} {'speedup [per-round range]':>26} {'PSNR dB':>8} "
          f"{'class acc':>10} {'FLOPs x':>8}")
    unreliable = False
    for name, t in timed.items():
        bound = t.extra.estimated_speedup if t.extra is not None else 1.0
        speed = timing.compare(timed["baseline"], t, bound)
        psnr = metrics.psnr(t.output, base) if name != "baseline" else float("inf")
        cell = f"{speed.ratio:.2f}x [{speed.low:.2f}-{speed.high:.2f}]" + ("" if speed.reliable else " *")
        unreliable |= not speed.reliable
        print(f"{name:<14} {t.median:>8.3f} {t.spread:>6.1%} {cell:>26} {psnr:>8.2f} "
              f"{clf.accuracy(t.output, target):>9.1%} {bound:>7.2f}x" + ("" if speed.reliable else f"  * {speed.note}"))
    if unreliable:
        print(f"* UNRELIABLE timing: a spread over {timing.SPREAD_LIMIT:.0%} (a busy machine) or a speedup above the "
              "FLOPs bound (noise, or time the FLOPs do not count); rerun with more --repeats on a quiet machine")
    from fastdiff.eval.cli import grid

    grid(torch.cat([timed[name].output[:10] for name in timed]), args.grid)
    print(f"sample grid (rows: baseline, then each preset; columns: classes 0-9): {args.grid}")
    print()
    print(timed[presets[-1]].extra)


if __name__ == "__main__":
    main()
