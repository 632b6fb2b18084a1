"""PixArtTransformer2DModel (PixArt-α/Σ): BasicTransformerBlocks with text as cross-attention keys."""

from ..context import UNCOND
from .base import (
    BASIC_TRANSFORMER_BLOCK,
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    TokenSite,
    patch_grid,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return patch_grid(f, h, w, 1, cfg.patch_size, cfg.patch_size)


SPEC = register(FamilySpec(
    name="pixart",
    classes=("PixArtTransformer2DModel",),
    block_lists=(BlockList("transformer_blocks", "transformer", IOPattern()),),
    layout=tensor_layout("BCHW", _grid, "cross"),
    latent_grid=_grid,
    streams=((r"^adaln_single", "global"), (r"^caption_projection|attn2\.to_(k|v)\b", "text")),
    pipelines={name: CfgLayout("batched", UNCOND) for name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline")},
    text_tokens=300,
    text_position="cross",
    attention=(TokenSite(r"^transformer_blocks\.\d+$", BASIC_TRANSFORMER_BLOCK),),
))
