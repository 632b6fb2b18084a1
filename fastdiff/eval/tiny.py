"""Tiny, seeded, offline test models: one record per family, the shared builders written once.

Every model is the *real* diffusers class, built from a tiny config with seeded random weights (nothing is
downloaded), so block structure, attention layout and pipeline control flow (batched CFG, separate true-CFG
calls, schedulers, ...) are those of the full-size models. Used by the test suite, the benchmarks and the demo.

    >>> pipe = build_pipeline("flux", seed=0)
    >>> out = pipe(**pipeline_kwargs("flux", cfg=True, steps=3))
    >>> denoiser = build_denoiser("sd3")
    >>> y = denoiser(**denoiser_inputs("sd3", batch_size=2))

Text encoders / tokenizers are never built: pipelines get seeded ``prompt_embeds`` (plus negative / pooled /
attention masks where needed). Adding a family = adding one `Family` record to `RECORDS` (and its adapter in
`fastdiff/adapters/`). What fastdiff knows about the model (CFG layout, token sites) is the adapter's, not
repeated here: `spec(family)`.

Weights are seeded: `build_denoiser` and `build_vae` each reseed torch before constructing, so a record's config
(not the order records or builders run in) fixes its weights.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "FAMILIES",
    "IMAGE_FAMILIES",
    "VIDEO_FAMILIES",
    "RECORDS",
    "TEXT_LEN",
    "Family",
    "record",
    "spec",
    "build_denoiser",
    "build_vae",
    "build_scheduler",
    "build_pipeline",
    "pipeline_kwargs",
    "denoiser_inputs",
    "output_tensor",
]

TEXT_LEN = 8  # text tokens per prompt for every text-conditioned family


@dataclass(frozen=True)
class Family:
    """One family's tiny model: what to build (diffusers class names + tiny configs) and how to drive it.

    Geometry: `size` is the pixel height = width passed to the pipeline (None: the pipeline has no size
    argument, DiT samples at `transformer.sample_size`), `latent` the latent side, `frames` / `latent_frames`
    the pixel / latent frames of a video family (None: an image family).
    Conditioning: `text_dim` the prompt-embedding width (None: class-conditional, seeded ImageNet labels),
    `pooled_dim` the pooled-embedding width, `prompt_mask` whether prompt attention masks go with the embeds.
    Guidance: `cfg_scale` is the "on" value of cfg=True; `distilled_guidance` set means a guidance-distilled model
    whose guidance *embedding* stays at that value while CFG is true CFG (`true_cfg_scale`, a negative prompt).
    Direct denoiser calls (`denoiser_inputs`): the latent argument `sample_arg` laid out as `latent_layout`
    ("BCHW", "BCFHW", "BFCHW", or "packed" 2x2 patches as tokens), the timestep as the pipeline passes it
    (`timestep`: "int", "float", or "unit" = t/1000), `pooled_arg` (None: the pooled embedding goes elsewhere),
    the guidance input as distilled_guidance x `guidance_input_scale`, `denoiser_options` (static inputs) and
    `denoiser_extras` (family, batch, seed) -> inputs that need code (position ids, RoPE tables).
    """

    name: str
    denoiser: str
    denoiser_config: dict
    vae: str
    vae_config: dict
    scheduler: str
    scheduler_config: dict
    pipeline: str
    cfg_scale: float
    latent: int
    size: int | None = None
    frames: int | None = None
    latent_frames: int | None = None
    text_dim: int | None = None
    pooled_dim: int | None = None
    prompt_mask: bool = False
    distilled_guidance: float | None = None
    pipeline_options: dict = field(default_factory=dict)  # extra pipeline __init__ flags
    call_options: dict = field(default_factory=dict)  # extra pipeline call kwargs
    negative_options: dict = field(default_factory=dict)  # extra call kwargs when cfg=True
    output_type: str = "latent"
    sample_arg: str = "hidden_states"
    latent_layout: str = "BCHW"
    timestep: str = "int"
    pooled_arg: str | None = "pooled_projections"
    guidance_input_scale: float = 1.0
    denoiser_options: dict = field(default_factory=dict)
    denoiser_extras: Callable[[Family, int, int], dict] | None = None

    @property
    def video(self) -> bool:
        return self.frames is not None


# -- seeded tensors ----------------------------------------------------------------------------------


def _gen(seed: int, offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1000 + offset)


def _randn(shape, seed: int, offset: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed, offset), dtype=torch.float32)


def _text(rec: Family, batch_size: int, seed: int, offset: int) -> torch.Tensor:
    return _randn((batch_size, TEXT_LEN, rec.text_dim), seed, offset)


def _pooled(rec: Family, batch_size: int, seed: int, offset: int) -> torch.Tensor:
    return _randn((batch_size, rec.pooled_dim), seed, offset)


def _class_labels(batch_size: int, seed: int) -> list[int]:
    """Seeded ImageNet class ids (0..999; 1000 is DiT's null class)."""
    return [int((seed * 131 + 17 + 211 * i) % 1000) for i in range(batch_size)]


def _mask(batch_size: int, pad: int = 2) -> torch.Tensor:
    """Attention mask with the last ``pad`` text tokens marked as padding (like a tokenizer would)."""
    m = torch.ones(batch_size, TEXT_LEN, dtype=torch.long)
    if pad:
        m[:, TEXT_LEN - pad :] = 0
    return m


# -- the few direct-call inputs that need code -------------------------------------------------------


def _flux_ids(rec: Family, b: int, seed: int) -> dict:
    from diffusers import FluxPipeline

    n = rec.latent // 2  # 2x2 packing
    return dict(img_ids=FluxPipeline._prepare_latent_image_ids(b, n, n, "cpu", torch.float32),
                txt_ids=torch.zeros(TEXT_LEN, 3))


def _sdxl_added_cond(rec: Family, b: int, seed: int) -> dict:
    h = rec.size
    time_ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32).repeat(b, 1)
    return dict(added_cond_kwargs={"text_embeds": _pooled(rec, b, seed, 12), "time_ids": time_ids})


def _cogvideox_rope(rec: Family, b: int, seed: int) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    grid = rec.latent // 2
    crops = get_resize_crop_region_for_grid((grid, grid), grid, grid)
    return dict(image_rotary_emb=get_3d_rotary_pos_embed(
        embed_dim=16, crops_coords=crops, grid_size=(grid, grid), temporal_size=rec.latent_frames, device="cpu"))


# -- the records -------------------------------------------------------------------------------------

# diffusers' AutoencoderKL with two levels (vae_scale_factor 2), shared by the image families
_KL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Geometry: image families 16x16 px through a x2 VAE (8x8 latents; patch 2 or Flux's 2x2 packing: 4x4 tokens; UNet
# levels 8x8, 4x4, 2x2), SDXL 32x32 px; video 9 frames of 64x64 px through a x8 spatial / x4 temporal VAE (3x8x8
# latents, patch (1, 2, 2): 3x4x4 tokens). Each scheduler is the one the real checkpoint ships with, configured
# like it.
_RECORDS = (
    Family(
        "dit",
        denoiser="DiTTransformer2DModel",
        denoiser_config=dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=8,  # learned sigma, like DiT-XL-2
            num_layers=2, norm_num_groups=4, sample_size=8, patch_size=2,
            num_embeds_ada_norm=1000,  # ImageNet classes (+1 null class for CFG inside LabelEmbedding)
        ),
        vae="AutoencoderKL", vae_config=dict(_KL_VAE, scaling_factor=0.18215),
        scheduler="DDIMScheduler",
        scheduler_config=dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
        pipeline="DiTPipeline",
        cfg_scale=4.0,
        latent=8,  # DiT has no height/width argument: latent = transformer.sample_size
        output_type="pt",  # DiTPipeline has no latent output: it always decodes
    ),
    Family(
        "pixart",
        denoiser="PixArtTransformer2DModel",
        denoiser_config=dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4,
            out_channels=8,  # learned sigma, like PixArt-alpha
            num_layers=2, norm_num_groups=4, cross_attention_dim=16, sample_size=8, patch_size=2,
            caption_channels=32,  # = text_dim (T5)
            use_additional_conditions=False,
        ),
        vae="AutoencoderKL", vae_config=dict(_KL_VAE, scaling_factor=0.18215),
        scheduler="DPMSolverMultistepScheduler",
        scheduler_config=dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
        pipeline="PixArtAlphaPipeline",
        cfg_scale=4.5,
        size=16, latent=8, text_dim=32, prompt_mask=True,
        call_options=dict(use_resolution_binning=False),
        negative_options=dict(negative_prompt=None),  # the pipeline defaults to "" (tokenizer needed) otherwise
        denoiser_options=dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
    ),
    Family(
        "sd3",
        denoiser="SD3Transformer2DModel",
        denoiser_config=dict(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32,  # = text_dim (CLIP-L|CLIP-G|T5 concat, padded)
            caption_projection_dim=16, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
        ),
        vae="AutoencoderKL",
        vae_config=dict(_KL_VAE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=dict(num_train_timesteps=1000, shift=3.0),
        pipeline="StableDiffusion3Pipeline",
        cfg_scale=7.0,
        size=16, latent=8, text_dim=32, pooled_dim=32,
        timestep="float",
    ),
    Family(
        "flux",
        denoiser="FluxTransformer2DModel",
        denoiser_config=dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32,  # = text_dim (T5)
            pooled_projection_dim=32,
            guidance_embeds=True,  # FLUX.1-dev style (guidance-distilled)
            axes_dims_rope=(4, 6, 6),
        ),
        vae="AutoencoderKL",
        vae_config=dict(_KL_VAE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        pipeline="FluxPipeline",
        cfg_scale=2.0,  # true_cfg_scale
        size=16, latent=8, text_dim=32, pooled_dim=32,
        distilled_guidance=3.5,
        latent_layout="packed", timestep="unit", denoiser_extras=_flux_ids,
    ),
    Family(
        "sd15",
        denoiser="UNet2DConditionModel",
        denoiser_config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
            cross_attention_dim=32,  # = text_dim (CLIP-L)
            attention_head_dim=2,  # legacy naming: this is the number of heads (head_dim = 8 / 16)
        ),
        vae="AutoencoderKL", vae_config=dict(_KL_VAE, scaling_factor=0.18215),
        scheduler="DDIMScheduler",
        scheduler_config=dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading"),
        pipeline="StableDiffusionPipeline",
        pipeline_options=dict(requires_safety_checker=False),
        cfg_scale=7.5,
        size=16, latent=8, text_dim=32,
        sample_arg="sample",
    ),
    Family(
        "sdxl",
        denoiser="UNet2DConditionModel",
        denoiser_config=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
            norm_num_groups=8,
            cross_attention_dim=64,  # = text_dim (CLIP-L + CLIP-G concat)
            attention_head_dim=(2, 2, 4),  # number of heads per level (head_dim = 16)
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 time ids x 8 + pooled_dim
            upcast_attention=False,
        ),
        vae="AutoencoderKL", vae_config=dict(_KL_VAE, scaling_factor=0.13025),
        scheduler="EulerDiscreteScheduler",
        scheduler_config=dict(_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        pipeline="StableDiffusionXLPipeline",
        pipeline_options=dict(force_zeros_for_empty_prompt=True, add_watermarker=False),
        cfg_scale=5.0,
        size=32, latent=16, text_dim=64, pooled_dim=32,
        sample_arg="sample", pooled_arg=None, denoiser_extras=_sdxl_added_cond,  # pooled: in added_cond_kwargs
    ),
    Family(
        "wan",
        denoiser="WanTransformer3DModel",
        denoiser_config=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32,  # = text_dim (UMT5)
            freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        vae="AutoencoderKLWan",
        vae_config=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                        temperal_downsample=[False, True, True]),
        scheduler="UniPCMultistepScheduler",
        scheduler_config=dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                              flow_shift=3.0),
        pipeline="WanPipeline",
        cfg_scale=5.0,
        size=64, latent=8, frames=9, latent_frames=3, text_dim=32,
        latent_layout="BCFHW", timestep="float",
    ),
    Family(
        "cogvideox",
        denoiser="CogVideoXTransformer3DModel",
        denoiser_config=dict(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32,  # = text_dim (T5)
            num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=True,  # CogVideoX-5b style (3D RoPE)
        ),
        vae="AutoencoderKLCogVideoX",
        vae_config=dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
                        sample_height=64, sample_width=64, scaling_factor=0.7),
        scheduler="CogVideoXDDIMScheduler",
        scheduler_config=dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", snr_shift_scale=1.0),
        pipeline="CogVideoXPipeline",
        cfg_scale=6.0,
        size=64, latent=8, frames=9, latent_frames=3, text_dim=32,
        latent_layout="BFCHW",  # CogVideoX latents are [B, F, C, H, W]
        denoiser_extras=_cogvideox_rope,
    ),
    Family(
        "hunyuan",
        denoiser="HunyuanVideoTransformer3DModel",
        denoiser_config=dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,  # = text_dim (Llama)
            pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        ),
        vae="AutoencoderKLHunyuanVideo",
        vae_config=dict(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=dict(num_train_timesteps=1000, shift=7.0),
        pipeline="HunyuanVideoPipeline",
        cfg_scale=2.0,  # true_cfg_scale
        size=64, latent=8, frames=9, latent_frames=3, text_dim=16, pooled_dim=8, prompt_mask=True,
        distilled_guidance=6.0, guidance_input_scale=1000.0,  # the pipeline passes guidance x 1000
        latent_layout="BCFHW", timestep="float",
    ),
)

RECORDS: dict[str, Family] = {r.name: r for r in _RECORDS}
FAMILIES = tuple(RECORDS)
IMAGE_FAMILIES = tuple(n for n, r in RECORDS.items() if not r.video)
VIDEO_FAMILIES = tuple(n for n, r in RECORDS.items() if r.video)


def record(family: str) -> Family:
    if family not in RECORDS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return RECORDS[family]


def spec(family: str):
    """The fastdiff adapter (FamilySpec) of ``family``'s denoiser class: the source of what fastdiff knows about
    it (CFG layout per pipeline, token sites); tests read family facts there."""
    from fastdiff.adapters.base import specs

    cls = record(family).denoiser
    return next(s for s in specs() if cls in s.classes)


# -- builders ----------------------------------------------------------------------------------------


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    # modules are created in float32 already; only cast if a caller changed the default dtype
    # (diffusers' ModelMixin.to(dtype) prints a noisy warning otherwise)
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.to(torch.float32)
    module.eval()
    module.requires_grad_(False)
    return module


def _build(cls_name: str, config: dict):
    import diffusers

    return getattr(diffusers, cls_name)(**copy.deepcopy(config))


def build_denoiser(family: str, seed: int = 0) -> torch.nn.Module:
    """The real diffusers denoiser class of ``family`` with a tiny config and seeded weights
    (float32, eval mode, requires_grad False)."""
    rec = record(family)
    torch.manual_seed(seed)
    return _finish(_build(rec.denoiser, rec.denoiser_config))


def build_vae(family: str, seed: int = 0) -> torch.nn.Module:
    """Tiny seeded VAE matching ``family`` (latent channels = denoiser latent channels)."""
    rec = record(family)
    torch.manual_seed(seed)
    return _finish(_build(rec.vae, rec.vae_config))


def build_scheduler(family: str):
    """The scheduler the real checkpoint of ``family`` ships with (configured like it)."""
    rec = record(family)
    return _build(rec.scheduler, rec.scheduler_config)


def build_pipeline(family: str, seed: int = 0):
    """The real diffusers pipeline of ``family`` around ``build_denoiser(family, seed)``,
    a tiny VAE and the family's real scheduler.  Text encoders / tokenizers are None,
    so the pipeline must be driven with ``pipeline_kwargs(...)`` (pre-computed embeds)."""
    rec = record(family)
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover
        raise NotImplementedError(f"diffusers is not importable: {e}") from e

    cls = getattr(diffusers, rec.pipeline)
    if cls.__module__.startswith("diffusers.utils.dummy_"):
        # diffusers exposes placeholder classes when `transformers` is missing
        raise NotImplementedError(
            f"{rec.pipeline} needs the `transformers` package to be importable (pip install transformers); "
            "no text encoder is ever built, but diffusers only exposes the real pipeline class "
            "when it is installed"
        )

    denoiser = build_denoiser(family, seed)
    vae = build_vae(family, seed)
    scheduler = build_scheduler(family)

    # The components we build; every other required one (text encoders, tokenizers, safety checker,
    # image encoders) is passed as None: the pipelines are driven with seeded prompt embeddings.
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: None for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty}
    kwargs.update(vae=vae, scheduler=scheduler, **{"unet" if "unet" in params else "transformer": denoiser})
    kwargs.update(copy.deepcopy(rec.pipeline_options))
    pipe = cls(**kwargs)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(
    family: str, *, batch_size: int = 1, cfg: bool = True, steps: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``build_pipeline(family)(**kw)``.

    Seeded prompt embeddings (and negative / pooled / masks as the pipeline needs them),
    ``num_inference_steps=steps``, guidance on (cfg=True) or off (cfg=False), a seeded
    ``generator``, tiny spatial (and temporal) size and ``output_type="latent"`` -- except
    DiT, whose pipeline has no latent output and always VAE-decodes (``output_type="pt"``).

    CFG is switched on/off as follows:
      * most families: ``guidance_scale`` = the record's cfg_scale vs 1.0;
      * guidance-distilled ones (flux, hunyuan: ``distilled_guidance``): *true* CFG via ``negative_prompt_embeds``
        + ``true_cfg_scale`` > 1 (two separate transformer calls per step); cfg=False passes no negatives and
        ``true_cfg_scale=1.0``.  ``guidance_scale`` is the distilled guidance *embedding* value and stays fixed.
    """
    rec = record(family)
    b = int(batch_size)
    kw: dict[str, Any] = dict(
        num_inference_steps=int(steps),
        generator=torch.Generator().manual_seed(int(seed)),
        output_type=rec.output_type,
    )
    scale = rec.cfg_scale if cfg else 1.0
    if rec.distilled_guidance is None:
        kw["guidance_scale"] = scale
    else:
        kw["guidance_scale"] = rec.distilled_guidance
        kw["true_cfg_scale"] = scale

    if rec.text_dim is None:
        kw["class_labels"] = _class_labels(b, seed)
        return kw

    if rec.size is not None:
        kw["height"] = kw["width"] = rec.size
    if rec.frames is not None:
        kw["num_frames"] = rec.frames
    kw["prompt_embeds"] = _text(rec, b, seed, 1)
    if rec.pooled_dim is not None:
        kw["pooled_prompt_embeds"] = _pooled(rec, b, seed, 3)
    if rec.prompt_mask:
        kw["prompt_attention_mask"] = _mask(b)
    kw.update(copy.deepcopy(rec.call_options))
    if cfg:
        kw.update(copy.deepcopy(rec.negative_options))
        kw["negative_prompt_embeds"] = _text(rec, b, seed, 2)
        if rec.pooled_dim is not None:
            kw["negative_pooled_prompt_embeds"] = _pooled(rec, b, seed, 4)
        if rec.prompt_mask:
            kw["negative_prompt_attention_mask"] = _mask(b)
    return kw


def output_tensor(out) -> torch.Tensor:
    """The tensor a pipeline call returned (``.images`` or ``.frames``, or ``[0]`` of a tuple)."""
    if isinstance(out, (tuple, list)):
        x = out[0]
    elif hasattr(out, "images"):
        x = out.images
    elif hasattr(out, "frames"):
        x = out.frames
    else:
        x = out
    if not torch.is_tensor(x):
        import numpy as np

        x = torch.from_numpy(np.asarray(x))
    return x


def _latent_shape(rec: Family, b: int) -> tuple[int, ...]:
    c, lat, f = rec.denoiser_config["in_channels"], rec.latent, rec.latent_frames
    return {
        "BCHW": lambda: (b, c, lat, lat),
        "BCFHW": lambda: (b, c, f, lat, lat),
        "BFCHW": lambda: (b, f, c, lat, lat),
        "packed": lambda: (b, (lat // 2) ** 2, c),  # 2x2 latent patches as tokens of c = 4 x 4 channels
    }[rec.latent_layout]()


def denoiser_inputs(family: str, *, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Seeded kwargs for one direct call ``build_denoiser(family)(**kw)`` with the shapes
    and conventions the family's pipeline uses (e.g. Flux gets packed latents and t/1000)."""
    rec = record(family)
    b = int(batch_size)
    t = torch.full((b,), 500, dtype=torch.long) - torch.arange(b, dtype=torch.long) * 37
    timestep = {"int": lambda: t, "float": lambda: t.float(), "unit": lambda: t.float() / 1000.0}[rec.timestep]()
    kw: dict[str, Any] = {rec.sample_arg: _randn(_latent_shape(rec, b), seed, 10), "timestep": timestep}
    if rec.text_dim is None:
        kw["class_labels"] = torch.tensor(_class_labels(b, seed), dtype=torch.long)
    else:
        kw["encoder_hidden_states"] = _text(rec, b, seed, 11)
    if rec.prompt_mask:
        kw["encoder_attention_mask"] = _mask(b)
    if rec.pooled_dim is not None and rec.pooled_arg is not None:
        kw[rec.pooled_arg] = _pooled(rec, b, seed, 12)
    if rec.distilled_guidance is not None:
        kw["guidance"] = torch.full((b,), rec.distilled_guidance * rec.guidance_input_scale, dtype=torch.float32)
    kw.update(copy.deepcopy(rec.denoiser_options))
    if rec.denoiser_extras is not None:
        kw.update(rec.denoiser_extras(rec, b, seed))
    return kw
