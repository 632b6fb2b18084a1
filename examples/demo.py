"""The main job on the embedded default model: baseline vs fastdiff, measured side by side in one run.

The default model is a seeded DiT (DiTTransformer2DModel, random weights, built offline) driven by the
real DiTPipeline. Random weights make fidelity numbers optimistic; the trained reference model of the
evaluation tool replaces it. Usage: python examples/demo.py [--steps 20] [--preset cache-safe ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdiff
from fastdiff import tiny


def build_default_pipeline(seed: int = 0):
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=8,
        sample_size=32, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny.build_vae("dit", seed), scheduler=DPMSolverMultistepScheduler())


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]; inf when identical."""
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def timed(pipe, kwargs, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), (max(times) - min(times)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", action="append", help="fastdiff preset(s) to compare (default: cache-safe)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pipe = build_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[207, 360], num_inference_steps=args.steps, guidance_scale=4.0, output_type="pt")
    timed(pipe, {**kwargs, "num_inference_steps": 2}, 1)  # warm-up
    base, t_base, spread = timed(pipe, kwargs, args.repeats)
    rows = [("baseline", t_base, spread, 1.0, float("inf"), 1.0)]
    for preset in args.preset or ["cache-safe"]:
        with fastdiff.accelerated(pipe, preset=preset) as handle:
            out, t, spread = timed(pipe, kwargs, args.repeats)
            summary = handle.summary()
        rows.append((preset, t, spread, t_base / t, psnr(out, base), summary.estimated_speedup))
    print(f"fastdiff demo: {type(pipe.transformer).__name__} (seeded random weights), {args.steps} steps, "
          f"batch 2 + CFG, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'config':<16} {'time s':>8} {'±':>6} {'speedup':>8} {'PSNR dB':>8} {'est. FLOPs speedup':>19}")
    for name, t, sp, speed, p, est in rows:
        print(f"{name:<16} {t:>8.3f} {sp:>6.3f} {speed:>7.2f}x {p:>8.2f} {est:>18.2f}x")
    print()
    print(summary)


if __name__ == "__main__":
    main()
