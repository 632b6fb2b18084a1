"""ComfyUI's own denoisers (`comfy.ldm...`), as data: what `fastdiff.integrations.comfyui` needs to run the same
mechanisms on them through ComfyUI's patch API.

These specs are kept out of the diffusers registry (`base.register`): ComfyUI's class names ("Flux", "UNetModel")
are not diffusers classes, `fastdiff.supported()` lists what `fastdiff.apply` takes, and nothing here imports
ComfyUI (classes are named by string). `resolve(diffusion_model)` binds a spec to a ComfyUI diffusion model.

How ComfyUI lets a block be stood in for is data too (`BlockPatch`): DiT blocks through
`set_model_patch_replace(fn, "dit", <patch>, i)`, and a UNet — whose blocks ComfyUI offers no replace patch for —
as one block, the whole diffusion model, through the `DIFFUSION_MODEL` wrapper (a cache then reuses the model's
residual, as ComfyUI's EasyCache does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..context import COND, UNCOND, UNKNOWN, TokenLayout
from ..errors import UnsupportedModelError
from .base import AttentionOp, BlockAdapter, BlockList, FamilySpec, IOPattern, TokenModule, TokenSite


@dataclass(frozen=True)
class BlockPatch:
    """How ComfyUI lets fastdiff stand in for the blocks of one block list.

    Args:
        patch: the "dit" replace-patch name ComfyUI looks up per block index ("double_block", "single_block"), or
            None for the whole diffusion model (the `DIFFUSION_MODEL` wrapper).
        joint: ComfyUI passes the block one [text; image] sequence (`args["img"]`); the host hands hooks the two
            streams apart ("img", "txt"), the same I/O as the list's other blocks, and joins them again.
        args: the patch's argument names, passed on to the block by name.
        outputs: the names of the block's outputs in the dict the patch returns, in the order hooks see them.
    """

    patch: str | None
    joint: bool = False
    args: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("img", "txt")


def _row_branches(model, bound):
    """Each batch row's CFG branch, as ComfyUI's sampler says it: it batches a call's conds in equal chunks and
    names each in `transformer_options["cond_or_uncond"]` (0: the positive cond, 1: the negative one)."""
    chunks = (bound.get("transformer_options") or {}).get("cond_or_uncond")
    batch = bound["x"].shape[0]
    if not chunks or batch % len(chunks):
        return (UNKNOWN,) * batch
    label = {0: COND, 1: UNCOND}
    return tuple(label.get(c, UNKNOWN) for c in chunks for _ in range(batch // len(chunks)))


# -- Flux (comfy.ldm.flux.model.Flux) -----------------------------------------------------------------
def _flux_grid(cfg, f, h, w):
    # ComfyUI pads the latent to whole 2x2 patches
    return (f, (h + 1) // 2, (w + 1) // 2)


def _flux_layout(model, bound):
    x, context = bound["x"], bound.get("context")
    n_text = 0 if context is None else context.shape[1]
    return TokenLayout(_flux_grid(None, 1, x.shape[-2], x.shape[-1]), n_text, "first" if n_text else "none")


_FLUX_IO = IOPattern(hidden_index=0, encoder_index=1, hidden_arg="img", encoder_arg="txt")
_DIT_ARGS = ("vec", "pe", "attn_mask", "transformer_options")

FLUX = FamilySpec(
    name="comfy-flux",
    classes=("Flux",),
    block_lists=(
        BlockList("double_blocks", "double", _FLUX_IO),
        BlockList("single_blocks", "single", _FLUX_IO),  # joint blocks, handed to hooks as two streams
    ),
    hidden_arg="x",
    timestep_arg="timestep",
    layout=_flux_layout,
    latent_grid=_flux_grid,
    row_branches=_row_branches,
    streams=(
        (r"_mod\.|\.modulation\.|^time_in|^vector_in|^guidance_in|adaLN_modulation", "global"),
        (r"^single_blocks\.", "joint"),
        (r"^txt_in|\.txt_attn\.|\.txt_mlp\.", "text"),
    ),
    # ComfyUI's Flux projects q, k, v in one fused linear and calls attention as a function: the attention op of
    # each block is named here, over the joint [text; image] sequence.
    attention_ops=(AttentionOp(r"^(double|single)_blocks\.\d+$", "hidden_size", ("joint",), ("joint",)),),
    # that op is each block's self-attention over [text; image] (sparse attention reaches it through ComfyUI's
    # optimized_attention_override; the block is the site: name "")
    attention=(TokenSite(r"^(double|single)_blocks\.\d+$", (TokenModule("", "self_attention", text="first"),)),),
    text_tokens=512,
    text_position="first",
)

# -- SD1.x / SD2.x / SDXL (comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel) ------------------------
def _unet_grid(cfg, f, h, w):
    return (f, h, w)


def _unet_layout(model, bound):
    x, context = bound["x"], bound.get("context")
    n_text = context.shape[1] if isinstance(context, torch.Tensor) else 0
    return TokenLayout((1, x.shape[-2], x.shape[-1]), n_text, "cross" if n_text else "none")


def _unet_level(path, unet):
    """Resolution level (0 = latent grid) of the layer at `path`: counted from the Downsample / Upsample layers
    ComfyUI's UNet holds in its input and output blocks."""
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)", path)
    deepest = sum(_has(b, "Downsample") for b in unet.input_blocks)
    if path.startswith("middle_block"):
        return deepest
    if m is None:
        return 0
    side, i, j = m.group(1), int(m.group(2)), int(m.group(3))
    if side == "input_blocks":
        level = sum(_has(b, "Downsample") for b in unet.input_blocks[:i])
        return level + (type(unet.input_blocks[i][j]).__name__ == "Downsample")
    level = deepest - sum(_has(b, "Upsample") for b in unet.output_blocks[:i])
    return level - (type(unet.output_blocks[i][j]).__name__ == "Upsample")


def _has(block, name):
    return any(type(layer).__name__ == name for layer in block)


UNET = FamilySpec(
    name="comfy-unet",
    classes=("UNetModel",),
    # the whole model is one block: ComfyUI patches no UNet block's computation away (input/output block patches
    # only see a block's result), so a cache stands in for the whole call's residual
    block_lists=(BlockList("", "unet", IOPattern(hidden_arg="x", encoder_arg=None)),),
    hidden_arg="x",
    timestep_arg="timesteps",
    layout=_unet_layout,
    latent_grid=_unet_grid,
    row_branches=_row_branches,
    streams=((r"^time_embed|^label_emb|\.emb_layers\.", "global"), (r"attn2\.to_(k|v)\b", "text")),
    level=_unet_level,
    # the BasicTransformerBlocks of its SpatialTransformers: ComfyUI calls patches before / after attn1 and attn2
    # (`attn1_patch` gets the normed tokens as queries and keys/values, `context` being CrossAttention's key input)
    attention=(TokenSite(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.transformer_blocks\.\d+$",
                         (TokenModule("attn1", "self_attention", kv_arg="context"),
                          TokenModule("attn2", "cross_attention"), TokenModule("ff", "mlp"))),),
    text_tokens=77,
    text_position="cross",
)

# -- SD3 (comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper) --------------------------
def _sd3_layout(model, bound):
    # the step clock reads SD3 calls at ComfyUI's apply_model (its MMDiT has no DIFFUSION_MODEL wrapper point):
    # the text is the cross-attention cond there
    x = bound["x"]
    context = bound.get("context", bound.get("c_crossattn"))
    n_text = context.shape[1] if isinstance(context, torch.Tensor) else 0
    return TokenLayout(_flux_grid(None, 1, x.shape[-2], x.shape[-1]), n_text, "first" if n_text else "none")


SD3 = FamilySpec(
    name="comfy-sd3",
    classes=("MMDiT",),
    # JointBlock(context, x) -> (context, x); the last one returns no context (its context half is pre-only)
    block_lists=(BlockList("joint_blocks", "joint", _FLUX_IO),),
    hidden_arg="x",
    timestep_arg="timesteps",
    layout=_sd3_layout,
    latent_grid=_flux_grid,
    row_branches=_row_branches,
    streams=(
        (r"adaLN_modulation|^t_embedder|^y_embedder", "global"),
        (r"^context_embedder|\.context_block\.", "text"),
    ),
    attention_ops=(AttentionOp(r"^joint_blocks\.\d+\.x_block\.attn$", "qkv.in_features", ("joint",), ("joint",)),),
    text_tokens=333,
    text_position="first",
)

# -- Wan 2.x (comfy.ldm.wan.model.WanModel) ------------------------------------------------------------
def _wan_grid(cfg, f, h, w):
    return (f, (h + 1) // 2, (w + 1) // 2)  # patch (1, 2, 2), padded to whole patches


def _wan_layout(model, bound):
    x, context = bound["x"], bound.get("context")
    n_text = context.shape[1] if isinstance(context, torch.Tensor) else 0
    return TokenLayout(_wan_grid(None, x.shape[2], x.shape[-2], x.shape[-1]), n_text, "cross" if n_text else "none")


WAN = FamilySpec(
    name="comfy-wan",
    classes=("WanModel",),
    # blocks take the text as cross-attention keys and return the image tokens only
    block_lists=(BlockList("blocks", "block", IOPattern(hidden_arg="img", encoder_arg=None)),),
    hidden_arg="x",
    timestep_arg="timestep",
    layout=_wan_layout,
    latent_grid=_wan_grid,
    row_branches=_row_branches,
    streams=((r"^time_|^img_emb", "global"), (r"^text_embedding|\.cross_attn\.(k|v)(_img)?$", "text")),
    attention_ops=(AttentionOp(r"^blocks\.\d+\.self_attn$", "dim", ("image",), ("image",)),
                   AttentionOp(r"^blocks\.\d+\.cross_attn$", "dim", ("image",), ("text",))),
    text_tokens=512,
    text_position="cross",
)

SPECS: dict[str, FamilySpec] = {c: s for s in (FLUX, UNET, SD3, WAN) for c in s.classes}
PATCHES: dict[str, dict[str, BlockPatch]] = {
    FLUX.name: {"double": BlockPatch("double_block", args=("img", "txt", *_DIT_ARGS)),
                "single": BlockPatch("single_block", joint=True, args=("img", *_DIT_ARGS))},
    UNET.name: {"unet": BlockPatch(None)},
    SD3.name: {"joint": BlockPatch("double_block", args=("img", "txt", "vec", "transformer_options"))},
    WAN.name: {"block": BlockPatch("double_block", args=("img", "txt", "vec", "pe", "transformer_options"),
                                   outputs=("img",))},
}
# Where the step clock opens a call: ComfyUI's DIFFUSION_MODEL wrapper (around the diffusion model's forward), or
# for a model that has none its APPLY_MODEL wrapper (then nothing can wrap the whole diffusion model).
CLOCKS: dict[str, str] = {SD3.name: "apply_model"}


def supported() -> dict[str, list[str]]:
    """Family name -> ComfyUI diffusion model class names."""
    out: dict[str, list[str]] = {}
    for cls, spec in SPECS.items():
        out.setdefault(spec.name, []).append(cls)
    return out


def resolve(diffusion_model: torch.nn.Module) -> BlockAdapter:
    """The adapter of a ComfyUI diffusion model (`model_patcher.model.diffusion_model`), by its class name."""
    for cls in type(diffusion_model).__mro__:
        spec = SPECS.get(cls.__name__)
        if spec is not None:
            return BlockAdapter(spec, diffusion_model)
    raise UnsupportedModelError(
        f"fastdiff has no ComfyUI adapter for {type(diffusion_model).__module__}.{type(diffusion_model).__name__}; "
        f"supported ComfyUI diffusion models: {', '.join(sorted(SPECS))}")
