"""FluxTransformer2DModel: double-stream blocks, then single-stream blocks over [text, image] tokens."""

import torch

from ..context import COND, TokenLayout
from .base import (
    BlockList,
    CfgLayout,
    FamilySpec,
    IOPattern,
    ResampleSpec,
    RopeSpec,
    TokenModule,
    TokenSite,
    register,
)


def _grid(cfg, f, h, w):
    # The pipeline packs 2x2 latent patches into tokens before the transformer.
    return (f, h // 2, w // 2)


def _layout(denoiser, bound):
    # Latents arrive packed (B, tokens, C); the grid is read from the image position ids (…, row, col).
    ids = bound["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    grid = (1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    if grid[1] * grid[2] != bound["hidden_states"].shape[1] or bool((ids[:, 1:] != ids[:, 1:].round()).any()):
        grid = (1, 1, bound["hidden_states"].shape[1])  # ids do not describe a full grid: a flat sequence
    text = bound.get("encoder_hidden_states")
    n_text = 0 if text is None else text.shape[1]
    return TokenLayout(grid, n_text, "first" if n_text else "none")


def _positions(bound, grid):
    # img_ids for an (h, w) token grid: (0, row, col) per token, row-major, as FluxPipeline builds them; or for an
    # (N, 2) tensor of (row, col) positions, fractional ones too (a mixed-resolution set: bottleneck regions)
    ids = bound["img_ids"]
    base = ids[0] if ids.ndim == 3 else ids
    if isinstance(grid, torch.Tensor):
        new = base.new_zeros(grid.shape[0], 3)
        new[:, 1:] = grid.to(device=base.device, dtype=base.dtype)
    else:
        h, w = grid
        new = base.new_zeros(h * w, 3)
        new[:, 1] = torch.arange(h, device=base.device).repeat_interleave(w).to(base.dtype)
        new[:, 2] = torch.arange(w, device=base.device).repeat(h).to(base.dtype)
    new[:, 0] = base[0, 0]
    return {"img_ids": new.expand(ids.shape[0], -1, -1) if ids.ndim == 3 else new}


SPEC = register(FamilySpec(
    name="flux",
    classes=("FluxTransformer2DModel",),
    block_lists=(
        BlockList("transformer_blocks", "double", IOPattern(hidden_index=1, encoder_index=0)),
        BlockList("single_transformer_blocks", "single", IOPattern(hidden_index=1, encoder_index=0)),
    ),
    layout=_layout,
    latent_grid=_grid,
    streams=(
        (r"norm1(_context)?\.linear|^norm_out\.linear|^time_text_embed|^single_transformer_blocks\.\d+\.norm\.",
         "global"),
        (r"^single_transformer_blocks\.", "joint"),
        (r"^context_embedder|\.add_[qkv]_proj|\.to_add_out|\.ff_context\.", "text"),
    ),
    # True CFG (true_cfg_scale > 1 with a negative prompt) runs the positive branch first, then the negative.
    pipelines={name: CfgLayout("separate", COND, flag=None) for name in
               ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline")},
    text_tokens=512,
    text_position="first",
    resample=ResampleSpec(packing=2, positions=_positions, token_sets=True),
    # RoPE (cos, sin), each (text + image positions, dim), covers [text; image]. Double blocks pass text and image
    # separately; single blocks concatenate [text; image] before attention (their MLP is a bare Linear on the
    # joint sequence, outside any wrappable submodule, so only their attention is merged).
    attention=(
        TokenSite(r"^transformer_blocks\.\d+$", (
            TokenModule("attn", "self_attention", text="separate", rope=RopeSpec("image_rotary_emb", 0, "first")),
            TokenModule("ff", "mlp"),
        )),
        TokenSite(r"^single_transformer_blocks\.\d+$", (
            TokenModule("attn", "self_attention", text="first", rope=RopeSpec("image_rotary_emb", 0, "first")),
        )),
    ),
))
