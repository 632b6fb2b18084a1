"""Where token-level hooks go (token merging, sparse attention): the adapter's TokenSite data resolved to the
submodules of one denoiser.

A `Site` is one submodule (e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn1`) with its role, its
UNet level and the adapter block that holds it. Hooks read their arguments through `hooks.Args`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..adapters.base import BlockAdapter, TokenModule


@dataclass
class Site:
    path: str  # module path of the submodule
    module: torch.nn.Module
    spec: TokenModule
    block: int  # index of the adapter block holding it
    level: int  # UNet resolution level (0 for transformers)
    owner: str  # path of the transformer block it sits in (the unit of the depth rule)


def find(adapter: BlockAdapter) -> list[Site]:
    """Every token submodule the family's data names, in execution order (adapter block, then module order)."""
    spec = adapter.spec
    denoiser = adapter.denoiser
    found = []
    for order, (path, module) in enumerate(denoiser.named_modules()):
        site = next((s for s in spec.attention if re.search(s.blocks, path)), None)
        if site is None:
            continue
        block = next((b.index for b in adapter.blocks  # a block whose path is "" is the whole model (a ComfyUI UNet)
                      if not b.path or path == b.path or path.startswith(b.path + ".")), None)
        if block is None:
            continue  # not inside a block the adapter knows (nothing would account for it)
        level = spec.level(path, denoiser) if spec.level else 0
        for tm in site.modules:
            # name "": the block itself (attention called as a function inside it, e.g. ComfyUI's Flux)
            child = module if tm.name == "" else getattr(module, tm.name, None)
            if isinstance(child, torch.nn.Module):
                where = path if tm.name == "" else f"{path}.{tm.name}"
                found.append((block, order, Site(where, child, tm, block, level, path)))
    found.sort(key=lambda t: (t[0], t[1]))
    return [s for *_, s in found]


def width(module: torch.nn.Module) -> int:
    """Channels of the tokens a submodule takes: the input width of its first linear layer."""
    first = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return first.in_features if first is not None else 0


def fused_qkv(module: torch.nn.Module) -> bool:
    """The attention computes its queries, keys and values with one fused projection (diffusers'
    `fuse_qkv_projections()`), so it cannot take keys/values from another input than its queries.

    Read from what decides it in diffusers: a classic `Attention` takes the fused path when its processor is one of
    the `Fused*` processors (`unfuse_qkv_projections()` puts the original back but leaves `fused_projections` set);
    an `AttentionModuleMixin` module's processor reads the `fused_projections` flag, which unfusing clears.
    """
    processor = getattr(module, "processor", None)
    if type(processor).__name__.startswith("Fused"):
        return True
    return bool(getattr(module, "fused_projections", False)) and hasattr(type(module), "_supports_qkv_fusion")
