"""`ref-digits`: a class-conditional DiT trained by this project on the bundled 16x16 digits.

Random-weight models make fidelity numbers meaningless; this one is small enough to train on a CPU in
minutes (`python -m fastdiff.eval.reference.train --model ref-digits`) and real enough to judge: its samples are
recognised by the reference classifier, so an acceleration that breaks them shows up as lost class accuracy,
not just lost PSNR.

The denoiser is a stock diffusers `DiTTransformer2DModel` in pixel space (no VAE) and the pipeline does
classifier-free guidance exactly as diffusers' `DiTPipeline` does (one batched call, cond half first,
unconditional rows carry the null class id), so the fastdiff DiT adapter sees what it sees on real DiTs.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel

from .data import NUM_CLASSES, SIZE
from .pipelines import ClassDiTPipeline
from .recipe import SCHEDULER_CONFIG, Recipe, build_scheduler

NAME = "ref-digits"

# 6 blocks x 4 heads x 32 dims over 8x8 = 64 tokens: trains in ~23 min on one CPU thread; head dim 32
# keeps it friendly to attention kernels. out_channels=1: epsilon only, no learned variance.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
    sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
)

__all__ = ["NAME", "RECIPE", "SCHEDULER_CONFIG", "TRANSFORMER_CONFIG", "build_scheduler", "build_transformer",
           "load"]


def build_transformer(config: dict | None = None) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_config(dict(config or TRANSFORMER_CONFIG))


def dit_predict(parts, x, t, y):
    """The training forward of a class-conditional DiT (null class id for unconditional rows)."""
    return parts["transformer"](x, timestep=t, class_labels=y).sample


def dit_describe(parts) -> str:
    m = parts["transformer"]
    cfg, n = m.config, sum(p.numel() for p in m.parameters())
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    return (f"- diffusers `DiTTransformer2DModel`: {cfg.num_layers} blocks, {cfg.num_attention_heads} heads x "
            f"{cfg.attention_head_dim} dims, patch {cfg.patch_size} ({tokens} tokens), adaLN-zero, "
            f"{cfg.num_embeds_ada_norm} classes + null class id {cfg.num_embeds_ada_norm},\n  out_channels "
            f"{cfg.out_channels} (epsilon, no learned variance); {n / 1e6:.2f} M parameters; pixel space, no VAE.\n"
            "- CFG batched as in `DiTPipeline` (cond half first, unconditional rows carry the null class id); "
            "pipeline `ClassDiTPipeline`.")


RECIPE = Recipe(
    name=NAME, dataset="digits", size=SIZE, parts={"transformer": TRANSFORMER_CONFIG},
    build=lambda cfg: {"transformer": build_transformer(cfg["transformer"])},
    predict=dit_predict,
    pipeline=lambda parts, scheduler: ClassDiTPipeline(parts["transformer"], scheduler),
    describe=dit_describe,
)
load = RECIPE.load
