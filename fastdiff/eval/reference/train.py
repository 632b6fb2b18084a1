"""Train a reference model (and, when needed, its data set's classifier) on CPU, evaluate, write weights + model card.

    python -m fastdiff.eval.reference.train --model ref-unet --out fastdiff/eval/reference/weights

One training loop for every reference model: the recipe (`recipe.py`) says which diffusers models to build and
how to call them, the data set (`data.py`) what to learn. One thread, one seed: a run is reproducible on the same
torch build and stays out of the way of whatever else the machine is doing. Everything the model card states is
measured here, on the weights as written (float16 weights are reloaded before evaluation). The card is one
section of `weights/MODEL_CARD.md` per model; a run rewrites its own section only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import recipe as _recipe
from .classifier import FILES as CLASSIFIER_FILES
from .classifier import ReferenceClassifier, build_classifier, load_classifier
from .data import DATASETS, load_split, to_model_range

COMMAND = "python -m fastdiff.eval.reference.train"
CARD = "MODEL_CARD.md"


def log(msg: str) -> None:
    print(msg, flush=True)


def recipe_of(name: str) -> _recipe.Recipe:
    from . import _MODELS, _module

    return _module(_MODELS, name).RECIPE


def _shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to `pad` pixels: the classifier must not depend on exact centring,
    because generated digits are not centred exactly like the scans."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (photograph crops: a mirrored crop is still of its photograph; digits are not flipped)."""
    return torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)


def train_classifier(seed: int, epochs: int, batch_size: int = 64,
                     dataset: str = "digits") -> tuple[ReferenceClassifier, dict]:
    torch.manual_seed(seed)  # initial weights and dropout masks
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train", dataset)
    model = build_classifier(dataset)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(x) / batch_size))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb = _shift(x[idx], g)
            if dataset == "textures":
                xb = _flip(xb, g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    hx, hy = load_split("held_out", dataset)
    stats = dict(epochs=epochs, wall_s=time.perf_counter() - start, final_loss=loss.item(),
                 train_acc=model.accuracy(x, y), held_out_acc=model.accuracy(hx, hy), trained=True)
    log(f"classifier ({dataset}): held-out accuracy {stats['held_out_acc']:.4f} in {stats['wall_s']:.0f}s")
    return model, stats


def train_denoiser(recipe: _recipe.Recipe, args) -> tuple[dict, dict]:
    """Training of the recipe's parts on its objective (epsilon prediction or rectified flow), each batch at one of
    its training sizes; returns the EMA weights (eval mode) and statistics."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    sizes = recipe.train_sizes
    data = {s: load_split("train", recipe.dataset, s) for s in sizes}
    data = {s: (to_model_range(x), y) for s, (x, y) in data.items()}
    null = DATASETS[recipe.dataset]["num_classes"]
    dev = torch.device(args.device)
    parts = recipe.build(recipe.parts)
    model = torch.nn.ModuleDict(parts).to(dev).train()
    # The DiT label embedders drop labels on their own in train mode, independently in each block and
    # from the global RNG; drop once per sample here instead (same null id for all blocks, seeded).
    for m in model.modules():
        if hasattr(m, "dropout_prob") and hasattr(m, "token_drop"):
            m.dropout_prob = 0.0
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if recipe.objective == "epsilon":  # the exact schedule the sampler will assume
        alphas = _recipe.build_scheduler(recipe.scheduler_config()).alphas_cumprod
    elif recipe.objective != "flow":
        raise ValueError(f"{recipe.name}: unknown objective {recipe.objective!r} (epsilon or flow)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step):  # linear warmup, cosine decay to 5%
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses, start, cpu = [], time.perf_counter(), time.process_time()
    for step in range(args.steps):
        # one resolution per batch (a single-size recipe draws nothing: its RNG stream is as it was)
        x0, y0 = data[sizes[int(torch.randint(0, len(sizes), (1,), generator=g))] if len(sizes) > 1 else sizes[0]]
        idx = torch.randint(0, len(x0), (args.batch_size,), generator=g)
        x, y = x0[idx], y0[idx]
        y = torch.where(torch.rand(len(y), generator=g) < args.label_dropout, null, y)  # learn the null class
        noise = torch.randn(x.shape, generator=g)
        if recipe.objective == "flow":
            sigma = torch.rand(len(y), generator=g)
            x, y, noise, sigma = x.to(dev), y.to(dev), noise.to(dev), sigma.to(dev)
            s4 = sigma.view(-1, 1, 1, 1)
            pred = recipe.predict(parts, (1 - s4) * x + s4 * noise, sigma, y)
            loss = F.mse_loss(pred, noise - x)
        else:
            t = torch.randint(0, len(alphas), (len(y),), generator=g)
            a = alphas[t].view(-1, 1, 1, 1).to(dev)
            x, y, noise, t = x.to(dev), y.to(dev), noise.to(dev), t.to(dev)
            pred = recipe.predict(parts, a.sqrt() * x + (1 - a).sqrt() * noise, t, y)
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
    stats = dict(steps=args.steps, wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu,
                 final_loss=sum(losses[-100:]) / len(losses[-100:]), first_loss=sum(losses[:100]) / len(losses[:100]),
                 n_params=sum(v.numel() for v in model.parameters()),
                 loss_curve=[sum(c) / len(c) for c in (losses[i * len(losses) // 10:(i + 1) * len(losses) // 10]
                                                       for i in range(10)) if c])
    return {k: m.cpu().eval() for k, m in parts.items()}, stats


def _generate(pipe, labels, gens, steps, guidance, chunk: int = 100, **call) -> torch.Tensor:
    """Samples in chunks (one generator each: a sample does not depend on its chunk), to bound memory; `call`:
    more pipeline arguments (`size` of a multi-resolution model)."""
    return torch.cat([pipe(labels[i:i + chunk].tolist(), num_inference_steps=steps, guidance_scale=guidance,
                           generator=gens[i:i + chunk], **call).images for i in range(0, len(labels), chunk)])


def sample_accuracy(pipe, clf, per_class: int, steps: int, guidance: float, seed: int = 1000, note: str = "",
                    size: int | None = None) -> dict:
    """Generate `per_class` samples of every class (one seeded generator each) and classify them; `size`: sample
    at that resolution (a multi-resolution model; the classifier reduces or enlarges to its own)."""
    num_classes = pipe.num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    start = time.perf_counter()
    images = _generate(pipe, labels, gens, steps, guidance, **({} if size is None else {"size": size}))
    hit = (clf.predict(images) == labels).float()
    per_class = [hit[labels == c].mean().item() for c in range(num_classes)]
    note += "" if size is None else f" at {size} px"
    return dict(sampler=type(pipe.scheduler).__name__ + note, steps=steps, guidance=guidance, n=len(labels),
                acc=hit.mean().item(), per_class=per_class, wall_s=time.perf_counter() - start, size=size)


def sample_grid(pipe, path: Path, steps: int, guidance: float, seeds: int = 8, scale: int = 4, gap: int = 2,
                **call) -> None:
    """PNG grid: one row per class, one column per seed (seed s is the same noise in every row)."""
    from PIL import Image

    num_classes = pipe.num_classes
    labels = torch.arange(num_classes).repeat_interleave(seeds)
    gens = [torch.Generator().manual_seed(i % seeds) for i in range(len(labels))]
    images = _generate(pipe, labels, gens, steps, guidance, **call)
    cell = images.shape[-1] * max(1, scale * 16 // images.shape[-1])  # 64 px cells whatever the model's size
    mode = "L" if images.shape[1] == 1 else "RGB"
    white = 255 if mode == "L" else (255,) * 3
    grid = Image.new(mode, (seeds * (cell + gap) + gap, num_classes * (cell + gap) + gap), white)
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        tile = Image.fromarray(arr[..., 0] if mode == "L" else arr).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (gap + (i % seeds) * (cell + gap), gap + (i // seeds) * (cell + gap)))
    grid.save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ref-digits", help="reference model name (fastdiff.eval.reference.names())")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier", choices=("auto", "train", "keep"), default="auto",
                   help="train the data set's classifier, keep the one in --out, or auto: train it if --out has none")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--eval-per-class", type=int, default=30)
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: evaluate the weights in --out with the recipe's current sampler config "
                        "(rewritten into the JSON) and rewrite the model card; the training record comes from the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, help="a larger (or smaller) variant: the denoiser's width (recipes with a "
                   "variant, e.g. ref-flux: 256 on a GPU)")
    p.add_argument("--sizes", help="the variant's training resolutions, comma-separated (the largest is its full size)")
    p.add_argument("--name", help="the variant's name (default: the model's; give one so the shipped weights stay)")
    p.add_argument("--device", default="cpu", help="where the denoiser trains (cuda on a GPU machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = recipe_of(args.model)
    if args.width or args.sizes or args.name:
        if recipe.variant is None:
            raise SystemExit(f"{recipe.name} has no size variants (--width/--sizes/--name)")
        sizes = tuple(int(v) for v in args.sizes.split(",")) if args.sizes else recipe.train_sizes
        recipe = recipe.variant(args.width or recipe.parts["transformer"]["attention_head_dim"] * 2, sizes, args.name)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join([COMMAND] + [a if " " not in a else repr(a) for a in (sys.argv[1:] if argv is None else argv)])
    total = time.perf_counter()
    if args.eval_only:
        path = args.out / f"{recipe.name}.json"
        config = json.loads(path.read_text())
        if "training" not in config:
            raise SystemExit(f"{path} has no training record; train the model first")
        config["scheduler"] = recipe.scheduler_config()
        path.write_text(json.dumps(config, indent=2) + "\n")
        record = config["training"]
    else:
        record = train(recipe, args, cmd)
    record = {**record, "eval_command": cmd if args.eval_only else None}

    # Evaluate what was written, through the public loaders.
    pipe, clf = recipe.load(weights=args.out), load_classifier(weights=args.out, dataset=recipe.dataset)
    at_size = clf.accuracy(*load_split("held_out", recipe.dataset, recipe.size))
    evals = [sample_accuracy(pipe, clf, args.eval_per_class, 20, g) for g in (3.0, 1.0, 2.0, 4.0)]
    evals.append(sample_accuracy(pipe, clf, args.eval_per_class, 10, 3.0))
    other = recipe.load(weights=args.out)
    if recipe.other_sampler is not None:
        import diffusers

        other.scheduler = getattr(diffusers, recipe.other_sampler).from_config(other.scheduler.config)
        evals.append(sample_accuracy(other, clf, args.eval_per_class, 20, 3.0))
    # Why the scheduler config has what it has (see recipe.SCHEDULER_CONFIG): the same sampler without it.
    note, overrides = recipe.ablation
    other.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    evals.append(sample_accuracy(other, clf, args.eval_per_class, 20, 3.0, note=note))
    # A multi-resolution model at each size it was trained at, and below (where it stops working).
    smaller = sorted({*recipe.train_sizes, *recipe.probe_sizes} - {recipe.size})
    for s in smaller:
        evals += [sample_accuracy(pipe, clf, args.eval_per_class, 20, g, size=s) for g in (3.0, 1.0)]
    for e in evals:
        log(f"samples {e['sampler']} {e['steps']} steps guidance {e['guidance']}: accuracy {e['acc']:.4f} (n={e['n']})")
    sample_grid(pipe, args.out / f"{recipe.name}-samples.png", 20, 3.0)
    for s in smaller:
        sample_grid(pipe, args.out / f"{recipe.name}-samples-{s}px.png", 20, 3.0, size=s)
    real_at = {s: clf.accuracy(*load_split("held_out", recipe.dataset, s)) for s in smaller}
    sample_s = _time_one_sample(pipe)
    total = time.perf_counter() - total

    section = model_card(recipe, pipe, record, args.eval_per_class, at_size, evals, sample_s, total, real_at)
    update_card(args.out / CARD, recipe.name, section)
    log(f"done in {total:.0f}s -> {args.out}")


def train(recipe: _recipe.Recipe, args, cmd: str) -> dict:
    """Train (the classifier if asked, then the denoiser), write the weights; returns the training record."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    clf_file = args.out / CLASSIFIER_FILES[recipe.dataset]
    if args.classifier == "train" or (args.classifier == "auto" and not clf_file.exists()):
        clf, clf_stats = train_classifier(args.seed, args.classifier_epochs, dataset=recipe.dataset)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(clf_file))
    else:
        clf_stats = dict(trained=False)
    parts, stats = train_denoiser(recipe, args)
    record = dict(command=cmd, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  ema=args.ema, label_dropout=args.label_dropout, seed=args.seed, **stats, classifier=clf_stats,
                  total_train_s=time.perf_counter() - start, device=_device_name(args.device),
                  versions=_versions(recipe))
    recipe.save(parts, args.out, training=record)
    return record


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {_cpu_name()}, torch threads 1"


def _versions(recipe) -> str:
    import diffusers
    import numpy
    import sklearn

    out = (f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
           f"scikit-learn {sklearn.__version__}, numpy {numpy.__version__}")
    if recipe.dataset == "textures":
        import skimage

        out += f", scikit-image {skimage.__version__}"
    return out


def _time_one_sample(pipe, repeats: int = 3) -> float:
    """Median seconds of one sample, 20 steps, guidance 3 (after a warm-up call)."""
    call = dict(class_labels=[0], num_inference_steps=20, guidance_scale=3.0)
    pipe(**call, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(**call, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def update_card(path: Path, name: str, section: str) -> None:
    """Replace `name`'s section of the model card (from its `# name — model card` heading to the next such heading),
    or append it; the other models' sections stay as they are."""
    text = path.read_text() if path.exists() else ""
    sections = [s for s in re.split(r"(?m)^(?=# ref-[\w-]+ — model card)", text) if s.strip()]
    head = f"# {name} — model card"
    out = [section if s.startswith(head) else s for s in sections]
    if not any(s.startswith(head) for s in sections):
        out.append(section)
    path.write_text("\n".join(s.rstrip("\n") + "\n" for s in out))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _data_section(recipe: _recipe.Recipe) -> str:
    from .data import (
        HELD_OUT_FRACTION,
        SPLIT_SEED,
        TEXTURE_BLOCK,
        TEXTURE_HELD_OUT,
        TEXTURE_SCALE,
        TEXTURE_STRIDE,
        TEXTURE_TRAIN_CROPS,
        TEXTURES,
    )

    n_train, n_held = len(load_split("train", recipe.dataset)[1]), len(load_split("held_out", recipe.dataset)[1])
    if recipe.dataset == "digits":
        s = recipe.size
        return f"""- `sklearn.datasets.load_digits()`: 1797 grey 8x8 images (values 0..16), 10 classes.
- Scaled to [0, 1], upsampled to {s}x{s} bilinearly (`align_corners=False`), and to [-1, 1] for the model.
  Bilinear rather than nearest: nearest would make each 2x2 patch constant, i.e. an 8x8 model in disguise.
- Split: stratified, per class a `numpy.random.RandomState({SPLIT_SEED})` permutation, first
  {HELD_OUT_FRACTION:.0%} held out: {n_train} train / {n_held} held-out images. Both models see the train split only."""
    names = ", ".join(f"{c} {name.split('.')[0]} ({pkg})" for c, (pkg, name) in enumerate(TEXTURES))
    return f"""- 10 photographs that are files inside the installed packages (`sklearn.datasets.load_sample_image`,
  `skimage.data`; none fetched by pooch), one class each:
  {names}.
  Grey ones (brick, gravel) repeated over the three channels.
- Each reduced (box filter) to a shorter side of {TEXTURE_SCALE} px; 32x32 RGB crops, [0, 1], and [-1, 1] for the model.
- Split, spatial: each photograph is tiled in {TEXTURE_BLOCK}x{TEXTURE_BLOCK} blocks and {TEXTURE_HELD_OUT:.0%} of them
  (at least one, `numpy.random.RandomState({SPLIT_SEED})`) are held out. Train: {TEXTURE_TRAIN_CROPS} crops per class at
  random positions whose crop touches no held-out pixel ({n_train} crops); held out: every crop on a {TEXTURE_STRIDE}-px
  grid that lies inside held-out blocks ({n_held} crops). Both models see the train crops only."""


def _classifier_section(recipe, clf_stats, at_size) -> str:
    if recipe.dataset == "digits" and not clf_stats["trained"]:
        note = ("the digits classifier `ref-digits-classifier` (trained by the ref-digits run; see its section)"
                if recipe.size == 16 else
                f"the digits classifier `ref-digits-classifier` (16x16; trained by the ref-digits run, see its "
                f"section).\n  This model's {recipe.size}x{recipe.size} samples are reduced to 16x16 by area averaging "
                "first")
        return (f"- Judge: {note}.\n- Held-out real digits at {recipe.size}x{recipe.size}, classified the same way: "
                f"**{at_size:.2%}**.")
    shape = DATASETS[recipe.dataset]
    head = (f"- CNN conv32-conv32-pool-conv64-pool-fc128-fc{shape['num_classes']}, input [0, 1] "
            f"{shape['channels']}x{shape['size']}x{shape['size']} images; `features()` is the 128-d fc layer.")
    if not clf_stats["trained"]:
        return f"{head}\n- Kept from an earlier run in the weights folder. Held-out accuracy: **{at_size:.2%}**."
    flips = " and horizontal flips" if recipe.dataset == "textures" else ""
    return (f"{head}\n- Trained {clf_stats['epochs']} epochs on the train split with +-1 px random shifts{flips}, AdamW "
            f"one-cycle lr 2e-3, in {clf_stats['wall_s']:.0f} s.\n- Held-out accuracy (real data): "
            f"**{clf_stats['held_out_acc']:.2%}** (train {clf_stats['train_acc']:.2%}; chance "
            f"{1 / shape['num_classes']:.0%}).")


def _schedule_line(recipe, sched) -> str:
    """The card's line on the noise schedule and the sampler."""
    if recipe.objective == "flow":
        return (f"- Objective: rectified flow (x_t = (1 - sigma) x + sigma noise, sigma uniform in [0, 1], the model "
                f"predicts noise - x). Sampler: `{recipe.scheduler_class}`\n  with `use_dynamic_shifting` (mu "
                f"{sched.base_shift:g} at {sched.base_image_seq_len} tokens to {sched.max_shift:g} at "
                f"{sched.max_image_seq_len}, as FLUX's shift scaled to these token counts), through "
                "`FluxPipeline.__call__`\n  (config in `{name}.json`; the ablation row below shows the shift's "
                "effect).".replace("{name}", recipe.name))
    spacing = (f"`timestep_spacing=\"{sched.timestep_spacing}\"`, `steps_offset={sched.steps_offset}`, "
               if sched.timestep_spacing != "linspace" else "")
    return (f"- Noise schedule: 1000 steps, `squaredcos_cap_v2`, epsilon prediction. Sampler: "
            f"`DPMSolverMultistepScheduler`\n  with {spacing}`lambda_min_clipped={sched.lambda_min_clipped:g}`\n"
            f"  (config in `{recipe.name}.json`; the last row of the table below shows why).")


def _target(recipe) -> str:
    return "the velocity" if recipe.objective == "flow" else "epsilon"


def _curve(rec) -> str:
    """The loss curve, if the run recorded one (mean loss of each tenth of training)."""
    curve = rec.get("loss_curve")
    if not curve:
        return ""
    return "\n- Loss curve (mean of each tenth of training): " + ", ".join(f"{v:.4f}" for v in curve) + "."


def _resolution_section(recipe, evals, real_at) -> str:
    """Per-resolution accuracy of a model trained at several sizes (empty for a single-size model)."""
    if not real_at:
        return ""
    full = [e for e in evals if e.get("size") is None and e["steps"] == 20 and e["guidance"] in (1.0, 3.0)
            and e["sampler"] == evals[0]["sampler"]]
    rows = []
    for s in sorted(real_at) + [recipe.size]:
        at = full if s == recipe.size else [e for e in evals if e.get("size") == s]
        acc = {e["guidance"]: e["acc"] for e in at}
        trained = "trained" if s in recipe.train_sizes else "**not trained** (probe)"
        real = "" if s == recipe.size else f"{real_at[s]:.1%}"
        rows.append(f"| {s} px | {(s // 2) ** 2} | {trained} | {real} | {acc.get(1.0, float('nan')):.1%} | "
                    f"{acc.get(3.0, float('nan')):.1%} |")
    real_full = "the full-size held-out accuracy is under the classifier above"
    return f"""
## Per resolution
One set of weights, sampled at each size (20 steps, `size=` of the pipeline call); the classifier reduces or
enlarges every image to its own size first, so the "real held-out" column says what it can tell at that size
({real_full}).

| size | image tokens | | real held-out, classified | samples, guidance 1 | samples, guidance 3 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Samples grids: `{recipe.name}-samples.png` (full size) and `{recipe.name}-samples-<size>px.png`.
"""


def model_card(recipe, pipe, rec, per_class_n, at_size, evals, sample_s, total, real_at=None) -> str:
    """The model's section of MODEL_CARD.md, from its training record and this evaluation."""
    main_eval, name, s = evals[0], recipe.name, recipe.size
    last = len(main_eval["per_class"]) - 1
    rows = "\n".join(f"| {e['sampler']} | {e['steps']} | {e['guidance']:g} | {e['n']} | {e['acc']:.1%} |" for e in evals)
    per_class = " | ".join(f"{a:.0%}" for a in main_eval["per_class"])
    clf_name = "ref-digits-classifier" if recipe.dataset == "digits" else f"{name}-classifier"
    clf_stats = rec["classifier"]
    loss = f"first {rec['first_loss']:.4f}, final {rec['final_loss']:.4f}"
    clf_time = f"classifier {clf_stats['wall_s']:.0f} s, " if clf_stats["trained"] else ""
    sched = pipe.scheduler.config
    cpu = (f" The denoiser's training took {rec['cpu_s'] / 60:.1f} min of CPU time (the rest of its wall time went to\n"
           "  other jobs on the shared machine)." if rec.get("cpu_s") is not None else "")
    if rec.get("note"):
        cpu += f"\n  {rec['note']}."
    evaluated = (f"\n- Evaluated again (sampler config changed, weights as trained): `{rec['eval_command']}`, "
                 f"{total / 60:.1f} min." if rec.get("eval_command") else
                 f"\n- Wall time: {total / 60:.1f} min in all, the rest evaluation.")
    return f"""# {name} — model card

A class-conditional model trained by fastdiff on data bundled with installed packages, so that fidelity
metrics of accelerated sampling measure something real. Written by `train.py`; every number below
was measured by that run on the weights as committed.

## Data
{_data_section(recipe)}

## Denoiser `{name}`
{recipe.describe(pipe.components)}
{_schedule_line(recipe, sched)}
- Training: {rec['steps']} steps, batch {rec['batch_size']}, AdamW lr {rec['lr']:g} ({rec['warmup']} warmup steps,
  cosine to 5%), grad clip 1.0, label dropout {rec['label_dropout']:g} to the null class, EMA {rec['ema']:g}
  (EMA weights are shipped), seed {rec['seed']}. Weights stored as float16 (loaded as float32).
- Loss (MSE on {_target(recipe)}, mean of 100 steps): {loss}.{_curve(rec)}

## Reference classifier `{clf_name}`
{_classifier_section(recipe, clf_stats, at_size)}

## Generated samples, classified by the reference classifier
Samples per class: {per_class_n} (seeds 1000..), every sample its own generator.

| sampler | steps | guidance | samples | classified as requested |
|---|---|---|---|---|
{rows}

Per class, {main_eval['sampler']} {main_eval['steps']} steps guidance {main_eval['guidance']:g} (classes 0..{last}):
{per_class}
{_resolution_section(recipe, evals, real_at or {})}
Usage: `pipe = fastdiff.eval.reference.load("{name}"); pipe([0, 1, 2], num_inference_steps=20, guidance_scale=3,
generator=...).images` -> (N, {DATASETS[recipe.dataset]['channels']}, {s}, {s}) in [0, 1];
`fastdiff.eval.reference.load_classifier("{name}")` judges them. One sample (20 steps, guidance 3, batch 1) takes
{sample_s:.2f} s on this CPU, one thread (median of 3, on the machine as shared during the run).

`{name}-samples.png`: rows are classes 0..{last}, columns seeds 0..7 ({main_eval['sampler']}, 20 steps, guidance 3).

## Run
- Command: `{rec['command']}`
- Training wall time: {rec['total_train_s'] / 60:.1f} min ({clf_time}denoiser {rec['wall_s'] / 60:.1f} min); device:
  {rec['device']}.{cpu}{evaluated}
- Versions: {rec['versions']}.
"""


if __name__ == "__main__":
    main()
