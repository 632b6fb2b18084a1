"""Block-sparse self-attention: each chosen attention module computes only the (query block, key block) pairs
its pattern lists.

Which modules: the self-attention submodules of the family's `FamilySpec.attention` data (the sites token
merging uses), minus `dense_blocks`. Each one's forward is wrapped with a named hook that routes the SDPA calls
made inside it (`fastdiff.attention.route`) to `_attend`, which:

1. checks the call is the site's self-attention over [image; text] (text before or after, as the adapter says);
2. builds the geometry (tile order, block boxes) of the call's token grid at the site's level, once per layout;
3. takes the pattern: a static one (window, criss-cross) once per geometry, or a predicted one (top-k / top-p of
   pooled q·k scores) once per (call slot, token grid, site) and reused for `refresh` steps (AdaSpa: patterns are stable
   across steps) — per batch row and head;
4. permutes q, k, v into tile order, calls `attention.dispatch`, and puts the output back in sequence order.

Dense steps (`start`), dense blocks, and a pattern that lists every block — static, or predicted (a grid of one
block, top-k with k of all blocks, top-p whose scores keep them all) — run the model's own SDPA untouched,
bit-identical to no fastdiff. Each call through `_attend` records its density on the call (`CallRecord.reductions`;
1.0 where it ran dense), which `summary()` prices with the cost model and reports per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import parallel
from ...adapters.base import specs
from ...attention import dispatch, route
from ...context import level_grid
from ...cost.model import Reduction
from ...errors import ConfigError, FastDiffError, UnsupportedModelError
from ...parallel import PER_TOKEN
from .. import sites as _sites
from ..base import Mechanism
from . import patterns as _patterns


@dataclass
class Predicted:
    sparse: dispatch.BlockSparse | None  # None: the prediction lists every block (the site runs dense)
    density: float
    step: int
    rows: int  # batch rows it was predicted for (1: valid for any batch)


@dataclass
class SparseState:
    """Per call slot and token grid (the host's): a prediction is reused only on the grid it was made for."""

    predicted: dict[str, Predicted] = field(default_factory=dict)  # site path -> last prediction (this call slot)


class SparseAttention(Mechanism):
    name = "sparse"

    def __init__(self, config: Any):
        super().__init__(config)
        self._static: dict[tuple, tuple[dispatch.BlockSparse, float]] = {}  # pure in (geometry, heads): no run state
        self._routed = False

    # -- which modules ------------------------------------------------------------------------------
    def sites(self, adapter) -> list[_sites.Site]:
        dense = set(self.config.dense_blocks)
        return [s for s in _sites.find(adapter) if s.spec.role == "self_attention" and s.block not in dense]

    def validate(self, adapter) -> None:
        model, family = type(adapter.denoiser).__name__, adapter.name
        parallel.refuse(adapter.denoiser, PER_TOKEN[self.name])  # window/crisscross too: unverified on a shard
        ok = sorted(s.name for s in specs() if s.layout is not None and any(
            m.role == "self_attention" for site in s.attention for m in site.modules))
        if adapter.spec.layout is None or not adapter.spec.attention:
            raise UnsupportedModelError(
                f"{model}: sparse attention needs the token grid and the self-attention modules of its blocks, which "
                f"the '{family}' adapter does not describe. Supported families: {ok}")
        n_blocks = len(adapter.blocks)
        missing = sorted(b for b in set(self.config.dense_blocks) if b >= n_blocks)
        if missing:  # a typo'd index would otherwise leave the block sparse without a word
            raise ConfigError(f"{model}: sparse.dense_blocks {missing}: no such block (it has {n_blocks}, "
                              f"indices 0..{n_blocks - 1})")
        heads = [getattr(s.module, "heads", None) for s in self.sites(adapter)]
        fewest = min((h for h in heads if isinstance(h, int)), default=None)
        if self.config.dense_heads and fewest is not None and max(self.config.dense_heads) >= fewest:
            raise ConfigError(f"{model}: sparse.dense_heads {self.config.dense_heads}: its sparse self-attention "
                              f"modules have {fewest} heads (indices 0..{fewest - 1})")
        if not self.sites(adapter):
            raise UnsupportedModelError(
                f"{model}: sparse.dense_blocks {self.config.dense_blocks} leaves no self-attention of the "
                f"'{family}' family sparse")

    # -- Mechanism ----------------------------------------------------------------------------------
    def attach(self, adapter, host):
        self.host, self.adapter = host, adapter
        for site in self.sites(adapter):
            host.wrap(site.module, f"fastdiff.sparse.{site.path}", self._hook(site))
        route.install(self)  # last: nothing below can fail, so a failed attach never leaves SDPA routed
        self._routed = True

    def attach_split(self, adapter, host) -> list[_sites.Site]:
        """For a host that is handed each attention call itself (ComfyUI's `optimized_attention_override`): bind
        `host` (its per-call state) and return the sites; the host calls `attend` for a site's attention call.
        Nothing is wrapped or routed."""
        self.host, self.adapter = host, adapter
        return self.sites(adapter)

    def attend(self, site, call, q, k, v, mask=None, scale=None) -> torch.Tensor | None:
        """`site`'s attention of (B, H, N, D) q, k, v in `call`, under its pattern (what the routed SDPA call
        gets inside a hooked module); None: this call runs it dense (a dense step, or a pattern listing every
        block), with the caller's own attention."""
        if call is None or not self._active(call.ctx.step, call.ctx.num_steps):
            return None
        return self._attend(site, call, q, k, v, mask, scale)

    def detach(self) -> None:
        if self._routed:
            route.uninstall(self)
            self._routed = False
        super().detach()

    def new_state(self) -> SparseState:
        return SparseState()

    def report(self, records) -> dict:
        per_site: dict[str, list[float]] = {}
        for rec in records:
            for path, red in rec.reductions.items():  # 1.0: the site ran dense (its pattern listed every block)
                per_site.setdefault(path, []).append(red.density)
        return {"pattern": self.config.pattern,
                "density": {p: round(sum(v) / len(v), 4) for p, v in per_site.items()}}

    def estimate_cost(self, table):
        """Static patterns: exact (the density is a function of the grid). Predicted ones: top-k's listed blocks
        (exact count), top-p at density 1 (unknown before the run: conservative; summary() reports it measured).
        Each row is priced on its own grid, from its own step."""
        adapter = table.model.adapter
        chosen = self.sites(adapter)
        per: dict = {}
        flops = []
        for row in table.rows:
            ctx = row.ctx
            if not self._active(ctx.step, ctx.num_steps):
                flops.append(row.flops)
                continue
            if ctx.layout not in per:
                per[ctx.layout] = (table.model.block_flops(ctx.layout),
                                   table.model.block_flops(ctx.layout, self.reductions(chosen, ctx.layout, adapter)))
            dense, sparse = per[ctx.layout]
            flops.append([v * sparse[b] / dense[b] if dense[b] else v for b, v in enumerate(row.flops)])
        return table.with_flops(flops)

    def reductions(self, chosen, layout, adapter) -> dict[str, Reduction]:
        out = {}
        for s in chosen:
            geom = self._geometry(s, level_grid(layout.grid, s.level), self._text_tokens(s, layout), adapter)
            d = self._expected_density(geom, getattr(s.module, "heads", 1))
            if d < 1:
                n = math.prod(geom.grid)
                out[s.path] = Reduction(n, n, density=d)
        return out

    # -- per call -----------------------------------------------------------------------------------
    def _active(self, step: int, num_steps: int | None) -> bool:
        return num_steps is None or step >= round(self.config.start * num_steps)

    def _hook(self, site):
        def hook(call, inner, args, kwargs):
            if call is None or not self._active(call.ctx.step, call.ctx.num_steps):
                return inner(*args, **kwargs)
            seen = []

            def handler(q, k, v, mask, scale):
                seen.append(True)
                return self._attend(site, call, q, k, v, mask, scale)

            with route.handling(handler):
                out = inner(*args, **kwargs)
            if not seen:
                raise FastDiffError(
                    f"sparse attention: {site.path} ({type(site.module).__name__}) did not call torch's "
                    "scaled_dot_product_attention, so its attention cannot be made sparse. Its processor or the "
                    "diffusers attention backend computes attention another way (flash/sage/xformers backend, a custom "
                    "processor?); use the native/SDPA attention backend with sparse attention")
            return out

        return hook

    @torch.compiler.disable
    def _attend(self, site, call, q, k, v, mask, scale):
        c = self.config
        if q.ndim != 4 or k.shape[2] != q.shape[2]:
            raise FastDiffError(
                f"sparse attention: {site.path} called attention with query {tuple(q.shape)} and key {tuple(k.shape)}; "
                "it expects self-attention (batch, heads, tokens, dim) with as many keys as queries")
        grid = level_grid(call.ctx.layout.grid, site.level)
        n_img = math.prod(grid)
        n_text = q.shape[2] - n_img
        if n_text < 0 or (n_text and site.spec.text == "none"):
            raise FastDiffError(
                f"sparse attention: {site.path} attends over {q.shape[2]} tokens, but the call's token grid at its "
                f"level is {grid} ({n_img} tokens); the '{self.adapter.name}' adapter's layout does not describe it")
        key_mask = _key_mask(mask, q.shape[0], q.shape[2], site.path)
        geom = self._geometry(site, grid, n_text, self.adapter)
        heads = q.shape[1]
        if any(h >= heads for h in c.dense_heads):
            raise FastDiffError(f"sparse.dense_heads {c.dense_heads}: {site.path} has only {heads} heads")
        if c.pattern in ("topk", "topp"):
            sparse, dens = self._predicted(site, call, geom, q, k, scale)
        else:
            sparse, dens = self._static_pattern(geom, heads, q.device)
        self._record(site, call.record, n_img, dens)
        if sparse is None:  # every block listed: the model's own dense attention, bit-identical
            return None
        order, inverse = geom.order, geom.inverse
        if order is not None:
            order, inverse = order.to(q.device), inverse.to(q.device)
            q, k, v = (t.index_select(2, order) for t in (q, k, v))
            key_mask = None if key_mask is None else key_mask.index_select(1, order)
        out = dispatch.attention(q, k, v, sparse, scale=scale, key_mask=key_mask, backend=c.backend)
        if inverse is not None:
            out = out.index_select(2, inverse)
        return out

    def _record(self, site, rec, n_img: int, dens: float) -> None:
        """The site's density on the call (1.0 where its pattern listed every block and it ran dense), and the
        call's mean density over the sites that reached `_attend` so far as its decision."""
        prev = rec.reductions.get(site.path)
        # A module may call attention more than once per forward (none of the supported families does); keep the
        # densest, so the report never overstates the savings.
        if prev is None or prev.density < dens:
            rec.reductions[site.path] = Reduction(n_img, n_img, density=dens)
        seen = [r.density for r in rec.reductions.values()]  # only sparse records them: merging is refused beside it
        rec.decisions[self.name] = f"{self.config.pattern} d{sum(seen) / len(seen):.3f}"

    def _geometry(self, site, grid, n_text, adapter) -> _patterns.Geometry:
        c = self.config
        tile = tuple(c.tile) if c.tile else _patterns.default_tile(grid, c.block)
        text_first = site.spec.text == "first" or (site.spec.text == "separate" and
                                                  adapter.spec.text_position == "first")
        return _patterns.geometry(grid, n_text, text_first, tile, c.block)

    def _text_tokens(self, site, layout) -> int:
        return 0 if site.spec.text == "none" else layout.text_tokens

    def _static_mask(self, geom) -> torch.Tensor:
        c = self.config
        window = tuple(c.window)
        if c.pattern == "crisscross":
            return _patterns.crisscross(geom, window)
        if c.pattern == "window":
            return _patterns.window(geom, window)
        return _patterns.window(geom, window) if c.window_base else _patterns.keep(geom)  # predicted patterns' base

    def _expected_density(self, geom, heads: int) -> float:
        c = self.config
        if c.pattern in ("window", "crisscross"):
            mask = self._static_mask(geom)
        elif c.pattern == "topk":
            # a row lists its base blocks and predicted ones up to k in all: count the first free blocks instead
            mask = self._static_mask(geom)
            extra = (self._top_k(geom) - mask.sum(-1)).clamp(min=0)
            rank = (~mask).cumsum(-1)
            mask = mask | (~mask & (rank <= extra[:, None]))
        else:
            return 1.0
        return _patterns.density(geom, self._with_dense_heads(mask[None, None], heads))

    def _top_k(self, geom) -> int:
        return max(1, math.ceil(self.config.density * geom.blocks))

    def _with_dense_heads(self, mask: torch.Tensor, heads: int | None) -> torch.Tensor:
        """(Bi, 1|H, Q, K) mask with the configured dense heads listing every block."""
        if not self.config.dense_heads:
            return mask
        mask = mask.expand(mask.shape[0], heads, *mask.shape[2:]).clone()
        mask[:, list(self.config.dense_heads)] = True
        return mask

    def _static_pattern(self, geom, heads: int, device):
        key = (geom, heads, str(device))
        if key not in self._static:
            mask = self._with_dense_heads(self._static_mask(geom)[None, None], heads)
            dens = _patterns.density(geom, mask)
            if bool(mask.all()):
                self._static[key] = (None, 1.0)
            else:
                index, count = dispatch.mask_to_index(mask, trim=True)
                self._static[key] = (dispatch.BlockSparse(index.to(device), count.to(device), geom.block), dens)
        return self._static[key]

    def _predicted(self, site, call, geom, q, k, scale):
        c = self.config
        st: SparseState = self.host.state(call, self)
        prev = st.predicted.get(site.path)
        step = call.ctx.step
        fresh = prev is None or (c.refresh and step - prev.step >= c.refresh) or prev.rows not in (1, q.shape[0])
        if not fresh:
            return prev.sparse, prev.density
        keep = self._static_mask(geom)
        top_k = self._top_k(geom) if c.pattern == "topk" else None
        if bool(keep.all()) or (top_k is not None and top_k >= geom.blocks):
            # every block is listed whatever the scores say (one block, text everywhere, k covers all): dense,
            # nothing to predict
            st.predicted[site.path] = Predicted(None, 1.0, step, 1)
            return None, 1.0
        order = geom.order
        qp, kp = (q, k) if order is None else (t.index_select(2, order.to(q.device)) for t in (q, k))
        keep = keep.to(q.device)[None, None]
        top_p = c.top_p if c.pattern == "topp" else None
        index, count, _ = dispatch.predict(qp, kp, geom.block, top_k=top_k, top_p=top_p, method=c.method,
                                           stride=c.stride, keep=keep, scale=scale)
        mask = dispatch.index_to_mask(index, count, geom.blocks)
        if c.dense_heads:
            mask = self._with_dense_heads(mask, q.shape[1])
            index, count = dispatch.mask_to_index(mask, trim=True)
        mask = mask.cpu()  # once per prediction: one device sync per refresh
        if bool(mask.all()):  # the scores kept every block (top-p near 1, k of all): dense attention, not sparse
            st.predicted[site.path] = Predicted(None, 1.0, step, index.shape[0])
            return None, 1.0
        sparse = dispatch.BlockSparse(index, count, geom.block)
        st.predicted[site.path] = Predicted(sparse, _patterns.density(geom, mask), step, index.shape[0])
        return sparse, st.predicted[site.path].density


def _key_mask(mask, batch: int, n: int, path: str) -> torch.Tensor | None:
    """An SDPA attn_mask that only masks keys (padding), as (batch, n) bool; None if it masks nothing."""
    if mask is None:
        return None
    if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[-1] == n:
        keys = mask[:, 0, 0, :]
    elif mask.ndim == 2 and mask.shape[-1] == n:
        keys = mask
    else:
        raise FastDiffError(
            f"sparse attention: {path} was given an attention mask of shape {tuple(mask.shape)}; only key-padding "
            f"masks (batch, 1, 1, {n}) can be combined with a sparse pattern")
    if keys.dtype != torch.bool:
        if not bool(((keys == 0) | torch.isneginf(keys)).all()):
            raise FastDiffError(f"sparse attention: {path} was given an additive attention mask with values other "
                                "than 0 and -inf (a bias); sparse patterns take key-padding masks only")
        keys = keys == 0
    if bool(keys.all()):
        return None
    return keys.expand(batch, n)
