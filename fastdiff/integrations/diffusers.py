"""Diffusers glue: find the denoiser and scheduler of a pipeline, and its latent geometry."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import UnsupportedModelError

DENOISER_ATTRS = ("transformer", "unet")
# More denoisers a pipeline may call per step, e.g. Wan 2.2's low-noise expert `transformer_2`.
_MORE_DENOISERS = re.compile(r"^(transformer|unet)_\d+$")


def unwrap(module: Any) -> Any:
    """The model inside a `torch.compile(model)` wrapper (hooks go on the real module; dynamo traces them)."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def find_parts(obj: Any) -> tuple[Any, torch.nn.Module, Any]:
    """(pipeline or None, denoiser, scheduler or None) of a diffusers pipeline or a bare denoiser."""
    if isinstance(obj, torch.nn.Module):
        return None, unwrap(obj), None
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise UnsupportedModelError(
            f"fastdiff.apply expects a diffusers pipeline or its denoiser (an nn.Module), got {type(obj).__name__}"
        )
    denoiser = next((getattr(obj, a) for a in DENOISER_ATTRS if isinstance(getattr(obj, a, None), torch.nn.Module)),
                    None)
    if denoiser is None:
        raise UnsupportedModelError(
            f"{type(obj).__name__} has no denoiser fastdiff understands: looked for {list(DENOISER_ATTRS)}, "
            f"found components {sorted(k for k, v in components.items() if v is not None)}"
        )
    return obj, unwrap(denoiser), getattr(obj, "scheduler", None)


def find_denoisers(pipeline: Any) -> list[tuple[str, torch.nn.Module]]:
    """Every network the pipeline may call in a step, primary denoiser first: (attribute name, module) —
    more denoisers (`transformer_2`), then control networks (`controlnet`; a MultiControlNetModel's nets)."""
    _, primary, _ = find_parts(pipeline)
    name = next(a for a in DENOISER_ATTRS if unwrap(getattr(pipeline, a, None)) is primary)
    out = [(name, primary)]
    for attr, value in pipeline.components.items():
        if _MORE_DENOISERS.match(attr) and isinstance(value, torch.nn.Module):
            out.append((attr, unwrap(value)))
    for attr, value in pipeline.components.items():
        if attr.startswith("controlnet") and isinstance(value, torch.nn.Module):
            nets = getattr(value, "nets", None)  # MultiControlNetModel calls each of its nets
            if isinstance(nets, torch.nn.ModuleList):
                out += [(f"{attr}.nets.{i}", unwrap(n)) for i, n in enumerate(nets)]
            else:
                out.append((attr, unwrap(value)))
    return out


def latent_dims(pipeline: Any, height: int, width: int, num_frames: int | None,
                patch: tuple[int, int, int] = (1, 1, 1)) -> tuple[int, int, int]:
    """Latent (frames, height, width) the pipeline would denoise for an output of this size.

    The scale is the pipeline's own: the spatial / temporal factors it declares (under any of diffusers' names:
    `vae_scale_factor(_spatial)`, `vae_spatial_compression_ratio` (LTX), ...), else its VAE's downsampling
    (2 ** (levels - 1), as diffusers' pipelines compute it); a pipeline with no VAE samples in pixel space (scale 1).
    A pipeline that declares no temporal factor makes images and takes no `num_frames`. For a bare denoiser
    (`pipeline` None: no VAE to know of) the sizes are latent sizes already, `num_frames` the latent frames.
    The output must make whole latents and a whole grid of tokens of `patch` latents (frames, height, width each):
    ConfigError names the multiple needed.
    """
    from ..errors import ConfigError

    def declared(names):
        return next((v for v in (getattr(pipeline, n, None) for n in names) if v is not None), None)

    owner = "a bare denoiser (sizes are latent sizes)" if pipeline is None else type(pipeline).__name__
    spatial, temporal = 1, 1
    if pipeline is not None:
        spatial = declared(("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_spatial_scale_factor",
                            "vae_scale_factor"))
        temporal = declared(("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor"))
        if temporal is None and num_frames is not None:
            raise ConfigError(f"num_frames={num_frames}: {owner} declares no temporal latent scale "
                              "(vae_scale_factor_temporal), so it makes images; give num_frames for video pipelines only")
        temporal = 1 if temporal is None else temporal
        components = getattr(pipeline, "components", None) or {}
        vae = components.get("vae", getattr(pipeline, "vae", None))
        if spatial is None and vae is not None:  # e.g. DiTPipeline keeps no scale factor: read it off the VAE
            channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
            spatial = 2 ** (len(channels) - 1) if channels else None
        if spatial is None and ("vae" in components or vae is not None):
            raise UnsupportedModelError(
                f"{owner} declares no vae_scale_factor and its vae ({type(vae).__name__}) does not tell its "
                "downsampling, so the latent size of an output is unknown: set pipe.vae_scale_factor, or estimate on "
                "the denoiser with latent sizes")
        spatial = 1 if spatial is None else spatial  # no VAE at all: the pipeline samples pixels
    for name, value in (("spatial", spatial), ("temporal", temporal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(f"{owner}: vae_scale_factor ({name}) must be a positive int, got {value!r}")
    pt, ph, pw = patch
    for axis, size, per in (("height", height, ph), ("width", width, pw)):
        if size % (spatial * per):
            raise ConfigError(
                f"{axis} {size} makes no whole token grid: it must be a multiple of {spatial * per} (latent scale "
                f"{spatial} of {owner} x {per} latents per token)")
    frames = 1 if num_frames is None else num_frames
    if pipeline is not None and num_frames is not None:
        if (num_frames - 1) % temporal:
            raise ConfigError(f"num_frames {num_frames} makes no whole latent frames: {owner} compresses time "
                              f"{temporal}x, so num_frames must be 1 + a multiple of {temporal}")
        frames = (num_frames - 1) // temporal + 1
    if frames % pt:
        raise ConfigError(f"num_frames {num_frames} gives {frames} latent frames, not a multiple of the denoiser's "
                          f"{pt} latent frames per token")
    return frames, height // spatial, width // spatial
