"""Train `ref-digits` and its reference classifier on CPU, evaluate them, write weights + model card.

    python -m fastdiff.eval.reference.train_digits --out eval/reference/weights

One thread, one seed: the run is reproducible on the same torch build and stays out of the way of
whatever else the machine is doing. Everything the model card states is measured here, on the weights
as written (float16 DiT weights are reloaded before evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .classifier import WEIGHTS as CLASSIFIER_WEIGHTS
from .classifier import DigitsClassifier, load_classifier
from .data import NUM_CLASSES, load_split, to_model_range
from .digits import NAME, SCHEDULER_CONFIG, TRANSFORMER_CONFIG, build_scheduler, build_transformer, load

COMMAND = "python -m fastdiff.eval.reference.train_digits"


def log(msg: str) -> None:
    print(msg, flush=True)


def _shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to `pad` pixels: the classifier must not depend on exact centring,
    because generated digits are not centred exactly like the scans."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(seed: int, epochs: int, batch_size: int = 64) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(seed)  # initial weights and dropout masks
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(x) / batch_size))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    hx, hy = load_split("held_out")
    stats = dict(epochs=epochs, wall_s=time.perf_counter() - start, final_loss=loss.item(),
                 train_acc=model.accuracy(x, y), held_out_acc=model.accuracy(hx, hy))
    log(f"classifier: held-out accuracy {stats['held_out_acc']:.4f} in {stats['wall_s']:.0f}s")
    return model, stats


def train_denoiser(args) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x0, y0 = load_split("train")
    x0 = to_model_range(x0)
    model = build_transformer().train()
    # The DiT label embedders drop labels on their own in train mode, independently in each block and
    # from the global RNG; drop once per sample here instead (same null id for all blocks, seeded).
    for m in model.modules():
        if hasattr(m, "dropout_prob") and hasattr(m, "token_drop"):
            m.dropout_prob = 0.0
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    alphas = build_scheduler().alphas_cumprod  # the exact schedule the sampler will assume
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step):  # linear warmup, cosine decay to 5%
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x0), (args.batch_size,), generator=g)
        x, y = x0[idx], y0[idx]
        y = torch.where(torch.rand(len(y), generator=g) < args.label_dropout, NUM_CLASSES, y)  # learn the null class
        t = torch.randint(0, len(alphas), (len(y),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = model(a.sqrt() * x + (1 - a).sqrt() * noise, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory early, when the weights move fast
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps} loss(avg 100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - start:.0f}s")
    model.load_state_dict(ema)
    stats = dict(steps=args.steps, wall_s=time.perf_counter() - start,
                 final_loss=sum(losses[-100:]) / len(losses[-100:]), first_loss=sum(losses[:100]) / len(losses[:100]))
    return model.eval(), stats


def sample_accuracy(pipe, clf, per_class: int, steps: int, guidance: float, seed: int = 1000, note: str = "") -> dict:
    """Generate `per_class` samples of every class (one seeded generator each) and classify them."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    start = time.perf_counter()
    images = pipe(labels.tolist(), num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    hit = (clf.predict(images) == labels).float()
    per_class = [hit[labels == c].mean().item() for c in range(NUM_CLASSES)]
    return dict(sampler=type(pipe.scheduler).__name__ + note, steps=steps, guidance=guidance, n=len(labels),
                acc=hit.mean().item(), per_class=per_class, wall_s=time.perf_counter() - start)


def sample_grid(pipe, path: Path, steps: int, guidance: float, seeds: int = 8, scale: int = 4, gap: int = 2) -> None:
    """PNG grid: one row per class, one column per seed (seed s is the same noise in every row)."""
    from PIL import Image

    labels = torch.arange(NUM_CLASSES).repeat_interleave(seeds)
    gens = [torch.Generator().manual_seed(i % seeds) for i in range(len(labels))]
    images = pipe(labels.tolist(), num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    cell = images.shape[-1] * scale
    grid = Image.new("L", (seeds * (cell + gap) + gap, NUM_CLASSES * (cell + gap) + gap), 255)
    for i, img in enumerate(images):
        tile = Image.fromarray((img[0] * 255).round().byte().numpy()).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (gap + (i % seeds) * (cell + gap), gap + (i // seeds) * (cell + gap)))
    grid.save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--eval-per-class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    from safetensors.torch import save_file

    clf, clf_stats = train_classifier(args.seed, args.classifier_epochs)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out / CLASSIFIER_WEIGHTS))

    model, dit_stats = train_denoiser(args)
    n_params = sum(v.numel() for v in model.parameters())
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out / f"{NAME}.safetensors"))
    config = dict(transformer={**TRANSFORMER_CONFIG, "_class_name": type(model).__name__},
                  scheduler={**SCHEDULER_CONFIG, "_class_name": "DPMSolverMultistepScheduler"})
    (args.out / f"{NAME}.json").write_text(json.dumps(config, indent=2) + "\n")

    # Evaluate what was written, through the public loaders.
    pipe, clf = load(weights=args.out), load_classifier(weights=args.out)
    evals = [sample_accuracy(pipe, clf, args.eval_per_class, 20, g) for g in (3.0, 1.0, 2.0, 4.0)]
    evals.append(sample_accuracy(pipe, clf, args.eval_per_class, 10, 3.0))
    from diffusers import DDIMScheduler

    other = load(weights=args.out)
    other.scheduler = DDIMScheduler.from_config(other.scheduler.config)
    evals.append(sample_accuracy(other, clf, args.eval_per_class, 20, 3.0))
    # Why the scheduler config clips lambda (see SCHEDULER_CONFIG): the same sampler without it.
    other.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, lambda_min_clipped=-float("inf"))
    evals.append(sample_accuracy(other, clf, args.eval_per_class, 20, 3.0, note=" without lambda_min_clipped"))
    for e in evals:
        log(f"samples {e['sampler']} {e['steps']} steps guidance {e['guidance']}: accuracy {e['acc']:.4f} (n={e['n']})")
    sample_grid(pipe, args.out / f"{NAME}-samples.png", 20, 3.0)
    total = time.perf_counter() - total

    cmd = " ".join([COMMAND] + [a if " " not in a else repr(a) for a in (sys.argv[1:] if argv is None else argv)])
    (args.out / "MODEL_CARD.md").write_text(model_card(args, cmd, n_params, clf_stats, dit_stats, evals, total))
    log(f"done in {total:.0f}s -> {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_card(args, cmd, n_params, clf_stats, dit_stats, evals, total) -> str:
    import diffusers
    import numpy
    import sklearn

    from .data import HELD_OUT_FRACTION, SPLIT_SEED

    main_eval, cfg = evals[0], TRANSFORMER_CONFIG
    rows = "\n".join(f"| {e['sampler']} | {e['steps']} | {e['guidance']:g} | {e['n']} | {e['acc']:.1%} |" for e in evals)
    per_class = " | ".join(f"{a:.0%}" for a in main_eval["per_class"])
    x_train, x_held = len(load_split("train")[1]), len(load_split("held_out")[1])
    return f"""# ref-digits — model card

A class-conditional DiT trained by fastdiff on the digits bundled with scikit-learn, so that fidelity
metrics of accelerated sampling measure something real. Written by `train_digits.py`; every number below
was measured by that run on the weights as committed.

## Data
- `sklearn.datasets.load_digits()`: 1797 grey 8x8 images (values 0..16), 10 classes.
- Scaled to [0, 1], upsampled to 16x16 bilinearly (`align_corners=False`), and to [-1, 1] for the DiT.
  Bilinear rather than nearest: nearest would make each 2x2 patch constant, i.e. an 8x8 model in disguise.
- Split: stratified, per class a `numpy.random.RandomState({SPLIT_SEED})` permutation, first
  {HELD_OUT_FRACTION:.0%} held out: {x_train} train / {x_held} held-out images. Both models see the train split only.

## Denoiser `ref-digits`
- diffusers `DiTTransformer2DModel`: {cfg['num_layers']} blocks, {cfg['num_attention_heads']} heads x
  {cfg['attention_head_dim']} dims, patch 2 (64 tokens), adaLN-zero, 10 classes + null class id 10,
  out_channels 1 (epsilon, no learned variance); {n_params / 1e6:.2f} M parameters; pixel space, no VAE.
- Noise schedule: 1000 steps, `squaredcos_cap_v2`, epsilon prediction. Sampler: `DPMSolverMultistepScheduler`
  with `lambda_min_clipped=-5.1` (config in `ref-digits.json`; the last row of the table below shows why);
  CFG batched as in `DiTPipeline` (cond half first, null class id 10).
- Training: {dit_stats['steps']} steps, batch {args.batch_size}, AdamW lr {args.lr:g} ({args.warmup} warmup steps,
  cosine to 5%), grad clip 1.0, label dropout {args.label_dropout:g} to the null class, EMA {args.ema:g}
  (EMA weights are shipped), seed {args.seed}. Weights stored as float16 (loaded as float32).
- Loss (MSE on epsilon, mean of 100 steps): first {dit_stats['first_loss']:.4f}, final {dit_stats['final_loss']:.4f}.

## Reference classifier `ref-digits-classifier`
- CNN conv32-conv32-pool-conv64-pool-fc128-fc10, input [0, 1] images; `features()` is the 128-d fc layer.
- Trained {clf_stats['epochs']} epochs on the train split with +-1 px random shifts, AdamW one-cycle lr 2e-3.
- Held-out accuracy (real digits): **{clf_stats['held_out_acc']:.2%}** (train {clf_stats['train_acc']:.2%}).

## Generated samples, classified by the reference classifier
Samples per class: {args.eval_per_class} (seeds 1000..), every sample its own generator.

| sampler | steps | guidance | samples | classified as requested |
|---|---|---|---|---|
{rows}

Per class, {main_eval['sampler']} {main_eval['steps']} steps guidance {main_eval['guidance']:g} (classes 0..9):
{per_class}

Usage: `pipe = fastdiff.eval.reference.load("ref-digits"); pipe([0, 1, 2], num_inference_steps=20, guidance_scale=3,
generator=...).images` -> (N, 1, 16, 16) in [0, 1]; `fastdiff.eval.reference.load_classifier()` judges them.

`ref-digits-samples.png`: rows are classes 0..9, columns seeds 0..7 ({main_eval['sampler']}, 20 steps, guidance 3).

## Run
- Command: `{cmd}`
- Wall time: {total / 60:.1f} min in all (classifier {clf_stats['wall_s']:.0f} s, DiT {dit_stats['wall_s'] / 60:.1f} min,
  the rest evaluation); device: CPU, {_cpu_name()}, torch threads 1.
- Versions: python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__},
  scikit-learn {sklearn.__version__}, numpy {numpy.__version__}.
"""


if __name__ == "__main__":
    main()
