"""Tiny, seeded, offline model / pipeline factories.

Everything here is built from configs with seeded random weights -- nothing is
downloaded.  The models are the *real* diffusers classes, just very small, so
that the block structure, attention layout and pipeline control flow (CFG
batching, separate true-CFG calls, schedulers, ...) are exactly those of the
full-size models.  Used by the test-suite and the demo.

    >>> pipe = build_pipeline("flux", seed=0)
    >>> out = pipe(**pipeline_kwargs("flux", cfg=True, steps=3))
    >>> denoiser = build_denoiser("sd3")
    >>> y = denoiser(**denoiser_inputs("sd3", batch_size=2))

Text encoders / tokenizers are never built: pipelines get seeded
``prompt_embeds`` (plus negative / pooled / attention masks where needed).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "IMAGE_FAMILIES",
    "VIDEO_FAMILIES",
    "build_denoiser",
    "build_vae",
    "build_scheduler",
    "build_pipeline",
    "pipeline_kwargs",
    "denoiser_inputs",
    "output_tensor",
]

FAMILIES = ("dit", "pixart", "sd3", "flux", "sd15", "sdxl", "wan", "cogvideox", "hunyuan")
IMAGE_FAMILIES = ("dit", "pixart", "sd3", "flux", "sd15", "sdxl")
VIDEO_FAMILIES = ("wan", "cogvideox", "hunyuan")

# --------------------------------------------------------------------------------------
# Tiny dimensions (one place, so tests can reason about shapes)
# --------------------------------------------------------------------------------------

TEXT_LEN = 8  # text tokens per prompt for every text-conditioned family

# per-family image/video geometry used by pipeline_kwargs / denoiser_inputs
#   height/width : pixel size passed to the pipeline
#   latent       : latent spatial size (height // vae_scale_factor)
#   frames       : pixel frames (video)   latent_frames : after temporal compression
_GEOM: dict[str, dict[str, int]] = {
    "dit": dict(latent=8),  # DiT has no height/width argument: latent = transformer.sample_size
    "pixart": dict(height=16, width=16, latent=8),  # vae x2, patch 2 -> 4x4 tokens
    "sd3": dict(height=16, width=16, latent=8),  # vae x2, patch 2 -> 4x4 tokens
    "flux": dict(height=16, width=16, latent=8),  # vae x2, 2x2 packing -> 4x4 tokens
    "sd15": dict(height=16, width=16, latent=8),  # vae x2; unet levels 8x8, 4x4, 2x2
    "sdxl": dict(height=32, width=32, latent=16),  # vae x2; unet levels 16x16, 8x8, 4x4
    # video: vae x8 spatial / x4 temporal, patch (1,2,2) -> 3 x 4 x 4 tokens
    "wan": dict(height=64, width=64, latent=8, frames=9, latent_frames=3),
    "cogvideox": dict(height=64, width=64, latent=8, frames=9, latent_frames=3),
    "hunyuan": dict(height=64, width=64, latent=8, frames=9, latent_frames=3),
}

# text embedding widths (what the pipeline's text encoders would produce)
_TEXT_DIM = {
    "pixart": 32,  # caption_channels (T5)
    "sd3": 32,  # joint_attention_dim (CLIP-L|CLIP-G|T5 concat, padded)
    "flux": 32,  # joint_attention_dim (T5)
    "sd15": 32,  # cross_attention_dim (CLIP-L)
    "sdxl": 64,  # cross_attention_dim (CLIP-L + CLIP-G concat)
    "wan": 32,  # text_dim (UMT5)
    "cogvideox": 32,  # text_embed_dim (T5)
    "hunyuan": 16,  # text_embed_dim (Llama)
}
_POOLED_DIM = {"sd3": 32, "flux": 32, "sdxl": 32, "hunyuan": 8}

# "on" guidance values used when cfg=True
_CFG_SCALE = {
    "dit": 4.0,
    "pixart": 4.5,
    "sd3": 7.0,
    "flux": 2.0,  # true_cfg_scale; guidance_scale (distilled embed) stays 3.5
    "sd15": 7.5,
    "sdxl": 5.0,
    "wan": 5.0,
    "cogvideox": 6.0,
    "hunyuan": 2.0,  # true_cfg_scale; guidance_scale (distilled embed) stays 6.0
}
_FLUX_GUIDANCE = 3.5
_HUNYUAN_GUIDANCE = 6.0


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


def _gen(seed: int, offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1000 + offset)


def _randn(shape, seed: int, offset: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed, offset), dtype=torch.float32)


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    # modules are created in float32 already; only cast if a caller changed the default dtype
    # (diffusers' ModelMixin.to(dtype) prints a noisy warning otherwise)
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.to(torch.float32)
    module.eval()
    module.requires_grad_(False)
    return module


# --------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------


def _make_denoiser(family: str) -> torch.nn.Module:
    import diffusers as d

    if family == "dit":
        return d.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma, like DiT-XL-2
            num_layers=2,
            norm_num_groups=4,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,  # ImageNet classes (+1 null class for CFG inside LabelEmbedding)
        )
    if family == "pixart":
        return d.PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma, like PixArt-alpha
            num_layers=2,
            norm_num_groups=4,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=_TEXT_DIM["pixart"],
            use_additional_conditions=False,
        )
    if family == "sd3":
        return d.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM["sd3"],
            caption_projection_dim=16,
            pooled_projection_dim=_POOLED_DIM["sd3"],
            out_channels=4,
            pos_embed_max_size=16,
        )
    if family == "flux":
        return d.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM["flux"],
            pooled_projection_dim=_POOLED_DIM["flux"],
            guidance_embeds=True,  # FLUX.1-dev style (guidance-distilled)
            axes_dims_rope=(4, 6, 6),
        )
    if family == "sd15":
        return d.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM["sd15"],
            attention_head_dim=2,  # legacy naming: this is the number of heads (head_dim = 8 / 16)
        )
    if family == "sdxl":
        return d.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2),
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM["sdxl"],
            attention_head_dim=(2, 2, 4),  # number of heads per level (head_dim = 16)
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + _POOLED_DIM["sdxl"],
            upcast_attention=False,
        )
    if family == "wan":
        return d.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=_TEXT_DIM["wan"],
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    if family == "cogvideox":
        return d.CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=_TEXT_DIM["cogvideox"],
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=True,  # CogVideoX-5b style (3D RoPE)
        )
    if family == "hunyuan":
        return d.HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=_TEXT_DIM["hunyuan"],
            pooled_projection_dim=_POOLED_DIM["hunyuan"],
            rope_axes_dim=(4, 6, 6),
        )
    raise AssertionError(family)


def build_denoiser(family: str, seed: int = 0) -> torch.nn.Module:
    """The real diffusers denoiser class of ``family`` with a tiny config and seeded weights
    (float32, eval mode, requires_grad False)."""
    _check(family)
    torch.manual_seed(seed)
    return _finish(_make_denoiser(family))


# --------------------------------------------------------------------------------------
# VAEs and schedulers
# --------------------------------------------------------------------------------------


def _tiny_vae_kl(**kw):
    from diffusers import AutoencoderKL

    # two levels -> vae_scale_factor 2
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **kw,
    )


def build_vae(family: str, seed: int = 0) -> torch.nn.Module:
    """Tiny seeded VAE matching ``family`` (latent channels = denoiser latent channels)."""
    import diffusers as d

    _check(family)
    torch.manual_seed(seed)
    if family in ("dit", "pixart", "sd15", "sdxl"):
        vae = _tiny_vae_kl(scaling_factor=0.18215 if family != "sdxl" else 0.13025)
    elif family == "sd3":
        vae = _tiny_vae_kl(
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        )
    elif family == "flux":
        vae = _tiny_vae_kl(
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        )
    elif family == "wan":
        vae = d.AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    elif family == "cogvideox":
        vae = d.AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
            scaling_factor=0.7,
        )
    elif family == "hunyuan":
        vae = d.AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    else:  # pragma: no cover
        raise AssertionError(family)
    return _finish(vae)


def build_scheduler(family: str):
    """The scheduler the real checkpoint of ``family`` ships with (configured like it)."""
    import diffusers as d

    _check(family)
    sd_betas = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    if family == "dit":
        return d.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    if family == "pixart":
        return d.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
        )
    if family == "sd3":
        return d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":
        return d.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if family == "sd15":
        return d.DDIMScheduler(
            **sd_betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
        )
    if family == "sdxl":
        return d.EulerDiscreteScheduler(**sd_betas, steps_offset=1, timestep_spacing="leading")
    if family == "wan":
        return d.UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        )
    if family == "cogvideox":
        return d.CogVideoXDDIMScheduler(
            **sd_betas,
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0,
        )
    if family == "hunyuan":
        return d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    raise AssertionError(family)


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


_PIPELINE_OPTIONS = {
    "sd15": dict(requires_safety_checker=False),
    "sdxl": dict(force_zeros_for_empty_prompt=True, add_watermarker=False),
}


def build_pipeline(family: str, seed: int = 0):
    """The real diffusers pipeline of ``family`` around ``build_denoiser(family, seed)``,
    a tiny VAE and the family's real scheduler.  Text encoders / tokenizers are None,
    so the pipeline must be driven with ``pipeline_kwargs(...)`` (pre-computed embeds)."""
    _check(family)
    try:
        import diffusers as d
    except ImportError as e:  # pragma: no cover
        raise NotImplementedError(f"diffusers is not importable: {e}") from e

    cls_name = {
        "dit": "DiTPipeline",
        "pixart": "PixArtAlphaPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
        "sd15": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "wan": "WanPipeline",
        "cogvideox": "CogVideoXPipeline",
        "hunyuan": "HunyuanVideoPipeline",
    }[family]
    cls = getattr(d, cls_name)
    if family != "dit" and cls.__module__.startswith("diffusers.utils.dummy_"):
        # diffusers exposes placeholder classes when `transformers` is missing
        raise NotImplementedError(
            f"{cls_name} needs the `transformers` package to be importable (pip install transformers); "
            "no text encoder is ever built, but diffusers only exposes the real pipeline class "
            "when it is installed"
        )

    denoiser = build_denoiser(family, seed)
    vae = build_vae(family, seed)
    scheduler = build_scheduler(family)

    # The components we build; every other required one (text encoders, tokenizers, safety checker,
    # image encoders) is passed as None: the pipelines are driven with seeded prompt embeddings.
    kwargs = {name: None for name, p in inspect.signature(cls.__init__).parameters.items()
              if name != "self" and p.default is inspect.Parameter.empty}
    kwargs.update(vae=vae, scheduler=scheduler, **{"unet" if family in ("sd15", "sdxl") else "transformer": denoiser})
    kwargs.update(_PIPELINE_OPTIONS.get(family, {}))
    pipe = cls(**kwargs)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text(family: str, batch_size: int, seed: int, offset: int) -> torch.Tensor:
    return _randn((batch_size, TEXT_LEN, _TEXT_DIM[family]), seed, offset)


def _pooled(family: str, batch_size: int, seed: int, offset: int) -> torch.Tensor:
    return _randn((batch_size, _POOLED_DIM[family]), seed, offset)


def _dit_labels(batch_size: int, seed: int) -> list[int]:
    """Seeded ImageNet class ids (0..999; 1000 is DiT's null class)."""
    return [int((seed * 131 + 17 + 211 * i) % 1000) for i in range(batch_size)]


def _mask(batch_size: int, pad: int = 2) -> torch.Tensor:
    """Attention mask with the last ``pad`` text tokens marked as padding (like a tokenizer would)."""
    m = torch.ones(batch_size, TEXT_LEN, dtype=torch.long)
    if pad:
        m[:, TEXT_LEN - pad :] = 0
    return m


def pipeline_kwargs(
    family: str, *, batch_size: int = 1, cfg: bool = True, steps: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``build_pipeline(family)(**kw)``.

    Seeded prompt embeddings (and negative / pooled / masks as the pipeline needs them),
    ``num_inference_steps=steps``, guidance on (cfg=True) or off (cfg=False), a seeded
    ``generator``, tiny spatial (and temporal) size and ``output_type="latent"`` -- except
    DiT, whose pipeline has no latent output and always VAE-decodes (``output_type="pt"``).

    CFG is switched on/off as follows:
      * dit / pixart / sd3 / sd15 / sdxl / wan / cogvideox: ``guidance_scale`` > 1 vs 1.0
      * flux / hunyuan (guidance-distilled): *true* CFG via ``negative_prompt_embeds`` +
        ``true_cfg_scale`` > 1 (two separate transformer calls per step); cfg=False passes
        no negatives and ``true_cfg_scale=1.0``.  ``guidance_scale`` is the distilled
        guidance *embedding* value and is kept fixed (3.5 / 6.0).
    """
    _check(family)
    b = int(batch_size)
    g = _GEOM[family]
    kw: dict[str, Any] = dict(
        num_inference_steps=int(steps),
        generator=torch.Generator().manual_seed(int(seed)),
        output_type="latent",
    )
    scale = _CFG_SCALE[family] if cfg else 1.0

    if family == "dit":
        kw["class_labels"] = _dit_labels(b, seed)
        kw["guidance_scale"] = scale
        kw["output_type"] = "pt"
        return kw

    if "height" in g:
        kw["height"], kw["width"] = g["height"], g["width"]
    if "frames" in g:
        kw["num_frames"] = g["frames"]

    kw["prompt_embeds"] = _text(family, b, seed, 1)
    neg = _text(family, b, seed, 2) if cfg else None

    if family == "pixart":
        kw["guidance_scale"] = scale
        kw["prompt_attention_mask"] = _mask(b)
        kw["use_resolution_binning"] = False
        if cfg:
            kw["negative_prompt"] = None  # the pipeline defaults to "" (tokenizer needed) otherwise
            kw["negative_prompt_embeds"] = neg
            kw["negative_prompt_attention_mask"] = _mask(b)
    elif family == "sd3":
        kw["guidance_scale"] = scale
        kw["pooled_prompt_embeds"] = _pooled(family, b, seed, 3)
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = _pooled(family, b, seed, 4)
    elif family == "flux":
        kw["guidance_scale"] = _FLUX_GUIDANCE
        kw["pooled_prompt_embeds"] = _pooled(family, b, seed, 3)
        kw["true_cfg_scale"] = scale
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = _pooled(family, b, seed, 4)
    elif family == "sd15":
        kw["guidance_scale"] = scale
        if cfg:
            kw["negative_prompt_embeds"] = neg
    elif family == "sdxl":
        kw["guidance_scale"] = scale
        kw["pooled_prompt_embeds"] = _pooled(family, b, seed, 3)
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = _pooled(family, b, seed, 4)
    elif family in ("wan", "cogvideox"):
        kw["guidance_scale"] = scale
        if cfg:
            kw["negative_prompt_embeds"] = neg
    elif family == "hunyuan":
        kw["guidance_scale"] = _HUNYUAN_GUIDANCE
        kw["true_cfg_scale"] = scale
        kw["pooled_prompt_embeds"] = _pooled(family, b, seed, 3)
        kw["prompt_attention_mask"] = _mask(b)
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = _pooled(family, b, seed, 4)
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


# --------------------------------------------------------------------------------------
# Direct denoiser inputs
# --------------------------------------------------------------------------------------


def denoiser_inputs(family: str, *, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Seeded kwargs for one direct call ``build_denoiser(family)(**kw)`` with the shapes
    and conventions the family's pipeline uses (e.g. Flux gets packed latents and t/1000)."""
    _check(family)
    b = int(batch_size)
    g = _GEOM[family]
    lat = g["latent"]
    t_int = torch.full((b,), 500, dtype=torch.long) - torch.arange(b, dtype=torch.long) * 37

    if family == "dit":
        return dict(
            hidden_states=_randn((b, 4, lat, lat), seed, 10),
            timestep=t_int,
            class_labels=torch.tensor(_dit_labels(b, seed), dtype=torch.long),
        )
    if family == "pixart":
        return dict(
            hidden_states=_randn((b, 4, lat, lat), seed, 10),
            encoder_hidden_states=_text(family, b, seed, 11),
            encoder_attention_mask=_mask(b),
            timestep=t_int,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if family == "sd3":
        return dict(
            hidden_states=_randn((b, 4, lat, lat), seed, 10),
            encoder_hidden_states=_text(family, b, seed, 11),
            pooled_projections=_pooled(family, b, seed, 12),
            timestep=t_int.float(),
        )
    if family == "flux":
        from diffusers import FluxPipeline

        n = lat // 2  # 2x2 packing
        return dict(
            hidden_states=_randn((b, n * n, 16), seed, 10),
            encoder_hidden_states=_text(family, b, seed, 11),
            pooled_projections=_pooled(family, b, seed, 12),
            timestep=t_int.float() / 1000.0,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, n, n, "cpu", torch.float32),
            txt_ids=torch.zeros(TEXT_LEN, 3),
            guidance=torch.full((b,), _FLUX_GUIDANCE, dtype=torch.float32),
        )
    if family == "sd15":
        return dict(
            sample=_randn((b, 4, lat, lat), seed, 10),
            timestep=t_int,
            encoder_hidden_states=_text(family, b, seed, 11),
        )
    if family == "sdxl":
        h = g["height"]
        time_ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32).repeat(b, 1)
        return dict(
            sample=_randn((b, 4, lat, lat), seed, 10),
            timestep=t_int,
            encoder_hidden_states=_text(family, b, seed, 11),
            added_cond_kwargs={"text_embeds": _pooled(family, b, seed, 12), "time_ids": time_ids},
        )
    if family == "wan":
        f = g["latent_frames"]
        return dict(
            hidden_states=_randn((b, 16, f, lat, lat), seed, 10),
            timestep=t_int.float(),
            encoder_hidden_states=_text(family, b, seed, 11),
        )
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        f = g["latent_frames"]
        grid = lat // 2
        crops = get_resize_crop_region_for_grid((grid, grid), grid, grid)
        rope = get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=crops, grid_size=(grid, grid), temporal_size=f, device="cpu"
        )
        return dict(
            hidden_states=_randn((b, f, 4, lat, lat), seed, 10),  # CogVideoX latents are [B, F, C, H, W]
            encoder_hidden_states=_text(family, b, seed, 11),
            timestep=t_int,
            image_rotary_emb=rope,
        )
    if family == "hunyuan":
        f = g["latent_frames"]
        return dict(
            hidden_states=_randn((b, 4, f, lat, lat), seed, 10),
            timestep=t_int.float(),
            encoder_hidden_states=_text(family, b, seed, 11),
            encoder_attention_mask=_mask(b),
            pooled_projections=_pooled(family, b, seed, 12),
            guidance=torch.full((b,), _HUNYUAN_GUIDANCE * 1000.0, dtype=torch.float32),
        )
    raise AssertionError(family)
