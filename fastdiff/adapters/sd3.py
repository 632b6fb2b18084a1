"""SD3Transformer2DModel (MMDiT): joint blocks, image tokens then text tokens in attention."""

from ..context import UNCOND
from .base import (
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    ResampleSpec,
    TokenModule,
    TokenSite,
    patch_grid,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return patch_grid(f, h, w, 1, cfg.patch_size, cfg.patch_size)


SPEC = register(FamilySpec(
    name="sd3",
    classes=("SD3Transformer2DModel",),
    # JointTransformerBlock returns (encoder_hidden_states, hidden_states); the last block's encoder output is None.
    block_lists=(BlockList("transformer_blocks", "joint", IOPattern(hidden_index=1, encoder_index=0)),),
    layout=tensor_layout("BCHW", _grid, "last"),
    latent_grid=_grid,
    streams=(
        (r"norm1(_context)?\.linear|^norm_out\.linear|^time_text_embed", "global"),
        (r"^context_embedder|\.add_[qkv]_proj|\.to_add_out|\.ff_context\.", "text"),
    ),
    pipelines={name: CfgLayout("batched", UNCOND) for name in
               ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")},
    text_tokens=333,
    text_position="last",
    # (..., H, W) latents, patched inside; its position table is cropped to the grid
    resample=ResampleSpec(),
    # joint attention: image tokens in hidden_states, text in encoder_hidden_states, projected together (no
    # separate key input); SD3.5's attn2 is a second, image-only self-attention; ff is the image MLP.
    attention=(TokenSite(r"^transformer_blocks\.\d+$", (
        TokenModule("attn", "self_attention", text="separate"),
        TokenModule("attn2", "self_attention"),
        TokenModule("ff", "mlp"),
    )),),
))
