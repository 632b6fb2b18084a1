"""WanTransformer3DModel (Wan 2.x video): blocks with self-attention over frames×h×w, text cross-attention."""

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
    return patch_grid(f, h, w, *cfg.patch_size)


SPEC = register(FamilySpec(
    name="wan",
    classes=("WanTransformer3DModel",),
    block_lists=(BlockList("blocks", "transformer", IOPattern()),),
    layout=tensor_layout("BCFHW", _grid, "cross"),
    latent_grid=_grid,
    streams=(
        (r"^condition_embedder\.(time_embedder|time_proj)", "global"),
        (r"^condition_embedder\.text_embedder|attn2\.to_(k|v)\b", "text"),
    ),
    # WanPipeline calls the transformer for the conditional branch, then for the unconditional one.
    pipelines={name: CfgLayout("separate", COND, flag=None) for name in ("WanPipeline", "WanImageToVideoPipeline")},
    text_tokens=512,
    text_position="cross",
    # (B, C, F, H, W) latents; RoPE from the latent shape (frames kept, height and width resampled)
    resample=ResampleSpec(),
    # RoPE (cos, sin), each (1, video positions, 1, dim): a broadcast batch dim, so per-row gathers batch.
    attention=(TokenSite(r"^blocks\.\d+$", (
        TokenModule("attn1", "self_attention", rope=RopeSpec("rotary_emb", seq_dim=1, batch_dim=0)),
        TokenModule("attn2", "cross_attention"),
        TokenModule("ffn", "mlp"),
    )),),
))
