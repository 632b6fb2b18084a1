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

Sparse attention (`mechanisms.sparse_attention.SparseAttention`, the same patterns and `fastdiff.attention`
dispatch as on diffusers) is reached through `transformer_options["optimized_attention_override"]`, which ComfyUI
calls for every attention call of every model, whatever attention backend runs. The override knows whose call it
is: on the UNet the attn1 patches mark the self-attention running between them; in Flux, ComfyUI names the block
running (`transformer_options["block_type"]` / `["block_index"]`), whose one attention call is its joint
[text; image] self-attention (text tokens stay dense, as on diffusers). Any other call — cross-attention, another
model called inside the run, a dense step — goes to ComfyUI's own attention function untouched (or to the override
another node had set before). SD3 and Wan are refused by name.
"""

from __future__ import annotations

import math
import re
from functools import partial

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


def refuse_sparse(sparse, adapter) -> None:
    """UnsupportedModelError when sparse attention cannot run through ComfyUI's attention override here."""
    if adapter.name not in SPARSE_FAMILIES:
        raise UnsupportedModelError(
            f"{type(adapter.denoiser).__name__} in ComfyUI: sparse attention needs to know which of the model's "
            f"attention calls is its self-attention over the token grid, which fastdiff knows for "
            f"{sorted(SPARSE_FAMILIES)} only (the '{adapter.name}' model is not one of them)")


SPARSE_FAMILIES = ("comfy-flux", "comfy-unet")


def _unet_key(site) -> tuple:
    m = _OWNER.match(site.owner)
    if m is None:
        raise UnsupportedModelError(f"UNetModel in ComfyUI: token site {site.path} is not in a SpatialTransformer "
                                    "of an input, middle or output block")
    side = SIDES[m.group(1)]
    return side, 0 if side == "middle" else int(m.group(2)), int(m.group(3))


def _flux_key(site) -> tuple:
    kind, index = site.path.split(".")  # "double_blocks.3"
    return kind.split("_")[0], int(index)


class TokenPatches:
    """One run's token merging and sparse attention: the sites by what ComfyUI's patches say, the plans between
    a submodule's before- and after-patch, and the self-attention whose call the override is about to get."""

    def __init__(self, run, merge=None, sparse=None):
        self.run, self.merge, self.sparse = run, merge, sparse
        self.sites, self.sparse_sites = {}, {}
        if merge is not None:
            refuse(merge, run.adapter)
            for site in merge.attach_split(run.adapter, run):
                self.sites[(site.spec.role, _unet_key(site))] = site
        if sparse is not None:
            refuse_sparse(sparse, run.adapter)
            key = _flux_key if run.adapter.name == "comfy-flux" else _unet_key
            self.sparse_sites = {key(site): site for site in sparse.attach_split(run.adapter, run)}
        self._pending: dict = {}
        self.attending = None  # the UNet self-attention site between its attn1 patches (sparse attention)

    def before(self, role: str, q, k, v, extra: dict):
        self._pending.pop(role, None)  # a submodule's before-patch always comes right before its after-patch
        call = self.run.current
        block = extra.get("block")
        key = None if call is None or block is None else (block[0], block[1], extra.get("block_index", 0))
        if role == "self_attention":
            self.attending = self.sparse_sites.get(key)
        site = self.sites.get((role, key))
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
        if role == "self_attention":
            self.attending = None
        pending = self._pending.pop(role, None)
        if pending is None:
            return out
        site, plan = pending
        return self.merge.split_out(self.run.current, site, out, plan)

    def merge_line(self, records) -> str:
        """The report's merge line, per sample over the run's records: tome, the image tokens merged away of those
        the merged submodules would have run on; todo, the keys pooled away."""
        by_path = {s.path: s for s in self.sites.values()}
        todo = self.merge.config.method == "todo"
        merged = total = calls = 0
        for record in records:
            if not record.reductions:
                continue
            calls += 1
            for path, reduction in record.reductions.items():
                n = math.prod(level_grid(record.ctx.layout.grid, by_path[path].level))
                merged += n - (reduction.keys if todo else reduction.query)
                total += n
        if not calls:
            return "merge: no tokens merged in this run"
        what = "keys/values pooled away" if todo else "image tokens merged away"
        return (f"merge: {merged} of {total} {what} (per sample, summed over the merged attention submodules of "
                f"{calls} of {len(records)} calls)")


    def attention(self, func, args: tuple, kwargs: dict):
        """One attention call of the run (ComfyUI's optimized_attention_override): the current site's
        self-attention under its sparse pattern, or `func` (ComfyUI's attention, or the override before ours)."""
        site = self._site_of(kwargs.get("transformer_options") or {})
        if site is None:
            return func(*args, **kwargs)
        q, k, v, heads = (list(args) + [kwargs.get(n) for n in ("q", "k", "v", "heads")][len(args):])[:4]
        if kwargs.get("skip_reshape", False):
            b, _, n, d = q.shape
            q4, k4, v4 = q, k, v
        else:
            b, n, width = q.shape
            d = width // heads
            q4, k4, v4 = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = self.sparse.attend(site, self.run.current, q4, k4, v4, kwargs.get("mask"), None)
        if out is None:  # a dense step, or a pattern listing every block: ComfyUI's own attention, bit-identical
            return func(*args, **kwargs)
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(b, -1, heads * d)

    def _site_of(self, to: dict):
        """The sparse site whose self-attention this call is, consumed (a site has one such call per forward)."""
        if self.sparse is None or self.run.current is None:
            return None
        if self.run.adapter.name == "comfy-flux":
            return self.sparse_sites.get((to.get("block_type"), to.get("block_index")))
        site, self.attending = self.attending, None
        return site


    def density_line(self, records) -> str:
        """The report's sparse line: the attention density that ran (1.0: a site ran dense), per call."""
        densities = [r.density for rec in records for r in rec.reductions.values()]
        calls = sum(bool(rec.reductions) for rec in records)
        if not densities:
            return "sparse: no attention ran sparse in this run (every call dense)"
        return (f"sparse: {self.sparse.config.pattern}, mean attention density {sum(densities) / len(densities):.3f} "
                f"over {len(self.sparse_sites)} self-attention sites, {calls} of {len(records)} calls")


def attention_override(before):
    """ComfyUI's optimized_attention_override: (func, *args, **kwargs) -> the attention output. `before`: the
    override another node had set (our dense calls go through it), or None."""

    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        run = to.get(RUN_KEY)
        tokens = None if run is None else run.tokens
        dense = func if before is None else partial(before, func)
        return dense(*args, **kwargs) if tokens is None else tokens.attention(dense, args, kwargs)

    override.__fastdiff_before__ = before
    return override


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


def install(clone, attention: bool = False) -> None:
    """The four patches on `clone` (once: a clone of a fastdiff clone has them already), and with `attention`
    the attention override (chained to one another node set); each passes through in a run that does nothing
    there."""
    to = clone.model_options["transformer_options"]
    current = to.get("optimized_attention_override")
    if attention and not hasattr(current, "__fastdiff_before__"):
        to["optimized_attention_override"] = attention_override(current)
    patches = to.get("patches", {})
    for role, (before, after) in PATCHES.items():
        if not any(getattr(p, "__fastdiff__", None) == role for p in patches.get(before, ())):
            clone.set_model_patch(before_patch(role), before)
            clone.set_model_patch(after_patch(role), after)
