"""ComfyUI benchmark: fastdiff's caching nodes against ComfyUI core's own EasyCache node at equal settings (and our
token merging against core's TomePatchModel on SD1.5), our Accelerate node, and the unpatched baseline, on ComfyUI's
own models, side by side in one process (same seeds, timed interleaved).

    python -m fastdiff.eval.bench_comfyui --threads 1 --out eval/results/comfyui
    python -m fastdiff.eval.bench_comfyui --models flux --batch 1 --steps 6 --size 8 --repeats 1 --out /tmp/x  # smoke

Models: a small random-weight ComfyUI Flux and SD1.5 UNet (for time only: their outputs mean nothing, PSNR is to
the baseline's output over its value range) and `ref-flux`, fastdiff's trained flow-matching Flux loaded into
ComfyUI's Flux through ComfyUI's own diffusers key conversion (10 digits, CFG 3: PSNR on images in [0, 1] and the
reference classifier's class accuracy). Every row is the MODEL a node returned, sampled by `comfy.sample.sample`
(the KSampler node's code). "computed" is the steps at which the model's last block ran; the FLOPs bound is
fastdiff's own accounting of the run for our nodes and steps / computed for EasyCache (which skips the whole model);
none for ComfyUI's ToMe.

Needs ComfyUI (`make setup` installs the test-only copy, tests/comfyui/harness.py) and a checkout of this repository:
the ComfyUI import and the tiny-model builders stay outside the fastdiff package.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import timing

# (name, node, settings): our node's settings equal to EasyCache's where both have them
THRESHOLDS = (0.1, 0.2)
START, END = 0.15, 0.95
TOME = 0.5  # the fraction of image tokens merged away


def _arms_spec(model: str) -> list[tuple[str, str, dict, bool]]:
    """(row name, node, its settings, copy the diffusion model's input first: see `_copy_input`) for `model`."""
    arms = [("baseline", "", {}, False)]
    for t in THRESHOLDS:
        easy = dict(reuse_threshold=t, start_percent=START, end_percent=END, verbose=False)
        arms.append((f"ComfyUI EasyCache {t}", "EasyCache", easy, False))
        arms.append((f"ComfyUI EasyCache {t}, input copied", "EasyCache", easy, True))
        arms.append((f"fastdiff easycache {t}", "FastDiffCache",
                     dict(policy="easycache", threshold=t, start_percent=START, end_percent=END), False))
    arms.append(("fastdiff static interval 2", "FastDiffCache",
                 dict(policy="static", interval=2, start_percent=START, end_percent=END), False))
    if model == "sd15":  # token merging: ComfyUI core's ToMe node beside ours, at the same ratio
        arms.append((f"ComfyUI TomePatchModel {TOME}", "TomePatchModel", dict(ratio=TOME), False))
        arms.append((f"fastdiff token merge tome {TOME}", "FastDiffTokenMerge", dict(method="tome", ratio=TOME), False))
    arms.append(("fastdiff Accelerate 2x", "FastDiffAccelerate", dict(speedup=2.0), False))
    return arms


def _copy_input(executor, x, *args, **kwargs):
    """An outermost DIFFUSION_MODEL wrapper that hands the model a copy of its input. ComfyUI 0.3.75's EasyCache adds
    its cached difference into the model's input tensor in place on a skipped step; on a flow model running in
    float32 that tensor is also the sampler's `model_input` (`calculate_input` returns it and `.to(float32)` does not
    copy), so the step's denoised output is computed from the modified input. In fp16/bf16 inference the cast
    copies and EasyCache works as designed: this row is EasyCache as it runs there."""
    return executor(x.clone(), *args, **kwargs)


@dataclass
class Workload:
    """What one model is sampled with (and what `timing.environment` records)."""

    name: str
    describe: str
    trained: bool
    model: object
    family: object  # harness.Family: the sampler settings
    conditioning: tuple
    latent: torch.Tensor
    steps: int
    cfg: float
    last_block: torch.nn.Module  # whose calls count the steps that computed the model
    to_images: object = None  # latent -> images in [0, 1] (trained models), else None


def _harness():
    try:
        from tests.comfyui import harness
    except ImportError as e:
        raise SystemExit("bench_comfyui runs from a checkout of the repository (the ComfyUI harness is "
                         f"tests/comfyui/harness.py): {e}") from e
    try:
        harness.load_comfy()
    except harness.ComfyUnavailable as e:
        raise SystemExit(str(e)) from e
    return harness


def _records(harness, size: int):
    """Small random-weight models where a step takes measurable time (tiny test models are all overhead)."""
    flux = harness.Family(
        "flux-bench", "Flux",
        dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, hidden_size=256,
             mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[16, 24, 24], theta=10000,
             patch_size=2, qkv_bias=True, guidance_embed=True),
        latent=(16, size, size), text=(16, 64), pooled=64, cond_extra={"guidance": 3.5}, cfg=1.0)
    sd15 = harness.Family(
        "sd15-bench", "SD15",
        dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64,
             num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[1, 1, 1], transformer_depth_middle=1,
             transformer_depth_output=[1, 1, 1, 1, 1, 1], use_spatial_transformer=True, legacy=False,
             adm_in_channels=None, context_dim=64, use_linear_in_transformer=False, use_temporal_attention=False,
             use_temporal_resblock=False),
        latent=(4, size, size), text=(16, 64), cfg=5.0, scheduler="normal")
    return flux, sd15


def workloads(harness, args) -> list[Workload]:
    flux, sd15 = _records(harness, args.size)
    out = []
    for rec in (flux, sd15):
        if rec.name.split("-")[0] not in args.models:
            continue
        model = harness.build_model(rec, seed=args.seed)
        dm = model.model.diffusion_model
        last = dm.single_blocks[-1] if rec.model == "Flux" else dm.out  # (a UNet's blocks are not called as modules)
        n = sum(p.numel() for p in dm.parameters())
        out.append(Workload(
            rec.name.split("-")[0], f"random-weight ComfyUI {rec.model} ({n / 1e6:.1f} M parameters), latent "
            f"{list(rec.latent)} x {args.batch}, {args.steps} steps, cfg {rec.cfg}, {rec.sampler}/{rec.scheduler}",
            False, model, rec, harness.conds(rec, args.seed, args.batch), harness.empty_latent(rec, args.batch),
            args.steps, rec.cfg, last))
    if "ref-flux" in args.models:
        model, pipe = harness.build_reference("ref-flux")
        labels = torch.arange(args.samples) % pipe.num_classes
        out.append(Workload(
            "ref-flux", f"ref-flux in ComfyUI's Flux, 32 px, classes {labels.tolist()}, {args.steps} steps, cfg "
            f"{args.ref_cfg}, euler/simple", True, model, harness.RECORDS["flux"], harness.reference_conds(pipe, labels),
            torch.zeros(args.samples, 1, 32, 32), args.steps, args.ref_cfg, model.model.diffusion_model.single_blocks[-1],
            to_images=lambda x: ((x + 1) / 2).clamp(0, 1)))
    return out


def run_node(harness, node_id: str, **inputs):
    """Run ComfyUI node `node_id` (from ComfyUI's registry, ours loaded as a custom node) with its defaults for the
    inputs not given; its outputs as a tuple."""
    c = harness.load_comfy()
    cls = c.nodes.NODE_CLASS_MAPPINGS[node_id]
    kwargs = {}
    for part in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(part, {}).items():
            if name in inputs:
                kwargs[name] = inputs.pop(name)
            elif len(spec) > 1 and "default" in spec[1]:
                kwargs[name] = spec[1]["default"]
    if inputs:
        raise KeyError(f"{node_id} has no inputs {sorted(inputs)}")
    if issubclass(cls, c.io.ComfyNode):
        return tuple(cls.execute(**kwargs).result)
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    return tuple(out["result"] if isinstance(out, dict) else out)


def run(args):
    harness = _harness()
    harness.load_node_pack()
    harness.load_comfy_node("nodes_easycache.py")
    harness.load_comfy_node("nodes_tomesd.py")
    from fastdiff.integrations import comfyui as host

    wrappers = harness.load_comfy().patcher_extension.WrappersMP

    from fastdiff.errors import FastDiffError

    classify = timing.class_accuracy("ref-flux")
    rows, refused = [], []
    for wl in workloads(harness, args):
        counted = []
        handle = wl.last_block.register_forward_hook(lambda *a: counted.append(1))
        arms, meta, models = [], {}, {}
        for name, node, settings, copy_input in _arms_spec(wl.name):
            base = wl.model
            if copy_input:  # added before the node's own wrappers: ComfyUI runs wrappers in the order added
                base = base.clone()
                base.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, "bench_copy_input", _copy_input)
            models[name] = base if not node else run_node(harness, node, model=base, **settings)[0]

            def call(_, m=models[name]):
                counted.clear()
                out = harness.sample(m, wl.family, seed=args.seed, steps=wl.steps, cfg=wl.cfg,
                                     conditioning=wl.conditioning, latent=wl.latent)
                out = out if wl.to_images is None else wl.to_images(out)
                return out.float(), len(counted)

            if node == "FastDiffAccelerate":  # a target out of reach stops the run: find out before timing
                try:
                    call(None)
                except FastDiffError as e:
                    print(f"{wl.name:<9} {name}: refused: {e}", flush=True)
                    refused.append((wl.name, name, str(e)))
                    continue

            arms.append(timing.Arm(name, call))
            meta[name] = dict(model=wl.name, method=name, node=node or "-", config=json.dumps(settings),
                              note="input copied (see bench_comfyui._copy_input)" if copy_input else "")
        timed = timing.interleaved(arms, args.repeats, warmup=1)
        handle.remove()
        computed = {name: t.output[1] for name, t in timed.items()}
        for t in timed.values():
            t.output = t.output[0]

        def flops_of(name, _extra, wl=wl):
            summary = host.summary_of(models[name])
            if summary is not None and summary.estimated_speedup:
                return summary.estimated_speedup
            if meta[name]["node"] == "EasyCache" and computed[name]:  # it skips the whole model or nothing
                return wl.steps / computed[name]
            return 1.0 if name == "baseline" else None  # ComfyUI's ToMe: no accounting of its FLOPs here

        def extra(name, _t, row, wl=wl):
            row["computed"] = f"{computed[name]}/{wl.steps}"

        part = timing.result_rows(timed, meta, wl.trained, flops_of, classify if wl.trained else None, extra=extra)
        for r in part:
            r["workload"] = wl.describe
            print(f"{wl.name:<9} {r['method']:<28} {timing.time_cell(r)} s  {timing.speed_cell(r)}  "
                  f"PSNR {r['psnr']:6.2f}  computed {r['computed']}"
                  + (f"  acc {r['accuracy']:.2f}" if r.get("accuracy") is not None else ""), flush=True)
        rows += part
    return rows, refused, harness


def write(rows, refused, harness, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wl = argparse.Namespace(describe="; ".join(dict.fromkeys(r["workload"] for r in rows)),
                            trained="ref-flux" in args.models)
    env = timing.environment("fastdiff.eval.bench_comfyui", wl, comfyui=harness.load_comfy().version,
                             refused=[f"{m}, {name}: {why}" for m, name, why in refused])
    keys = ["model", "method", "node", "computed", *timing.RESULT_KEYS, "config", "note"]
    timing.write_results(out, env, rows, keys)
    lines = ["# ComfyUI: fastdiff's nodes vs ComfyUI core's EasyCache (and its ToMe on SD1.5)", "",
             *(f"- **{k}**: {v}" for k, v in env.items()), "", timing.TABLE_NOTE, "",
             f"Settings: start_percent {START}, end_percent {END} for every cached row; the threshold is EasyCache's "
             "reuse_threshold and fastdiff's easycache threshold alike. computed = steps at which the model's last "
             "block ran. \"input copied\": EasyCache with the diffusion model's input copied first, as a fp16/bf16 run "
             "does (ComfyUI 0.3.75's EasyCache adds into that tensor in place, which in float32 on a flow model is also "
             "the sampler's model_input: see bench_comfyui._copy_input).", "",
             "| model | method | computed | time s ± spread | speedup [per-round range] | FLOPs x | PSNR dB | SSIM | "
             "class acc | config |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "-" if r.get("flops_speedup") is None else f"{r['flops_speedup']:.2f}"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['computed']} | {timing.time_cell(r)} | "
                     f"{timing.speed_cell(r)} | {fl} | {r['psnr']:.2f} | {r['ssim']:.4f} | {acc} | `{r['config']}` |")
    if refused:
        lines += ["", "Not run (the node refused the run before it started):", "",
                  *(f"- {m}, {name}: {why}" for m, name, why in refused)]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flux,sd15,ref-flux", type=lambda s: s.split(","),
                    help="comma-separated: flux, sd15 (random weights), ref-flux (trained)")
    ap.add_argument("--samples", type=int, default=10, help="ref-flux samples (class i %% 10)")
    ap.add_argument("--batch", type=int, default=2, help="batch of the random-weight models")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=32, help="latent side of the random-weight models")
    ap.add_argument("--ref-cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    unknown = set(args.models) - {"flux", "sd15", "ref-flux"}
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from flux, sd15, ref-flux")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, refused, harness = run(args)
    write(rows, refused, harness, args, args.out)
    print(f"wrote {args.out}/README.md, results.json, results.csv")


if __name__ == "__main__":
    main()
