"""Where resolution-bottleneck sampling saves time: one real-size FLUX block pair timed per stage size.

A FLUX.1-sized `FluxTransformer2DModel` (width 3072 = 24 heads x 128, text width 4096, 512 text tokens) with one
double-stream and one single-stream block (random weights: time does not depend on them) is called once per stage
size of a bottleneck schedule (1024 px output = 64 x 64 packed tokens; a scale-2 stage = 32 x 32), interleaved and
repeated (`timing.interleaved`). Per call it reports measured seconds beside the cost model's FLOPs and predicted
seconds (`fastdiff.estimate` on the same denoiser), and for the schedule the measured and predicted speedup of the
stages over the full-size run. Per block, so a 57-block FLUX.1 costs about 19x the double block plus 38x the single.

    python -m fastdiff.eval.bench_stage_latency --out eval/results/bottleneck-stage-latency
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

FLUX_SIZE = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))


def build(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_SIZE).eval()


def call_args(model, tokens_side: int, text: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = tokens_side * tokens_side
    ids = torch.zeros(tokens_side, tokens_side, 3)
    ids[..., 1] = torch.arange(tokens_side)[:, None]
    ids[..., 2] = torch.arange(tokens_side)[None, :]
    return dict(hidden_states=torch.randn(1, n, 64, generator=g),
                encoder_hidden_states=torch.randn(1, text, 4096, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=ids.reshape(n, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


def main(argv=None) -> None:
    import fastdiff
    from fastdiff.mechanisms.bottleneck.mechanism import stage_sizes

    from . import timing

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="output side in pixels (FLUX: 16 px per packed token)")
    ap.add_argument("--text", type=int, default=512, help="text tokens")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--preset", default="bottleneck-fast")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="eval/results/bottleneck-stage-latency")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build()
    cfg = fastdiff.load_config(preset=a.preset)
    full = a.size // 16
    stages = stage_sizes(cfg.bottleneck, height=a.size, width=a.size,
                                                                  steps=a.steps)
    sides = sorted({full // (a.size // st["height"]) for st in stages}, reverse=True)
    arms = []
    for side in sides:
        args = call_args(model, side, a.text)
        arms.append(timing.Arm(f"{side}x{side}", lambda _p, kw=args: model(**kw)[0]))
    timed = timing.interleaved(arms, a.repeats, warmup=1)
    rows = []
    for side in sides:
        latent = side * 2  # the bare denoiser is priced at its latent size, before FLUX's 2x2 packing
        est = fastdiff.estimate(model, None, height=latent, width=latent, steps=1, cfg=False, text_tokens=a.text)
        t = timed[f"{side}x{side}"]
        rows.append(dict(tokens=side * side, text_tokens=a.text, time_s=t.median, spread=t.spread,
                         times_s=list(t.times), flops=est.dense_flops, predicted_s=est.dense_seconds,
                         latency=est.latency))
    by_side = {side: r for side, r in zip(sides, rows)}
    for st in stages:
        st["side"] = full // (a.size // st["height"])
    full_time = by_side[full]["time_s"] * a.steps
    staged = sum(by_side[st["side"]]["time_s"] * st["steps"] for st in stages)
    full_flops = by_side[full]["flops"] * a.steps
    staged_flops = sum(by_side[st["side"]]["flops"] * st["steps"] for st in stages)
    summary = dict(preset=a.preset, steps=a.steps, stages=[dict(tokens=st["side"] ** 2, steps=st["steps"])
                                                            for st in stages],
                   measured_speedup=full_time / staged, flops_speedup=full_flops / staged_flops,
                   per_call_ratio=by_side[full]["time_s"] / by_side[min(sides)]["time_s"],
                   per_call_flops_ratio=by_side[full]["flops"] / by_side[min(sides)]["flops"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(device=timing.device(), threads=torch.get_num_threads(), torch=torch.__version__,
               fastdiff=fastdiff.__version__, command="python -m fastdiff.eval.bench_stage_latency "
               + shlex.join(sys.argv[1:] if argv is None else argv))
    env["model"] = dict(FLUX_SIZE, axes_dims_rope=list(FLUX_SIZE["axes_dims_rope"]))
    timing.write_results(out, dict(env, summary=summary), rows,
                         ["tokens", "text_tokens", "time_s", "spread", "flops", "predicted_s"])
    for r in rows:
        print(f"{r['tokens']:>6} image + {r['text_tokens']} text tokens: {r['time_s']:.3f} s/call "
              f"(spread {r['spread']:.0%}), {r['flops'] / 1e12:.2f} TFLOP, predicted {r['predicted_s']:.3f} s")
    print(f"{a.preset} over {a.steps} steps: measured {summary['measured_speedup']:.2f}x, "
          f"FLOPs {summary['flops_speedup']:.2f}x; per call full/low {summary['per_call_ratio']:.2f}x "
          f"(FLOPs {summary['per_call_flops_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
