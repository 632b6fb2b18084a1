"""DiTTransformer2DModel (class-conditional DiT): one list of BasicTransformerBlocks, no text tokens."""

from ..context import COND, UNCOND
from .base import (
    BASIC_TRANSFORMER_BLOCK,
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    ResampleSpec,
    TokenSite,
    patch_grid,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return patch_grid(f, h, w, 1, cfg.patch_size, cfg.patch_size)


def _rows(denoiser, bound):
    # DiTPipeline marks unconditional rows with the null class id (= num_embeds_ada_norm).
    labels = bound.get("class_labels")
    if labels is None:
        return None
    null = denoiser.config.num_embeds_ada_norm
    return tuple(UNCOND if int(c) == null else COND for c in labels.reshape(-1).tolist())


SPEC = register(FamilySpec(
    name="dit",
    classes=("DiTTransformer2DModel",),
    block_lists=(BlockList("transformer_blocks", "transformer", IOPattern(encoder_arg=None)),),
    layout=tensor_layout("BCHW", _grid, "none"),
    latent_grid=_grid,
    streams=((r"\.norm1\.|^proj_out_1", "global"),),
    pipelines={"DiTPipeline": CfgLayout("batched", COND, flag=None)},
    row_branches=_rows,
    # the final layer re-embeds (timestep, class) with the first block's embedder
    reruns=("transformer_blocks.0.norm1.emb",),
    attention=(TokenSite(r"^transformer_blocks\.\d+$", BASIC_TRANSFORMER_BLOCK),),
    # (B, C, H, W) latents; sin-cos positions from the latent shape
    resample=ResampleSpec(multiple=lambda cfg: cfg.patch_size),
))
