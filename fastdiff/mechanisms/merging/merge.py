"""Token merging inside blocks: ToMe-SD merge/unmerge or ToDo key/value pooling around token submodules.

Which submodules: the family's `FamilySpec.attention` data (`mechanisms/sites.py`), filtered by `targets`, the UNet level
rule (`max_downsample`) and the depth rule. Each one's forward is wrapped with a named hook — no block forward
is copied:

- tome: the image tokens of `hidden_states` are merged before the submodule and its output unmerged after it.
  Text tokens are never merged: joint attention gets the text in `encoder_hidden_states` untouched (only the
  image output, `out[0]`, is unmerged); where the block concatenated [text; image] first, only the image part
  is merged. RoPE is gathered with the same indices as the tokens (a merged token keeps its destination's
  position), and so is the image part of a key mask. With `proportional`, self-attention over the merged tokens
  also gets log(size) of each merged key as an additive float `attention_mask` (ToMe's proportional attention),
  where its processor is known to add such a mask to the logits (`MASK_PROCESSORS`); refused elsewhere.
- todo: self-attention gets the image tokens pooled factor×factor as its key/value input; every query stays,
  nothing is unmerged. Fused q/k/v projections (`fuse_qkv_projections()`) cannot take a separate key input: they
  are refused at apply, and, when fused after it, at the next denoiser call before any block runs.

One matching per (denoiser call, step, transformer block) — with `share: level`, per token grid, i.e. per UNet
level — is computed at the first merged submodule it covers, from the input of the transformer block holding it (a
light hook on each such block keeps a reference), and shared by the other submodules it covers in that call (the host's
per-call state). Merging attaches inside caching: a block the cache stands in
for never calls its submodules, so it pays nothing. Every submodule that ran on fewer tokens is recorded on the
call (`CallRecord.reductions`), which `summary()` prices with the cost model. Per-call state is the host's, per call
slot and token grid (`MergeState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ... import parallel
from ...adapters.base import RopeSpec, TokenModule, specs
from ...context import level_grid
from ...cost.model import Reduction
from ...errors import FastDiffError, UnsupportedModelError
from ...hooks import Args
from ...parallel import PER_TOKEN
from .. import sites as _sites
from ..base import Mechanism
from . import todo as _todo
from . import tome as _tome


@dataclass
class MergePlan:
    """How one token grid is reduced in one call: shared by the submodules on that grid."""

    grid: tuple[int, int, int]
    n: int  # image tokens on the grid
    query: int  # image tokens the submodules' queries (and MLPs) run on
    keys: int  # image tokens keys/values come from
    extra: float = 0.0  # FLOPs of computing the matching, charged to the first submodule that records
    merge: Callable | None = None
    unmerge: Callable | None = None
    kept: torch.Tensor | None = None  # (B, query) original index each merged row stands for (tome)
    bias: torch.Tensor | None = None  # (B, 1, query) log sizes: proportional attention's key bias (tome)


@dataclass
class MergeState:
    """Per call slot and token grid (the host's): this call's plans, the metric, the last step's metric."""

    record: Any = None  # the CallRecord the plans belong to
    plans: dict[Any, MergePlan | None] = field(default_factory=dict)  # share key -> plan
    block_input: torch.Tensor | None = None  # hidden_states of the transformer block running now (the metric)
    previous: dict = field(default_factory=dict)  # share key -> last step's metric (keep_changed), kept across calls


# Attention processors that pass a (B, 1, keys) float `attention_mask` through `Attention.prepare_attention_mask`
# (repeated per head) and add it to the logits (SDPA's float `attn_mask` / `baddbmm`): proportional attention's way in.
# FusedAttnProcessor2_0 (fuse_qkv_projections) treats the mask exactly as AttnProcessor2_0 does.
MASK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")


def proportional_ok(tm: TokenModule) -> bool:
    """A self-attention whose keys are its (merged) image tokens only, with no RoPE or key mask of its own: a
    diffusers `Attention` of a BasicTransformerBlock (its processor is checked on the instance)."""
    return tm.role == "self_attention" and tm.text == "none" and tm.rope is None and tm.mask_arg is None


class TokenMerge(Mechanism):
    name = "merge"

    # -- which submodules ---------------------------------------------------------------------------
    def sites(self, adapter) -> list[_sites.Site]:
        """The submodules this config merges around, in execution order (pure: nothing is modified)."""
        c = self.config
        found = _sites.find(adapter)
        if c.method == "todo":
            chosen = [s for s in found if s.spec.role == "self_attention" and s.spec.kv_arg]
        else:
            chosen = [s for s in found if s.spec.role in c.targets]
        if not chosen:
            return []
        finest = min(s.level for s in found)  # the finest level that has attention at all
        chosen = [s for s in chosen if 2 ** (s.level - finest) <= c.max_downsample]
        owners = list(dict.fromkeys(s.owner for s in chosen))  # transformer blocks, in execution order
        if c.depth != "all":
            k = max(1, round(c.depth_fraction * len(owners)))
            keep = set(owners[:k] if c.depth == "first" else owners[-k:])
            chosen = [s for s in chosen if s.owner in keep]
        return chosen

    def _ratio(self, step: int, num_steps: int | None) -> float:
        """Merge ratio at this step; 0 where the schedule leaves it unmerged (todo: > 0 means active)."""
        c = self.config
        ratio = c.ratio if c.method == "tome" else 1.0
        if num_steps is None:  # a bare denoiser without a scheduler: the schedule cannot be read
            return ratio
        first, last = round(c.start * num_steps), round(c.stop * num_steps)
        if not first <= step < last:
            return 0.0
        if c.ratio_end is None or c.method != "tome":
            return ratio
        return c.ratio + (c.ratio_end - c.ratio) * (step - first) / max(1, last - 1 - first)

    # -- Mechanism ----------------------------------------------------------------------------------
    def validate(self, adapter) -> None:
        c, model, family = self.config, type(adapter.denoiser).__name__, adapter.name
        parallel.refuse(adapter.denoiser, PER_TOKEN[self.name])
        tome_ok = sorted(s.name for s in specs() if s.attention and s.layout is not None)
        todo_ok = sorted(s.name for s in specs() if any(m.kv_arg for site in s.attention for m in site.modules))
        if adapter.spec.layout is None or not adapter.spec.attention:
            raise UnsupportedModelError(
                f"{model}: token merging needs the token grid and the attention/MLP submodules of its blocks, which "
                f"the '{family}' adapter does not describe. Supported families: {tome_ok} (method 'todo': {todo_ok}).")
        chosen = self.sites(adapter)
        if chosen and c.proportional:
            self._validate_proportional(adapter, chosen)
        if c.method == "todo" and (fused := [s for s in chosen if _sites.fused_qkv(s.module)]):
            raise UnsupportedModelError(self._fused_message(adapter, fused))
        if chosen:
            return
        if c.method == "todo":
            raise UnsupportedModelError(
                f"{model}: merge method 'todo' pools the keys/values of self-attention, and the '{family}' family's "
                "self-attention cannot take them apart from its queries (joint text-image projection or RoPE on the "
                f"keys would make pooled keys wrong). ToDo supports: {todo_ok}; use method 'tome' (supports: {tome_ok}).")
        roles = sorted({s.spec.role for s in _sites.find(adapter)})
        raise UnsupportedModelError(
            f"{model}: merge targets {c.targets} with depth '{c.depth}' select no submodule of the '{family}' family "
            f"(it has: {roles}). Pick targets among those.")

    @staticmethod
    def _fused_message(adapter, fused) -> str:
        model = type(adapter.denoiser).__name__
        processor = type(getattr(fused[0].module, "processor", None)).__name__
        return (f"{model}: merge method 'todo' gives self-attention pooled keys/values apart from its queries, but "
                f"{len(fused)} of its self-attention modules (e.g. {fused[0].path}, processor {processor}) project "
                "queries, keys and values together (fuse_qkv_projections()). Call unfuse_qkv_projections() on the "
                "pipeline or the denoiser first, or use merge method 'tome' or sparse attention, which work with "
                "fused projections.")

    def _validate_proportional(self, adapter, chosen) -> None:
        model, family = type(adapter.denoiser).__name__, adapter.name
        selfs = {s.name: [m for site in s.attention for m in site.modules if m.role == "self_attention"] for s in specs()}
        ok = sorted(name for name, ms in selfs.items() if ms and all(proportional_ok(m) for m in ms))
        for s in chosen:
            if s.spec.role != "self_attention":
                continue  # queries merged, keys not: nothing to weigh
            processor = type(getattr(s.module, "processor", None)).__name__
            if s.spec.text != "none":
                why = "its keys include the text tokens (joint attention)"
            elif processor not in MASK_PROCESSORS:
                why = (f"its attention processor {processor} is not one known to add a (B, 1, keys) float "
                       f"attention_mask to the logits ({', '.join(MASK_PROCESSORS)})")
            elif not proportional_ok(s.spec):
                why = "it takes RoPE or a key mask of its own, which the bias would have to be combined with"
            else:
                continue
            raise UnsupportedModelError(
                f"{model}: merge option 'proportional' passes log(size) of the merged keys as an additive attention "
                f"mask to self-attention, which {s.path} ('{family}' family) cannot take: {why}. proportional "
                f"supports: {ok} with diffusers' default attention processors; drop 'proportional' here.")

    def estimate_cost(self, table):
        """Exact for every schedule: the token counts depend on the row's grid and step only."""
        chosen = self.sites(table.model.adapter)
        dense: dict = {}
        reduced: dict = {}
        flops = []
        for row in table.rows:
            ctx = row.ctx
            ratio = self._ratio(ctx.step, ctx.num_steps)
            if ratio <= 0:
                flops.append(row.flops)
                continue
            if ctx.layout not in dense:
                dense[ctx.layout] = table.model.block_flops(ctx.layout)
            key = (ctx.layout, ratio)
            if key not in reduced:
                reduced[key] = table.model.block_flops(ctx.layout, self.reductions(chosen, ctx.layout, ratio))
            per, full = reduced[key], dense[ctx.layout]
            flops.append([v * per[b] / full[b] if full[b] else v for b, v in enumerate(row.flops)])
        return table.with_flops(flops)

    def reductions(self, chosen, layout, ratio: float) -> dict[str, Reduction]:
        """Submodule path -> tokens it runs on at `ratio` on `layout` (what a call records), pure arithmetic."""
        c = self.config
        out, matched = {}, set()
        for s in chosen:
            grid = level_grid(layout.grid, s.level)
            n = math.prod(grid)
            if c.method == "todo":
                out[s.path] = Reduction(n, math.prod(_todo.pooled_grid(grid, c.factor)))
                continue
            r = _tome.merged_count(grid, ratio, c.sx, c.sy)
            if r == 0:
                continue
            extra = 0.0
            if self._share_key(s, grid) not in matched:  # the similarity matmul, once per matching
                matched.add(self._share_key(s, grid))
                n_src = _tome.max_merged(grid, c.sx, c.sy)
                extra = 2.0 * n_src * (n - n_src) * _sites.width(s.module)
            out[s.path] = Reduction(n - r, n - r, extra)
        return out

    def attach(self, adapter, host):
        self.host = host
        self.adapter = adapter
        chosen = self.sites(adapter)
        if self.config.method == "tome":  # the matching's metric is the block's input
            owners = {s.owner: s for s in chosen}
            for owner, site in owners.items():
                block = adapter.denoiser.get_submodule(owner)
                host.wrap(block, f"fastdiff.merge.{owner}", self._input_hook(block))
        for site in chosen:
            hook = self._todo_hook(site) if self.config.method == "todo" else self._tome_hook(site)
            host.wrap(site.module, f"fastdiff.merge.{site.path}", hook)
        if self.config.method == "todo":
            host.wrap(adapter.denoiser, "fastdiff.merge.fused-qkv", self._fused_guard(chosen))

    def _fused_guard(self, chosen):
        """Projections fused after apply: refused when the denoiser is called, before any block runs (the model
        is left as it is; unfusing makes the next call work)."""

        def guard(call, inner, args, kwargs):
            if fused := [s for s in chosen if _sites.fused_qkv(s.module)]:
                raise FastDiffError(self._fused_message(self.adapter, fused))
            return inner(*args, **kwargs)

        return guard

    def new_state(self) -> MergeState:
        return MergeState()

    def report(self, records) -> dict:
        merged = [r for r in records if r.reductions]
        return {"method": self.config.method, "calls_merged": len(merged), "calls": len(records),
                "submodules": max((len(r.reductions) for r in merged), default=0)}

    # -- per call -----------------------------------------------------------------------------------
    def _state(self, call) -> MergeState | None:
        """The state of the denoiser call in progress (plans fresh for each call); None outside a call."""
        if call is None:  # called outside a denoiser call (e.g. by the user): leave it alone
            return None
        st: MergeState = self.host.state(call, self)
        if st.record is not call.record:
            st.record, st.plans, st.block_input = call.record, {}, None
        return st

    def _input_hook(self, block):
        args_of = Args(block)

        @torch.compiler.disable
        def remember(call, args, kwargs):
            st = self._state(call)
            if st is not None:
                st.block_input = args_of.get(args, kwargs, "hidden_states")  # a reference, no copy

        def hook(call, inner, args, kwargs):
            remember(call, args, kwargs)
            return inner(*args, **kwargs)

        return hook

    @torch.compiler.disable
    def _plan(self, call, site, image: torch.Tensor) -> MergePlan | None:
        """This call's plan for the site's token grid (computed by the first submodule on it); None: unmerged."""
        st = self._state(call)
        if st is None:
            return None
        rec = st.record
        ctx = call.ctx
        grid = level_grid(ctx.layout.grid, site.level)
        key = self._share_key(site, grid)
        if key in st.plans:
            return st.plans[key]
        n = math.prod(grid)
        if image.shape[1] != n:
            raise FastDiffError(
                f"token merging: {site.path} got {image.shape[1]} image tokens, but the call's token grid at its level "
                f"is {grid} ({n} tokens); the '{self.adapter.name}' adapter's layout does not describe this input")
        c = self.config
        ratio = self._ratio(ctx.step, ctx.num_steps)
        plan = None
        if ratio > 0 and c.method == "todo":
            plan = MergePlan(grid, n, n, math.prod(_todo.pooled_grid(grid, c.factor)))
        elif ratio > 0:
            r = _tome.merged_count(grid, ratio, c.sx, c.sy)
            if r > 0:
                gen = torch.Generator().manual_seed(_seed(c.seed, ctx.step, grid)) if c.random else None
                # The block's input (the residual stream), as tomesd: on the trained ref-digits DiT it matched better
                # than the submodule's normalised/modulated input, raw or centred (eval/results/merge-ref-digits).
                metric = st.block_input
                if not isinstance(metric, torch.Tensor) or metric.shape[:2] != image.shape[:2]:
                    metric = image
                m = _tome.match(metric, grid, r, c.sx, c.sy, gen, self._protect(st, key, metric))
                merge, unmerge = _tome.merge_pair(m)
                n_src = _tome.max_merged(grid, c.sx, c.sy)
                extra = 2.0 * n_src * (n - n_src) * image.shape[-1]
                bias = _tome.proportional_bias(m).to(image.dtype) if c.proportional else None
                plan = MergePlan(grid, n, n - m.r, n - m.r, extra, merge, unmerge, m.kept, bias)
        st.plans[key] = plan
        if plan is not None:
            label = "kv " if c.method == "todo" else ""
            counts = dict.fromkeys(f"{p.n}>{p.keys if c.method == 'todo' else p.query}"
                                   for p in st.plans.values() if p is not None)  # one entry per distinct reduction
            rec.decisions[self.name] = label + ",".join(counts)
        return plan

    def _share_key(self, site, grid):
        """Submodules with the same key share one matching in a call: the transformer block, or the token grid."""
        return grid if self.config.share == "level" or self.config.method == "todo" else (grid, site.owner)

    def _protect(self, st: MergeState, key, metric: torch.Tensor) -> torch.Tensor | None:
        """keep_changed: the tokens whose metric moved most since this call slot's previous step are not merged."""
        k = int(self.config.keep_changed * metric.shape[1])
        prev = st.previous.get(key)
        st.previous[key] = metric
        if k == 0 or prev is None or prev.shape != metric.shape:
            return None
        change = (metric - prev).float().norm(dim=-1)  # (B, N)
        top = change.topk(k, dim=1).indices
        return torch.zeros_like(change, dtype=torch.bool).scatter_(1, top, True)

    @torch.compiler.disable
    def _record(self, call, site, plan: MergePlan) -> None:
        call.record.reductions[site.path] = Reduction(plan.query, plan.keys, plan.extra)
        plan.extra = 0.0  # the matching is charged once per grid

    # -- the hooks split in two, for a host that reaches a submodule only through patches before and after it
    # (ComfyUI's attn1/attn2 patches) and so cannot hand over `inner`: the same plan, merge, record and unmerge
    # the hooks below run around the submodule.
    def attach_split(self, adapter, host) -> list[_sites.Site]:
        """Bind `host` (its per-call state) and return the submodules to merge around; the host then calls
        `split_in` before each and `split_out` after it. The block-input metric hook is not installed: the
        matching's metric is then the submodule's own image input (what ComfyUI's ToMe node matches on)."""
        self.host, self.adapter = host, adapter
        return self.sites(adapter)

    def split_in(self, call, site, image: torch.Tensor):
        """Before `site` runs on the (B, N, C) image tokens `image`: (its queries' input, its own keys' input, the
        plan to hand to `split_out`); a None plan: this call leaves the site unmerged (inputs returned as given).
        tome: both inputs are the merged tokens; todo: every query stays, the keys are the pooled tokens."""
        plan = self._plan(call, site, image)
        if plan is None:
            return image, image, None
        if self.config.method == "todo":
            return image, _todo.pool(image, plan.grid, self.config.factor), plan
        merged = plan.merge(image)
        return merged, merged, plan

    def split_out(self, call, site, out: torch.Tensor, plan: MergePlan | None) -> torch.Tensor:
        """After `site` ran under `plan`: the call records the tokens it ran on, and the output is unmerged."""
        if plan is None:
            return out
        self._record(call, site, plan)
        return out if self.config.method == "todo" else plan.unmerge(out)

    def _tome_hook(self, site):
        args_of = Args(site.module)
        spec = site.spec
        proportional = proportional_ok(spec)  # validate() refused proportional where a self-attention is not

        def merged(call, inner, args, kwargs):
            hidden = args_of.get(args, kwargs, "hidden_states")
            n_img = self._image_tokens(call, site, hidden)
            image = hidden if spec.text != "first" else hidden[:, hidden.shape[1] - n_img:]
            plan = self._plan(call, site, image)
            if plan is None:
                return inner(*args, **kwargs)
            n_text = hidden.shape[1] - n_img if spec.text == "first" else 0
            x = plan.merge(image)
            if n_text:
                x = torch.cat([hidden[:, :n_text], x], dim=1)
            args, kwargs = args_of.set(args, kwargs, "hidden_states", x)
            args, kwargs = self._shrink_mask(site, args_of, args, kwargs, plan)
            if plan.bias is not None and proportional and self._keys_are_queries(spec, args_of, args, kwargs):
                # the keys are the merged tokens: weigh each by the originals it stands for (an image mask given
                # to this self-attention was refused by _shrink_mask, so nothing is overwritten)
                args, kwargs = args_of.set(args, kwargs, "attention_mask", plan.bias)
            rope = args_of.get(args, kwargs, spec.rope.arg) if spec.rope is not None else None
            batch = hidden.shape[0]
            if rope is not None and spec.rope.batch_dim is None and batch > 1:
                out = _per_row(inner, args_of, args, kwargs, batch, spec.rope, rope, plan)
            else:
                if rope is not None:
                    args, kwargs = args_of.set(args, kwargs, spec.rope.arg, _gather_rope(rope, spec.rope, plan))
                out = inner(*args, **kwargs)
            self._record(call, site, plan)
            return self._unmerge(site, out, plan, n_text)

        return merged

    def _todo_hook(self, site):
        args_of = Args(site.module)
        kv_arg = site.spec.kv_arg

        def pooled(call, inner, args, kwargs):
            hidden = args_of.get(args, kwargs, "hidden_states")
            if args_of.get(args, kwargs, kv_arg) is not None:  # attending to other tokens here: not self-attention
                return inner(*args, **kwargs)
            plan = self._plan(call, site, hidden)
            if plan is None:
                return inner(*args, **kwargs)
            self._no_image_mask(site, args_of, args, kwargs)
            args, kwargs = args_of.set(args, kwargs, kv_arg, _todo.pool(hidden, plan.grid, self.config.factor))
            out = inner(*args, **kwargs)
            self._record(call, site, plan)
            return out

        return pooled

    # -- pieces -------------------------------------------------------------------------------------
    def _image_tokens(self, call, site, hidden: torch.Tensor) -> int:
        if call is None or call.ctx.layout is None:
            return hidden.shape[1]
        return math.prod(level_grid(call.ctx.layout.grid, site.level))

    def _shrink_mask(self, site, args_of, args, kwargs, plan: MergePlan):
        """A key mask over [image; text] loses the merged image keys; a mask over image keys nothing knows
        how to shrink is refused rather than silently misapplied."""
        spec = site.spec
        if spec.mask_arg is None:
            if spec.role == "self_attention":
                self._no_image_mask(site, args_of, args, kwargs)
            return args, kwargs
        mask = args_of.get(args, kwargs, spec.mask_arg)
        if mask is None:
            return args, kwargs
        image, rest = mask[..., : plan.n], mask[..., plan.n:]
        b, n_out = plan.kept.shape
        image = image.expand(b, *image.shape[1:])
        index = plan.kept.view(b, *([1] * (image.ndim - 2)), n_out).expand(*image.shape[:-1], n_out)
        rest = rest.expand(b, *rest.shape[1:])
        return args_of.set(args, kwargs, spec.mask_arg, torch.cat([image.gather(-1, index), rest], dim=-1))

    @staticmethod
    def _keys_are_queries(spec: TokenModule, args_of, args, kwargs) -> bool:
        """No other key input was given (a BasicTransformerBlock with `only_cross_attention` passes the text)."""
        return spec.kv_arg is None or args_of.get(args, kwargs, spec.kv_arg) is None

    def _no_image_mask(self, site, args_of, args, kwargs) -> None:
        if args_of.get(args, kwargs, "attention_mask") is not None:
            raise FastDiffError(
                f"token merging: {site.path} was given an attention mask over its image tokens, which the "
                f"'{self.adapter.name}' adapter does not say how to shrink with them. Drop the mask or the merge section.")

    def _unmerge(self, site, out, plan: MergePlan, n_text: int):
        text = site.spec.text
        if text == "separate":
            if not isinstance(out, tuple) or len(out) != 2:
                raise FastDiffError(
                    f"token merging: {site.path} returned {type(out).__name__}"
                    f"{f' of {len(out)}' if isinstance(out, tuple) else ''}, not the (image, text) pair the "
                    f"'{self.adapter.name}' adapter describes (a custom attention processor, e.g. IP-Adapter?)")
            return (plan.unmerge(out[0]), out[1])
        if text == "first":
            return torch.cat([out[:, :n_text], plan.unmerge(out[:, n_text:])], dim=1)
        return plan.unmerge(out)


def _seed(seed: int, step: int, grid: tuple[int, int, int]) -> int:
    """One seed per (config seed, step, grid): the same destinations in every call of a step, any call order."""
    f, h, w = grid
    return (seed * 1_000_003 + step * 8_191 + (f * 131 + h) * 65_537 + w) % 2**63


def _gather_rope(rope, spec: RopeSpec, plan: MergePlan, row: int | None = None):
    """The (cos, sin) pair at the merged tokens' positions (their destinations'); text positions unchanged.

    `row`: only that batch row's positions (for rows run one at a time); else every row's, along the
    broadcast batch dimension the spec names.
    """
    kept = plan.kept if row is None else plan.kept[row: row + 1]
    return tuple(_gather_positions(t, spec, kept, plan.n) for t in rope)


def _gather_positions(t: torch.Tensor, spec: RopeSpec, kept: torch.Tensor, n: int) -> torch.Tensor:
    seq = spec.seq_dim
    offset = t.shape[seq] - n if spec.text == "first" else 0
    if offset < 0 or (spec.text == "none" and t.shape[seq] != n):
        raise FastDiffError(f"token merging: RoPE tensor of shape {tuple(t.shape)} does not cover the {n} image tokens")
    image = t.narrow(seq, offset, n)
    text = t.narrow(seq, 0, offset)
    if spec.batch_dim is None:
        gathered = image.index_select(seq, kept[0])
    else:
        b, n_out = kept.shape
        shape = list(image.shape)
        shape[spec.batch_dim] = b
        image = image.expand(shape)
        text = text.expand(shape[:seq] + [offset] + shape[seq + 1:])
        view = [1] * image.ndim
        view[spec.batch_dim], view[seq] = b, n_out
        shape[seq] = n_out
        gathered = image.gather(seq, kept.reshape(view).expand(shape))
    return torch.cat([text, gathered], dim=seq) if offset else gathered


def _per_row(inner, args_of, args, kwargs, batch: int, spec: RopeSpec, rope, plan: MergePlan):
    """Run the submodule one batch row at a time: RoPE tensors without a batch dimension cannot carry per-row
    positions, and every row has its own merge."""
    outs = []
    for i in range(batch):
        a = tuple(_row(v, i, batch) for v in args)
        k = {key: _row(v, i, batch) for key, v in kwargs.items()}
        a, k = args_of.set(a, k, spec.arg, _gather_rope(rope, spec, plan, row=i))
        outs.append(inner(*a, **k))
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts, dim=0) for parts in zip(*outs))
    return torch.cat(outs, dim=0)


def _row(value, i: int, batch: int):
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[i: i + 1]
    return value
