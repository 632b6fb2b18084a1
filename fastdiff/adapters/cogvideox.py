"""CogVideoXTransformer3DModel: blocks with full attention over [text, video] tokens."""

from ..context import UNCOND
from .base import (
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    RopeSpec,
    TokenModule,
    TokenSite,
    patch_grid,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return patch_grid(f, h, w, cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size)


SPEC = register(FamilySpec(
    name="cogvideox",
    classes=("CogVideoXTransformer3DModel",),
    # CogVideoXBlock returns (hidden_states, encoder_hidden_states).
    block_lists=(BlockList("transformer_blocks", "joint", IOPattern(hidden_index=0, encoder_index=1)),),
    layout=tensor_layout("BFCHW", _grid, "first"),
    latent_grid=_grid,
    streams=(
        (r"\.norm[12]\.linear|^norm_out\.linear|^time_embedding", "global"),
        (r"^patch_embed\.text_proj", "text"),
        (r"^transformer_blocks\.", "joint"),
    ),
    pipelines={name: CfgLayout("batched", UNCOND) for name in
               ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")},
    text_tokens=226,
    text_position="first",
    # attn1 takes video tokens and text separately (the processor concatenates [text; video]) with RoPE over
    # the video positions only (None for CogVideoX-2b); the block concatenates [text; video] before ff.
    attention=(TokenSite(r"^transformer_blocks\.\d+$", (
        TokenModule("attn1", "self_attention", text="separate", rope=RopeSpec("image_rotary_emb", 0, "none")),
        TokenModule("ff", "mlp", text="first"),
    )),),
))
