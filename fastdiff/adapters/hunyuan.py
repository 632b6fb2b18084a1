"""HunyuanVideoTransformer3DModel: double-stream then single-stream blocks over [video, text] tokens."""

from ..context import COND
from .base import (
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    ResampleSpec,
    RopeSpec,
    TokenModule,
    TokenSite,
    patch_grid,
    register,
    tensor_layout,
)


def _grid(cfg, f, h, w):
    return patch_grid(f, h, w, cfg.patch_size_t, cfg.patch_size, cfg.patch_size)


SPEC = register(FamilySpec(
    name="hunyuan",
    classes=("HunyuanVideoTransformer3DModel",),
    # Both block kinds return (hidden_states, encoder_hidden_states).
    block_lists=(
        BlockList("transformer_blocks", "double", IOPattern(hidden_index=0, encoder_index=1)),
        BlockList("single_transformer_blocks", "single", IOPattern(hidden_index=0, encoder_index=1)),
    ),
    layout=tensor_layout("BCFHW", _grid, "last"),
    latent_grid=_grid,
    streams=(
        (r"norm1(_context)?\.linear|^norm_out\.linear|^time_text_embed|^context_embedder\.time_text_embed|"
         r"\.norm_out\.linear|^single_transformer_blocks\.\d+\.norm\.", "global"),
        (r"^single_transformer_blocks\.", "joint"),
        (r"^context_embedder\.|\.add_[qkv]_proj|\.to_add_out|\.ff_context\.", "text"),
    ),
    # With true CFG the pipeline runs the positive prompt first, then the negative one.
    pipelines={"HunyuanVideoPipeline": CfgLayout("separate", COND, flag=None)},
    text_tokens=256,
    text_position="last",
    # (B, C, F, H, W) latents; RoPE from the latent shape (frames kept, height and width resampled)
    resample=ResampleSpec(),
    # Both block kinds call attention with video tokens and text separately (keys [video; text]), RoPE over the
    # video positions, and a (batch, 1, 1, video + text) key mask. The single blocks' MLP is a bare Linear on
    # the joint sequence outside any wrappable submodule: only their attention is merged.
    attention=tuple(TokenSite(blocks, (
        TokenModule("attn", "self_attention", text="separate", rope=RopeSpec("image_rotary_emb", 0, "none"),
                    mask_arg="attention_mask"),
        *extra,
    )) for blocks, extra in ((r"^transformer_blocks\.\d+$", (TokenModule("ff", "mlp"),)),
                             (r"^single_transformer_blocks\.\d+$", ()))),
))
