"""PixArtTransformer2DModel (PixArt-α/Σ): BasicTransformerBlocks with text as cross-attention keys."""

from ..context import UNCOND
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


def _resolution(bound, hw):
    """PixArt-alpha's size conditioning (1024 px models: `added_cond_kwargs["resolution"]`, pixels) at a smaller
    stage: the call's resolution scaled like its latents to the stage's grid `hw`."""
    added = bound.get("added_cond_kwargs")
    if not added or added.get("resolution") is None:
        return {}
    res = added["resolution"].clone()
    full = bound["hidden_states"].shape[-2:]
    res[:, 0] = res[:, 0] * hw[0] / full[0]
    res[:, 1] = res[:, 1] * hw[1] / full[1]
    return {"added_cond_kwargs": {**added, "resolution": res}}


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
    # (B, C, H, W) latents; sin-cos positions from the latent shape, the size conditioning follows the stage
    resample=ResampleSpec(positions=_resolution, multiple=lambda cfg: cfg.patch_size),
))
