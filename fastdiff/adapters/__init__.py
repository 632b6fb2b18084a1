"""Adapters: one small data file per denoiser family, registered on import."""

from . import cogvideox, controlnet, dit, flux, hunyuan, pixart, sd3, unet, wan  # noqa: F401  (registration)
from .base import BlockAdapter, BlockList, CfgLayout, FamilySpec, IOPattern, register, resolve, supported

__all__ = ["BlockAdapter", "BlockList", "CfgLayout", "FamilySpec", "IOPattern", "register", "resolve", "supported"]
