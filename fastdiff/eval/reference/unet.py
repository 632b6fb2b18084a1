"""`ref-unet`: a class-conditional `UNet2DConditionModel` trained by this project on the bundled digits (32x32).

The UNet counterpart of `ref-digits`, so the UNet mechanisms (DeepCache-style caching of the deep path, ToMe-SD
merging on the `attn1` of its BasicTransformerBlocks) are measured on a model that learned something. It is built
like SD1.5's UNet, scaled down: channels double per level (16, 32, 64, as SD's 320, 640, 1280), cross-attention
transformers at the two outer levels and in the mid block, none at the deepest level, conv projections in and out
of the transformers, one ResNet per down block and two per up block. At 32x32 pixels
level 0 holds 1024 tokens, so merging there has something to merge (SD1.5 at 512 px: 4096). One difference in
balance: with 16 channels over 1024 tokens (tokens / channels = 64; SD1.5: 4096 / 320 = 13) attention dominates level
0, which holds 58% of the FLOPs (down_blocks.0 18%, up_blocks.2 40%; SD1.5 at 512 px, counted the same way: 38%).
DeepCache, which always runs that shallow path, is capped near 1.7x here (SD1.5: 2.6x); token merging on level 0
gains more than on SD1.5.

The class is what SD's prompt is: a learned sequence of 4 embeddings (`ClassEmbedding`, width 64 = the UNet's
`cross_attention_dim`) passed as `encoder_hidden_states`; CFG runs as in `StableDiffusionPipeline` (one batched
call, the null class's embeddings in the first half). Samples are judged by the digits classifier (reduced to
its 16x16 by area averaging).
"""

from __future__ import annotations

import re

from diffusers import UNet2DConditionModel

from .data import NUM_CLASSES
from .pipelines import ClassEmbedding, ClassUNetPipeline
from .recipe import LEADING_SCHEDULER_CONFIG, LINSPACE_ABLATION, Recipe

NAME = "ref-unet"
SIZE = 32

UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=[16, 32, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a historical name):
    # 1, 1, 2 heads over 16, 32, 64 channels = head dims 16, 32 (and 2 x 32 in the mid block)
    attention_head_dim=[1, 1, 2], cross_attention_dim=64, norm_num_groups=8,
)
EMBEDDING_CONFIG = dict(num_classes=NUM_CLASSES, tokens=4, dim=64)


def unet_predict(parts, x, t, y):
    """The training forward: the class embeddings (null class id for unconditional rows) into the cross-attentions."""
    return parts["unet"](x, t, encoder_hidden_states=parts["class_embedding"](y)).sample


def unet_describe(parts) -> str:
    unet, emb = parts["unet"], parts["class_embedding"]
    cfg = unet.config
    n_unet = sum(p.numel() for p in unet.parameters())
    n_emb = sum(p.numel() for p in emb.parameters())
    attn = [i for i, b in enumerate(cfg.down_block_types) if b.startswith("CrossAttn")]
    blocks = sum(1 for n, _ in unet.named_modules() if re.search(r"\.transformer_blocks\.\d+$", n))
    return (f"- diffusers `UNet2DConditionModel`, {len(cfg.block_out_channels)} levels, channels "
            f"{tuple(cfg.block_out_channels)}, {cfg.layers_per_block} ResNet per down block "
            f"({cfg.layers_per_block + 1} per up block),\n  cross-attention transformers at levels {attn} and in the "
            f"mid block ({blocks} BasicTransformerBlocks, conv proj_in/proj_out as SD1.5);\n"
            f"  level 0 is {cfg.sample_size}x{cfg.sample_size} = {cfg.sample_size ** 2} tokens; in/out channels "
            f"{cfg.in_channels}/{cfg.out_channels} (epsilon); {n_unet / 1e6:.2f} M parameters; pixel space, no VAE.\n"
            f"- Conditioning: `ClassEmbedding`, {emb.config.num_classes} classes + null class id "
            f"{emb.config.num_classes}, each {emb.config.tokens} tokens x {emb.config.dim} "
            f"({n_emb} parameters),\n  fed as `encoder_hidden_states` to every cross-attention.\n"
            "- CFG batched as in `StableDiffusionPipeline` (unconditional half first, `do_classifier_free_guidance`);\n"
            "  pipeline `ClassUNetPipeline`.")


RECIPE = Recipe(
    name=NAME, dataset="digits", size=SIZE, parts={"unet": UNET_CONFIG, "class_embedding": EMBEDDING_CONFIG},
    build=lambda cfg: {"unet": UNet2DConditionModel.from_config(dict(cfg["unet"])),
                       "class_embedding": ClassEmbedding.from_config(dict(cfg["class_embedding"]))},
    predict=unet_predict,
    pipeline=lambda parts, scheduler: ClassUNetPipeline(parts["unet"], parts["class_embedding"], scheduler),
    describe=unet_describe,
    scheduler=LEADING_SCHEDULER_CONFIG,  # SD's timestep spacing: see recipe.py
    ablation=LINSPACE_ABLATION,
)
load = RECIPE.load
