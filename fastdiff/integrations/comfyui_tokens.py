"""Token merging on ComfyUI's UNet (SD1.x / SD2.x / SDXL), through the patches ComfyUI calls around each
BasicTransformerBlock's attention: `attn1_patch` / `attn2_patch` (before: the normed tokens as queries, keys,
values) and `attn1_output_patch` / `attn2_output_patch` (after: the attention's output), as ComfyUI's own ToMe
node does. The merging is fastdiff's own (`mechanisms.merging.TokenMerge`, the same plan, matching, record and
unmerge as on diffusers), driven through its split form (`split_in` before, `split_out` after).

A patch finds its submodule from what ComfyUI tells it (`transformer_options["block"]` = ("input" | "middle" |
"output", index) and `["block_index"]`, the transformer block inside that block's SpatialTransformer). What the
patches cannot do is refused by name before anything is patched: merging around the MLP (ComfyUI calls no patch
around `ff`), proportional attention (the patches pass no attention mask), and every model but the UNet (Flux,
SD3 and Wan call attention inside their blocks, not through these patches).
"""

from __future__ import annotations

import math
import re

import torch

from ..context import level_grid
from ..errors import FastDiffError, UnsupportedModelError

RUN_KEY = "fastdiff_run"  # the same key as the host's (transformer_options of the run in progress)
# The roles ComfyUI's patches reach: attention role -> the (before, after) patch names
PATCHES = {"self_attention": ("attn1_patch", "attn1_output_patch"),
           "cross_attention": ("attn2_patch", "attn2_output_patch")}
SIDES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_OWNER = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\.\d+\.transformer_blocks\.(\d+)$")


def refuse(merge, adapter) -> None:
    """UnsupportedModelError when this merge config cannot run through ComfyUI's attention patches."""
    model = type(adapter.denoiser).__name__
    c = merge.config
    if adapter.name != "comfy-unet":
        raise UnsupportedModelError(
            f"{model} in ComfyUI: token merging runs through ComfyUI's attn1/attn2 patches, which only its UNet "
            f"(SD1.x, SD2.x, SDXL) calls; the '{adapter.name}' model calls attention inside its blocks. Token "
            "merging supports: comfy-unet")
    if c.method == "tome" and (other := sorted(set(c.targets) - set(PATCHES))):
        raise UnsupportedModelError(
            f"{model} in ComfyUI: merge targets {other} have no ComfyUI patch around them (ComfyUI patches attn1 and "
            f"attn2 only); targets supported here: {sorted(PATCHES)}")
    if c.proportional:
        raise UnsupportedModelError(
            f"{model} in ComfyUI: merge option 'proportional' needs an attention mask on the merged keys, which "
            "ComfyUI's attn1 patch cannot pass; drop 'proportional'")


class TokenPatches:
    """One run's token merging: the sites by what ComfyUI's patches say, and the plans between a submodule's
    before- and after-patch."""

    def __init__(self, run, merge):
        refuse(merge, run.adapter)
        self.run, self.merge = run, merge
        self.sites = {}
        for site in merge.attach_split(run.adapter, run):
            m = _OWNER.match(site.owner)
            if m is None:
                raise UnsupportedModelError(f"{type(run.denoiser).__name__} in ComfyUI: token site {site.path} is not "
                                            "in a SpatialTransformer of an input, middle or output block")
            side = SIDES[m.group(1)]
            key = (side, 0 if side == "middle" else int(m.group(2)), int(m.group(3)))
            self.sites[(site.spec.role, key)] = site
        self._pending: dict = {}

    def before(self, role: str, q, k, v, extra: dict):
        self._pending.pop(role, None)  # a submodule's before-patch always comes right before its after-patch
        call = self.run.current
        block = extra.get("block")
        site = None if call is None or block is None else \
            self.sites.get((role, (block[0], block[1], extra.get("block_index", 0))))
        if site is None:
            return q, k, v
        queries, keys, plan = self.merge.split_in(call, site, q)
        if plan is None:
            return q, k, v
        self._pending[role] = (site, plan)
        if role == "cross_attention":  # the keys are the text: only the queries run on fewer tokens
            return queries, k, v
        if not (k is q and v is q):
            raise FastDiffError(
                f"fastdiff token merging: {site.path} was given keys/values apart from its queries (another node's "
                "attn1 patch, or a self-attention over other tokens), which merging its image tokens would not "
                "reduce with them; drop the other attn1 patch or the fastdiff merge node")
        return queries, keys, keys

    def after(self, role: str, out: torch.Tensor, extra: dict) -> torch.Tensor:
        pending = self._pending.pop(role, None)
        if pending is None:
            return out
        site, plan = pending
        return self.merge.split_out(self.run.current, site, out, plan)

    def tokens_merged(self, records) -> tuple[int, int, int]:
        """(image tokens merged away, image tokens the merged submodules would have run on, calls merged) over
        the run's records, per sample."""
        by_path = {s.path: s for s in self.sites.values()}
        merged = total = calls = 0
        for record in records:
            if not record.reductions:
                continue
            calls += 1
            for path, reduction in record.reductions.items():
                n = math.prod(level_grid(record.ctx.layout.grid, by_path[path].level))
                merged += n - reduction.query
                total += n
        return merged, total, calls


def before_patch(role: str):
    """ComfyUI's attn1_patch / attn2_patch: (q, k, v, extra_options) -> (q, k, v)."""

    def patch(q, k, v, extra_options):
        run = extra_options.get(RUN_KEY)
        tokens = None if run is None else run.tokens
        return (q, k, v) if tokens is None else tokens.before(role, q, k, v, extra_options)

    patch.__fastdiff__ = role
    return patch


def after_patch(role: str):
    """ComfyUI's attn1_output_patch / attn2_output_patch: (out, extra_options) -> out."""

    def patch(out, extra_options):
        run = extra_options.get(RUN_KEY)
        tokens = None if run is None else run.tokens
        return out if tokens is None else tokens.after(role, out, extra_options)

    patch.__fastdiff__ = role
    return patch


def install(clone) -> None:
    """The four patches on `clone` (once: a clone of a fastdiff clone has them already); each passes through
    in a run that merges nothing there."""
    patches = clone.model_options["transformer_options"].get("patches", {})
    for role, (before, after) in PATCHES.items():
        if not any(getattr(p, "__fastdiff__", None) == role for p in patches.get(before, ())):
            clone.set_model_patch(before_patch(role), before)
            clone.set_model_patch(after_patch(role), after)
