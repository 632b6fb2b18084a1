"""Sparse-attention benchmark: dense vs every fastdiff pattern, one process, same inputs.

    python -m fastdiff.eval.bench_sparse --out eval/results/sparse-cpu            # speed at real token counts
    python -m fastdiff.eval.bench_sparse --fidelity ref-unet --out ...             # also on a trained model

Speed: one denoiser forward of a DiT (`DiTTransformer2DModel`, random weights: latency does not depend on them)
at 4096 tokens and a Wan video transformer (`WanTransformer3DModel`) at 8 x 32 x 32 tokens; median wall time of
`--repeats` forwards after a warm-up, interleaved over dense and the patterns (fastdiff.eval.timing), the backend
dispatch picks (gathered blocks on CPU, the Triton kernel on CUDA), measured density and FLOPs speedup from
fastdiff's own accounting, and the relative error of the output against dense. Fidelity (optional): a trained
reference model's samples with each pattern, PSNR against the dense samples of the same seeds, and class accuracy.
Writes results.json and README.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path

import torch

import fastdiff

from . import metrics, timing

PATTERNS = {
    "window 3x3 tiles": {"pattern": "window", "window": [3, 3, 3]},
    "window 5x5 tiles": {"pattern": "window", "window": [5, 5, 5]},
    "criss-cross": {"pattern": "crisscross", "window": [1, 1, 1]},
    "top-k 25%": {"pattern": "topk", "density": 0.25},
    "top-k 10%": {"pattern": "topk", "density": 0.10},
    "top-p 0.9 (antidiag)": {"pattern": "topp", "top_p": 0.9, "method": "antidiag"},
}


def dit(device, dtype, tokens_side: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(sample_size=2 * tokens_side, patch_size=2, in_channels=4, out_channels=8,
                                  num_layers=4, num_attention_heads=8, attention_head_dim=64,
                                  num_embeds_ada_norm=1000).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2 * tokens_side, 2 * tokens_side, generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device), class_labels=torch.tensor([3], device=device))
    return model, inputs, f"DiT 4 layers, 8x64 heads, {tokens_side}x{tokens_side} tokens"


def wan(device, dtype, frames: int, side: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=4,
                                  out_channels=4, text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4,
                                  rope_max_seq_len=1024).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, frames, 2 * side, 2 * side, generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 32, 64, generator=g).to(device, dtype))
    return model, inputs, f"Wan 4 layers, 8x64 heads, {frames}x{side}x{side} tokens"


def forward_arm(name: str, model, inputs, session=contextlib.nullcontext, finish=None) -> timing.Arm:
    """One denoiser forward per call; its output on CPU."""
    return timing.Arm(name, lambda _: model(**inputs, return_dict=False)[0].float().cpu(), session=session,
                      finish=finish)


def speed(models, repeats: int, block: int):
    """Per model: dense and every pattern, warmed up, then timed in interleaved rounds."""
    rows = []
    for model, inputs, name in models:
        arms = [forward_arm("dense", model, inputs)]
        for label, cfg in PATTERNS.items():
            arms.append(forward_arm(label, model, inputs, finish=lambda h: h.summary(),
                                    session=lambda cfg=cfg: fastdiff.accelerated(
                                        model, {"sparse": {**cfg, "block": block, "start": 0.0}})))
        timed = timing.interleaved(arms, repeats, warmup=1)
        base = timed["dense"]
        rows.append(dict(model=name, method="dense", **timing.fields(base, base, 1.0), flops_speedup=1.0, density=1.0,
                         rel_err=0.0))
        print(f"{name}: dense {timing.time_cell(rows[-1])} s", flush=True)
        for label, t in timed.items():
            if label == "dense":
                continue
            s = t.extra
            dens = s.mechanisms["sparse"]["density"]
            flops = s.dense_flops / s.flops
            rows.append(dict(model=name, method=label, **timing.fields(base, t, flops), flops_speedup=flops,
                             density=sum(dens.values()) / max(1, len(dens)),
                             rel_err=float((t.output - base.output).norm() / base.output.norm())))
            r = rows[-1]
            print(f"  {label}: {timing.time_cell(r)} s {timing.speed_cell(r)} (FLOPs {r['flops_speedup']:.2f}x, "
                  f"density {r['density']:.3f}, rel err {r['rel_err']:.3f})", flush=True)
    return rows


def fidelity(name: str, samples: int, steps: int, block: int, repeats: int):
    from . import workloads

    wl = workloads.load(name, samples=samples, steps=steps)
    accuracy = timing.class_accuracy(name)
    arms = [timing.workload_arm("dense", wl)]
    for label, cfg in PATTERNS.items():
        sparse = {"sparse": {**cfg, "block": block, "window": cfg.get("window", [3, 3, 3])}}
        arms.append(timing.workload_arm(label, wl, session=lambda sparse=sparse: fastdiff.accelerated(wl.pipe, sparse),
                                        finish=lambda h: h.summary()))
    timed = timing.interleaved(arms, repeats, warmup=1)
    base = timed["dense"]
    rows = []
    for label, t in timed.items():
        flops = 1.0 if t.extra is None else t.extra.dense_flops / t.extra.flops
        rows.append(dict(model=name, method=label, **timing.fields(base, t, flops), flops_speedup=flops,
                         psnr=float(metrics.psnr(t.output, base.output)),
                         accuracy=accuracy(t.output) if accuracy else None))
        r = rows[-1]
        print(f"  {name} {label}: {timing.speed_cell(r)}, FLOPs {r['flops_speedup']:.2f}x, PSNR {r['psnr']:.1f} dB, "
              f"acc {r['accuracy']}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--dit-side", type=int, default=64, help="DiT tokens per side (64: 4096 tokens)")
    p.add_argument("--wan", type=int, nargs=2, default=(8, 32), metavar=("FRAMES", "SIDE"))
    p.add_argument("--fidelity", default=None, help="a trained reference model (e.g. ref-unet) to sample with")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fidelity-block", type=int, default=16)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = [dit(device, dtype, a.dit_side), wan(device, dtype, *a.wan)]
    rows = speed(models, a.repeats, a.block)
    fid = fidelity(a.fidelity, a.samples, a.steps, a.fidelity_block, a.repeats) if a.fidelity else []
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=timing.device(), torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version(), command="python -m fastdiff.eval.bench_sparse " + " ".join(
                    sys.argv[1:] if argv is None else argv), backend=fastdiff.attention.choose(
                    torch.empty(1, device=device)))
    (a.out / "results.json").write_text(json.dumps(dict(meta=meta, speed=rows, fidelity=fid), indent=1))
    lines = [f"# Sparse attention: {meta['device']}", "", f"torch {meta['torch']}, {meta['threads']} threads, "
             f"backend `{meta['backend']}`, block {a.block}. Command: `{meta['command']}`", "", timing.TABLE_NOTE, "",
             "| model | method | time s ± spread | speedup [per-round range] | FLOPs speedup | density | "
             "rel. error vs dense |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {timing.time_cell(r)} | {timing.speed_cell(r)} | "
              f"{r['flops_speedup']:.2f}x | {r['density']:.3f} | {r['rel_err']:.3f} |" for r in rows]
    if fid:
        lines += ["", f"## Fidelity on {a.fidelity} (trained), block {a.fidelity_block}, {a.samples} samples, "
                  f"{a.steps} steps", "", "| method | speedup | FLOPs speedup | PSNR vs dense | class accuracy |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {timing.speed_cell(r)} | {r['flops_speedup']:.2f}x | {r['psnr']:.1f} dB | "
                  f"{r['accuracy']} |" for r in fid]
    (a.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
