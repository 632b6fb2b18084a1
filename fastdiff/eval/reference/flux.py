"""`ref-flux` and `ref-flux-textures`: class-conditional FLUX-style MMDiTs trained by flow matching at several
resolutions, sampled through diffusers' own `FluxPipeline.__call__` (`ClassFluxPipeline`).

What users run and the DiT/UNet references are not: joint text-image attention (double-stream then single-stream
blocks), RoPE over (text, row, col) positions, packed 2x2 latents with `img_ids`, rectified-flow velocity
prediction, `FlowMatchEulerDiscreteScheduler` with the resolution-dependent shift FLUX uses, and true CFG as two
calls per step. Trained on batches drawn at 16, 24 and 32 px, so one set of weights samples at each of them: a
low-resolution stage (16 px: a quarter of the tokens) is something this model can do, which resolution-bottleneck
sampling needs. `ref-flux` learns the digits (8x8 scans upsampled, so 16 px already holds all their detail);
`ref-flux-textures` the RGB photograph crops of `ref-textures`, where 32 px holds detail that 16 px does not.

The class is the prompt: a learned sequence of 4 tokens (`ClassEmbedding`, width `joint_attention_dim`) as
`prompt_embeds` and one learned vector as `pooled_prompt_embeds`; the null class is the negative prompt.

    python -m fastdiff.eval.reference.train --model ref-flux --steps 6000 --batch-size 32 --lr 5e-4
    python -m fastdiff.eval.reference.train --model ref-flux --width 256 --sizes 32,48,64   # a larger variant (GPU)
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel

from .data import DATASETS
from .pipelines import ClassEmbedding, ClassFluxPipeline
from .recipe import Recipe

# FLUX's dynamic shift, rescaled to this model's token counts: FLUX.1 interpolates mu from 0.5 at 256 tokens to
# 1.15 at 4096; here from 0.5 at 64 tokens (16 px) to 1.15 at 256 (32 px), so the full-resolution schedule spends
# more steps at high noise than the low-resolution one, as FLUX's does.
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_image_seq_len=64,
                             max_image_seq_len=256, base_shift=0.5, max_shift=1.15, shift=1.0)
NO_SHIFT_ABLATION = (" without the shift", {"use_dynamic_shifting": False, "shift": 1.0})
SIZES = (16, 24, 32)


def transformer_config(channels: int, width: int = 128) -> dict:
    """4 double-stream + 6 single-stream blocks, 2 heads of width / 2 (RoPE axes 1/4, 3/8, 3/8 of a head over
    (text, row, col)), patch 1 over 2x2-packed pixels (FLUX's packing): 4.0 M parameters at width 128."""
    head = width // 2
    return dict(patch_size=1, in_channels=4 * channels, out_channels=4 * channels, num_layers=4,
                num_single_layers=6, attention_head_dim=head, num_attention_heads=2, joint_attention_dim=64,
                pooled_projection_dim=32, guidance_embeds=False,
                axes_dims_rope=[head // 4, 3 * head // 8, head - head // 4 - 3 * head // 8])


def flux_predict(parts, x, sigma, y):
    """The training forward: pack (N, C, H, W) into 2x2 tokens with their `img_ids`, the class as the prompt,
    the velocity back unpacked. `sigma` in [0, 1] is what FluxPipeline passes (t / 1000)."""
    n, c, h, w = x.shape
    tr = parts["transformer"]
    packed = ClassFluxPipeline._pack_latents(x, n, c, h, w)
    img_ids = ClassFluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
    text = parts["class_embedding"](y)
    txt_ids = text.new_zeros(text.shape[1], 3)
    out = tr(hidden_states=packed, timestep=sigma, encoder_hidden_states=text,
             pooled_projections=parts["pooled_embedding"](y).flatten(1), txt_ids=txt_ids, img_ids=img_ids).sample
    return ClassFluxPipeline._unpack_latents(out, h, w, 1)


def flux_describe(parts) -> str:
    tr, emb = parts["transformer"], parts["class_embedding"]
    cfg = tr.config
    n = sum(p.numel() for p in tr.parameters())
    n_emb = sum(p.numel() for m in (emb, parts["pooled_embedding"]) for p in m.parameters())
    tokens = ", ".join(f"{s} px: {(s // 2) ** 2}" for s in SIZES)
    return (f"- diffusers `FluxTransformer2DModel`: {cfg.num_layers} double-stream + {cfg.num_single_layers} "
            f"single-stream blocks, {cfg.num_attention_heads} heads x {cfg.attention_head_dim} dims, RoPE axes "
            f"{list(cfg.axes_dims_rope)} over (text, row, col);\n  in/out {cfg.in_channels} channels = "
            f"{cfg.in_channels // 4} x 2x2 packed pixels (image tokens {tokens}); {n / 1e6:.2f} M parameters; "
            "pixel space, no VAE, no guidance embedding.\n"
            f"- Conditioning: `ClassEmbedding` {emb.config.num_classes} classes + null id {emb.config.num_classes}: "
            f"{emb.config.tokens} tokens x {emb.config.dim} as `prompt_embeds`, one {cfg.pooled_projection_dim}-d "
            f"vector as `pooled_prompt_embeds` ({n_emb} parameters).\n"
            "- CFG as `FluxPipeline`'s true CFG: two calls per step, the class then the null class as negative prompt "
            "(`true_cfg_scale` = guidance); pipeline `ClassFluxPipeline` (a `FluxPipeline` subclass that only maps "
            "class ids to prompt embeddings and packs/unpacks pixels).")


def flux_recipe(name: str, dataset: str, width: int = 128, sizes: tuple = SIZES) -> Recipe:
    """The recipe at a transformer width and training resolutions (the full size is the largest): `train.py
    --width/--sizes` builds a larger variant through it."""
    channels, classes = DATASETS[dataset]["channels"], DATASETS[dataset]["num_classes"]
    tcfg = transformer_config(channels, width)
    return Recipe(
        name=name, dataset=dataset, size=max(sizes), sizes=tuple(sizes), objective="flow",
        parts={"transformer": tcfg,
               "class_embedding": dict(num_classes=classes, tokens=4, dim=tcfg["joint_attention_dim"]),
               "pooled_embedding": dict(num_classes=classes, tokens=1, dim=tcfg["pooled_projection_dim"])},
        build=lambda cfg: {"transformer": FluxTransformer2DModel.from_config(dict(cfg["transformer"])),
                           "class_embedding": ClassEmbedding.from_config(dict(cfg["class_embedding"])),
                           "pooled_embedding": ClassEmbedding.from_config(dict(cfg["pooled_embedding"]))},
        predict=flux_predict,
        pipeline=lambda parts, scheduler: ClassFluxPipeline(parts["transformer"], parts["class_embedding"],
                                                            parts["pooled_embedding"], scheduler, max(sizes)),
        describe=flux_describe,
        scheduler=FLOW_SCHEDULER_CONFIG, scheduler_class="FlowMatchEulerDiscreteScheduler",
        ablation=NO_SHIFT_ABLATION, other_sampler=None, probe_sizes=(min(sizes) // 2,),
        variant=lambda width, sizes, new_name: flux_recipe(new_name or name, dataset, width, sizes),
    )


RECIPE = flux_recipe("ref-flux", "digits")
load = RECIPE.load
