"""Diffusers glue: find the denoiser and scheduler of a pipeline, and its latent geometry."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError

DENOISER_ATTRS = ("transformer", "unet")


def find_parts(obj: Any) -> tuple[Any, torch.nn.Module, Any]:
    """(pipeline or None, denoiser, scheduler or None) of a diffusers pipeline or a bare denoiser."""
    if isinstance(obj, torch.nn.Module):
        return None, obj, None
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
    return obj, denoiser, getattr(obj, "scheduler", None)


def latent_dims(pipeline: Any, height: int, width: int, num_frames: int | None) -> tuple[int, int, int]:
    """Latent (frames, height, width) the pipeline would denoise for an output of this size."""
    spatial = getattr(pipeline, "vae_scale_factor_spatial", None) or getattr(pipeline, "vae_scale_factor", None)
    if spatial is None:  # e.g. DiTPipeline keeps no scale factor: read it off the VAE like the others do
        channels = getattr(getattr(getattr(pipeline, "vae", None), "config", None), "block_out_channels", None)
        spatial = 2 ** (len(channels) - 1) if channels else 8
    temporal = getattr(pipeline, "vae_scale_factor_temporal", None) or 1
    frames = 1 if not num_frames else (num_frames - 1) // temporal + 1
    return frames, height // spatial, width // spatial
