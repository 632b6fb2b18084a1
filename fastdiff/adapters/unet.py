"""UNet2DConditionModel (SD1.x/2.x, SDXL): down, mid and up blocks on resolution levels."""

import re

from ..context import UNCOND
from .base import (
    BASIC_TRANSFORMER_BLOCK,
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    ResampleSpec,
    TokenSite,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return (f, h, w)


def _level(path, unet):
    """Resolution level (0 = latent grid) at which the layer at `path` produces its output."""
    deepest = len(unet.down_blocks) - 1
    if path.startswith("mid_block"):
        return deepest
    m = re.match(r"(down|up)_blocks\.(\d+)\.(\w+)", path)
    if m is None:
        return 0
    side, i, part = m.group(1), int(m.group(2)), m.group(3)
    if side == "down":
        return i + 1 if part == "downsamplers" else i
    level = deepest - i
    return level - 1 if part == "upsamplers" else level


def _shallow(blocks):
    """DeepCache: the outermost down block and up block always run; everything deeper may be reused."""
    downs = [b.index for b in blocks if b.kind == "down"]
    ups = [b.index for b in blocks if b.kind == "up"]
    return {downs[0], ups[-1]}


def _target_size(bound, hw):
    """SDXL's size conditioning at a smaller stage: `time_ids` (original h, w, crop top, left, target h, w in pixels)
    with the target size of the stage's latent grid `hw` (the call's target scaled like its latents)."""
    added = bound.get("added_cond_kwargs")
    if not added or added.get("time_ids") is None:
        return {}
    ids = added["time_ids"].clone()
    full = bound["sample"].shape[-2:]
    ids[:, 4] = ids[:, 4] * hw[0] / full[0]
    ids[:, 5] = ids[:, 5] * hw[1] / full[1]
    return {"added_cond_kwargs": {**added, "time_ids": ids}}


def _downsampling(cfg):
    """Every down block but the last halves the latent side."""
    return 2 ** (len(cfg.down_block_types) - 1)


# Down blocks return (hidden_states, residual tuple); mid and up blocks return hidden_states.
SPEC = register(FamilySpec(
    name="unet",
    classes=("UNet2DConditionModel",),
    block_lists=(
        BlockList("down_blocks", "down", IOPattern(hidden_index=0, encoder_arg=None), reuse="output"),
        BlockList("mid_block", "mid", IOPattern(encoder_arg=None), reuse="output"),
        BlockList("up_blocks", "up", IOPattern(encoder_arg=None), reuse="output"),
    ),
    always_compute=_shallow,
    hidden_arg="sample",
    layout=tensor_layout("BCHW", _grid, "cross", hidden_arg="sample"),
    latent_grid=_grid,
    streams=((r"^time_embedding|^add_embedding|\.time_emb_proj", "global"), (r"attn2\.to_(k|v)\b", "text")),
    level=_level,
    pipelines={name: CfgLayout("batched", UNCOND) for name in (
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline", "StableDiffusionXLControlNetInpaintPipeline")},
    text_tokens=77,
    text_position="cross",
    # the BasicTransformerBlocks inside each level's Transformer2DModel (`attentions.i.transformer_blocks.j`)
    attention=(TokenSite(r"\.transformer_blocks\.\d+$", BASIC_TRANSFORMER_BLOCK),),
    # (B, C, H, W) latents; SDXL's size conditioning follows the stage (`time_ids`)
    resample=ResampleSpec(positions=_target_size, multiple=_downsampling),
))
