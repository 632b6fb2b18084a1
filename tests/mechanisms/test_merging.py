"""Token merging: the pure ToMe/ToDo functions by hand (odd grids, exact round trips, seeded destinations),
the hooks on every family's tiny model (ratio 0 bit-identical, remove() exact, refusals untouched, batch rows
apart), ToDo as exact K/V pooling, RoPE gathered at the destinations' positions, proportional attention (exact
over merged duplicates, refused where attention cannot take the bias), merging under torch.compile, and the cost
model against FlopCounterMode at the reduced token counts, alone and composed with caching."""

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff import adapters
from fastdiff.adapters.base import RopeSpec
from fastdiff.context import TokenLayout
from fastdiff.cost.model import CostModel
from fastdiff.eval import tiny
from fastdiff.mechanisms import sites
from fastdiff.mechanisms.merging import merge as merge_mod
from fastdiff.mechanisms.merging import todo, tome

from ..adapters.facts import TODO
from ..adapters.test_families import _sample, _seeded, run

ALL_TARGETS = ["self_attention", "cross_attention", "mlp"]
TODO_FAMILIES = TODO  # self-attention with a separate key/value input and no RoPE (the adapters' kv_arg)
PROPORTIONAL_FAMILIES = TODO_FAMILIES  # self-attention over the image tokens only, through AttnProcessor2_0
SUPPORTED = re.escape(str(sorted({tiny.spec(f).name for f in TODO_FAMILIES})))  # adapter names in the refusals


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the pure functions -------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,sx,sy", [((1, 17, 23), 2, 2), ((3, 5, 7), 2, 2), ((1, 17, 23), 3, 2), ((2, 4, 4), 1, 2)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_matching_shapes_and_bookkeeping_on_odd_grids(grid, sx, sy, ratio):
    f, h, w = grid
    n = f * h * w
    metric = _randn(3, n, 8)
    r = tome.merged_count(grid, ratio, sx, sy)
    n_dst = f * (h // sy) * (w // sx)
    assert r == min(int(ratio * n), n - n_dst)
    m = tome.match(metric, grid, r, sx, sy, torch.Generator().manual_seed(1))
    assert m.r == r and m.kept.shape == (3, n - r) and m.slot.shape == (3, n) and m.src.shape == (3, r)
    for b in range(3):
        kept, src = set(m.kept[b].tolist()), set(m.src[b].tolist())
        assert len(kept) == n - r and not kept & src and kept | src == set(range(n))
        assert set(m.src_dst[b].tolist()) <= set(m.kept[b, n - r - n_dst:].tolist())  # sources join destinations
    assert torch.equal(m.sizes.sum(1), torch.full((3,), float(n)))
    assert torch.equal(m.kept.gather(1, m.slot.gather(1, m.kept)), m.kept)  # a kept token maps to its own row
    merge, unmerge = tome.merge_pair(m)
    x = _randn(3, n, 5, seed=2)
    assert merge(x).shape == (3, n - r, 5) and unmerge(merge(x)).shape == (3, n, 5)
    # each batch row is matched on its own: the batch equals its rows alone (same destination cells)
    for b in range(3):
        alone = tome.match(metric[b: b + 1], grid, r, sx, sy, torch.Generator().manual_seed(1))
        assert torch.equal(alone.kept[0], m.kept[b]) and torch.equal(alone.slot[0], m.slot[b])


def test_merge_by_mean_and_unmerge_copies_the_destination_back():
    grid, n = (1, 4, 6), 24
    m = tome.match(_randn(2, n, 4), grid, 9)
    merge, unmerge = tome.merge_pair(m)
    x = _randn(2, n, 3, seed=5)
    y = merge(x)
    for b in range(2):
        for row in range(n - m.r):
            members = (m.slot[b] == row).nonzero().flatten()
            torch.testing.assert_close(y[b, row], x[b, members].mean(0), rtol=1e-6, atol=1e-6)
            assert m.sizes[b, row] == len(members)
    assert torch.equal(unmerge(y), y.gather(1, m.slot.unsqueeze(-1).expand(-1, -1, 3)))


def test_merge_then_unmerge_returns_tokens_that_were_already_equal_exactly():
    grid = (1, 17, 23)
    m = tome.match(_randn(2, 391, 8), grid, tome.merged_count(grid, 0.6, 2, 2))
    merge, unmerge = tome.merge_pair(m)
    y = torch.rand(2, 391 - m.r, 7, generator=torch.Generator().manual_seed(3)) * 10 - 5
    x = unmerge(y)  # every merged group holds equal tokens
    assert torch.equal(merge(x), y)
    assert torch.equal(unmerge(merge(x)), x)


def test_nothing_to_merge_is_the_identity():
    x = _randn(2, 9, 4)
    for grid, r in [((1, 1, 9), 4), ((1, 3, 3), 0)]:  # no 2x2 cell fits a 1-row grid; r = 0
        merge, unmerge = tome.bipartite_soft_matching(x, grid, r)
        assert merge(x) is x and unmerge(x) is x


def test_destinations_fixed_or_seeded():
    grid = (2, 5, 7)
    fixed = tome.destinations(grid, 2, 2)
    assert fixed.tolist() == [f * 35 + y * 7 + x for f in range(2) for y in (0, 2) for x in (0, 2, 4)]
    a = tome.destinations(grid, 2, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a, tome.destinations(grid, 2, 2, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, tome.destinations(grid, 2, 2, torch.Generator().manual_seed(5)))
    cells = [(int(i) % 35 // 7 // 2, int(i) % 7 // 2, int(i) // 35) for i in a]
    assert len(set(cells)) == len(cells) == 12  # one per 2x2 cell of each frame, none in the odd last row/column


def test_proportional_bias_makes_attention_over_merged_duplicates_exact():
    # keys that are exact duplicates merged into one: with log(size) added to the logits, attention over the
    # merged keys equals attention over all of them
    grid, n = (1, 6, 6), 36
    m = tome.match(_randn(1, n, 4), grid, 12)
    merge, unmerge = tome.merge_pair(m)
    kv = unmerge(_randn(1, n - m.r, 8, seed=1))
    q = _randn(1, 5, 8, seed=2)
    full = F.scaled_dot_product_attention(q, kv, kv)
    merged = F.scaled_dot_product_attention(q, merge(kv), merge(kv), attn_mask=tome.proportional_bias(m))
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("processor", ["AttnProcessor2_0", "AttnProcessor"])
def test_proportional_attention_on_a_diffusers_attention_equals_attention_over_the_duplicates(processor):
    # a real diffusers Attention (2 heads, batch 2) on tokens that repeat in the matching's groups: attention over
    # the merged tokens, given log(size) as the additive attention_mask the mechanism passes, then unmerged, is
    # attention over every token; without the bias it is not (a merged key weighs as one token)
    from diffusers.models import attention_processor as ap

    attn = ap.Attention(query_dim=16, heads=2, dim_head=8, processor=getattr(ap, processor)())
    torch.manual_seed(0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grid = (1, 6, 7)  # an odd column outside the 2x2 cells
    m = tome.match(_randn(2, 42, 8), grid, tome.merged_count(grid, 0.6, 2, 2), generator=torch.Generator().manual_seed(2))
    assert m.sizes.max() > 2  # some destination holds several sources
    merge, unmerge = tome.merge_pair(m)
    x = unmerge(_randn(2, 42 - m.r, 16, seed=3))  # every merged group: equal tokens
    with torch.no_grad():
        full = attn(x)
        proportional = unmerge(attn(merge(x), attention_mask=tome.proportional_bias(m)))
        plain = unmerge(attn(merge(x)))
    torch.testing.assert_close(proportional, full, rtol=1e-5, atol=1e-6)
    assert (plain - full).abs().max() > 1e-3


def test_proportional_merging_of_equal_tokens_leaves_the_dit_output_unchanged():
    # end to end through the hooks: a DiT without position embeddings, fed a latent that is constant over each 2x2
    # cell of tokens, has equal tokens in every cell; merging them (into their own cell's destination: cosine 1)
    # with proportional attention changes nothing, without it the merged keys are under-weighted
    dit = tiny.build_denoiser("dit")
    dit.pos_embed.pos_embed.zero_()
    kw = {**tiny.denoiser_inputs("dit", batch_size=2), "hidden_states": _randn(2, 4, 2, 2).repeat_interleave(4, 2)
          .repeat_interleave(4, 3)}  # 8x8 latent, patch 2: 4x4 tokens, equal within each 2x2 token cell
    with torch.no_grad():
        base = dit(**kw).sample
        outs = {}
        for prop in (False, True):
            with fastdiff.accelerated(dit, merge={"ratio": 0.5, "proportional": prop}) as h:
                outs[prop] = dit(**kw).sample
                assert h.records[0].decisions["merge"] == "16>8"
    torch.testing.assert_close(outs[True], base, rtol=1e-4, atol=1e-5)
    assert (outs[False] - base).abs().max() > 1e-3


def test_proportional_is_refused_where_attention_cannot_take_the_bias(snapshot):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):  # e.g. a user's processor: whether it adds the mask is unknown
        pass

    pipe = tiny.build_pipeline("dit")
    pipe.transformer.transformer_blocks[1].attn1.set_processor(MyProcessor())
    before = snapshot(pipe.transformer, pipe.scheduler)
    with pytest.raises(fastdiff.UnsupportedModelError,
                       match=r"DiTTransformer2DModel: merge option 'proportional'.*blocks\.1\.attn1.*MyProcessor"):
        fastdiff.apply(pipe, merge={"proportional": True})
    assert snapshot(pipe.transformer, pipe.scheduler) == before and fastdiff.session_of(pipe) is None
    with fastdiff.accelerated(pipe, merge={"proportional": True, "depth": "first"}):  # block 0 only: fine
        run(pipe, "dit", steps=2)
    for bad, match in [({"method": "todo", "proportional": True}, "'tome' only"),
                       ({"targets": ["mlp"], "proportional": True}, "must include 'self_attention'")]:
        with pytest.raises(fastdiff.ConfigError, match=match):
            fastdiff.apply(pipe, merge=bad)
    assert fastdiff.load_config(merge={"proportional": True}).strify() == "merge[tome,r0.5,2x2,sa,prop]"


@pytest.mark.parametrize("grid,factor", [((1, 17, 23), 2), ((2, 6, 9), 3), ((1, 8, 8), 2)])
def test_todo_pools_each_cell_over_its_real_tokens(grid, factor):
    f, h, w = grid
    x = _randn(2, f * h * w, 3)
    out = todo.pool(x, grid, factor)
    _, hp, wp = todo.pooled_grid(grid, factor)
    assert out.shape == (2, f * hp * wp, 3)
    cells = x.view(2, f, h, w, 3)
    for fi in range(f):
        for i in range(hp):
            for j in range(wp):
                want = cells[:, fi, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].mean(dim=(1, 2))
                torch.testing.assert_close(out[:, (fi * hp + i) * wp + j], want, rtol=1e-6, atol=1e-6)


# -- every family end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_pipe(request):
    pipe = tiny.build_pipeline(request.param)
    return request.param, pipe, run(pipe, request.param, steps=4)


def test_every_family_merges_and_remove_is_exact(family_pipe, snapshot):
    family, pipe, base = family_pipe
    denoiser = pipe.components["unet" if "unet" in pipe.components else "transformer"]
    before = snapshot(denoiser, pipe.scheduler)
    with fastdiff.accelerated(pipe, merge={"ratio": 0.0, "targets": ALL_TARGETS}) as h:
        assert torch.equal(run(pipe, family, steps=4), base)  # ratio 0: bit-identical
        assert not any(r.reductions for r in h.records)
    if family in PROPORTIONAL_FAMILIES:
        with fastdiff.accelerated(pipe, merge={"ratio": 0.0, "proportional": True}):
            assert torch.equal(run(pipe, family, steps=4), base)  # nothing merged: no bias either, bit-identical
    proportional = {"ratio": 0.5, "targets": ALL_TARGETS, "proportional": True}
    for cfg in ({"ratio": 0.5}, {"ratio": 0.6, "targets": ALL_TARGETS, "random": False}, {"method": "todo"}, proportional):
        if cfg.get("method") == "todo" and family not in TODO_FAMILIES:
            with pytest.raises(fastdiff.UnsupportedModelError, match=rf"'todo'.*ToDo supports: {SUPPORTED}"):
                fastdiff.apply(pipe, merge=cfg)
            assert snapshot(denoiser, pipe.scheduler) == before  # refused before touching anything
            continue
        if cfg.get("proportional") and family not in PROPORTIONAL_FAMILIES:
            with pytest.raises(fastdiff.UnsupportedModelError,
                               match=rf"{type(denoiser).__name__}: merge option 'proportional'.*proportional supports: "
                                     rf"{SUPPORTED}"):
                fastdiff.apply(pipe, merge=cfg)
            with pytest.raises(fastdiff.UnsupportedModelError, match="'proportional'"):
                fastdiff.estimate(pipe, merge=cfg, height=16, width=16, steps=2)
            assert snapshot(denoiser, pipe.scheduler) == before
            continue
        with fastdiff.accelerated(pipe, merge=cfg) as h:
            a = run(pipe, family, steps=4)
            b = run(pipe, family, steps=4)
            s = h.summary()
        assert torch.equal(a, b) and torch.isfinite(a).all() and not torch.equal(a, base)
        assert all(d.startswith("merge=") for row in s.per_step for d in row.decisions)
        assert s.estimated_speedup > 1.02 and s.mechanisms["merge"]["calls_merged"] == s.calls
        assert h.summary().mechanisms == s.mechanisms  # still reported after remove()
    assert snapshot(denoiser, pipe.scheduler) == before
    assert torch.equal(run(pipe, family, steps=4), base)


@pytest.mark.parametrize("family,proportional", [(f, False) for f in ("dit", "flux", "cogvideox", "wan", "hunyuan", "sd15")]
                         + [("sd15", True)])
def test_batch_rows_and_cfg_branches_are_merged_apart(family, proportional):
    # per-row matching: a batch of two (with CFG: four rows per call, or separate calls) equals each sample
    # alone; Flux/CogVideoX/Hunyuan RoPE has no batch dim, so those rows run one at a time; proportional
    # attention's bias is per row too
    pipe = tiny.build_pipeline(family)
    kw = tiny.pipeline_kwargs(family, batch_size=2, steps=3)
    cfg = {"ratio": 0.5, "targets": ALL_TARGETS, "proportional": proportional}
    with torch.no_grad(), fastdiff.accelerated(pipe, merge=cfg) as h:
        both = tiny.output_tensor(pipe(**_seeded(kw)))
        assert h.records[0].ctx.batch_size in (2, 4)
        alone = [tiny.output_tensor(pipe(**_sample(_seeded(kw), i, 2))) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(both[i: i + 1], alone[i], rtol=1e-4, atol=1e-5)


def test_unet_on_an_odd_latent_merges_every_level_and_prices_it_exactly():
    unet = tiny.build_denoiser("sd15")
    kw = {**tiny.denoiser_inputs("sd15", batch_size=2), "sample": _randn(2, 4, 17, 23)}  # levels 17x23, 9x12, 5x6
    with torch.no_grad():
        base = unet(**kw).sample
    cfg = {"ratio": 0.5, "targets": ALL_TARGETS, "max_downsample": 8}
    with torch.no_grad(), fastdiff.accelerated(unet, merge=cfg) as h:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = unet(**kw).sample
        s = h.summary()
    assert out.shape == base.shape and not torch.equal(out, base)
    assert s.per_step[0].decisions == ["merge=391>196,108>54,30>15"]
    assert s.flops == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert s.flops < s.dense_flops


# -- what the hooks do ---------------------------------------------------------------------------------
def _capture(module):
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["args"], seen["kwargs"], seen["out"] = args, kwargs, out

    return seen, module.register_forward_hook(hook, with_kwargs=True)


def test_todo_is_exactly_key_value_pooling():
    # attn1 given the pooled tokens as encoder_hidden_states == attention with every query and pooled K, V
    dit = tiny.build_denoiser("dit")
    kw = {**tiny.denoiser_inputs("dit", batch_size=2), "hidden_states": _randn(2, 4, 10, 10)}  # 5x5 tokens: odd
    attn = dit.transformer_blocks[0].attn1
    seen, handle = _capture(attn)
    try:
        with torch.no_grad(), fastdiff.accelerated(dit, merge={"method": "todo"}):
            dit(**kw)
    finally:
        handle.remove()
    x = seen["args"][0]
    grid = (1, 5, 5)
    with torch.no_grad():
        q = attn.to_q(x)
        k, v = todo.pool(attn.to_k(x), grid, 2), todo.pool(attn.to_v(x), grid, 2)  # pool *after* projecting
        heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
        want = attn.to_out[0](o)
    assert k.shape[1] == 9 and seen["out"].shape == x.shape
    torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)


def test_tome_gives_merged_tokens_their_destination_output():
    # the unmerged output of attn1 holds exactly N - r distinct rows per sample: merged sources copy their
    # destination's; every query the model ran is one of those rows
    dit = tiny.build_denoiser("dit")
    kw = {**tiny.denoiser_inputs("dit", batch_size=2), "hidden_states": _randn(2, 4, 12, 12)}  # 6x6 tokens
    seen, handle = _capture(dit.transformer_blocks[1].attn1)
    try:
        with torch.no_grad(), fastdiff.accelerated(dit, merge={"ratio": 0.4}) as h:
            dit(**kw)
    finally:
        handle.remove()
    r = tome.merged_count((1, 6, 6), 0.4, 2, 2)
    assert h.records[0].decisions["merge"] == f"36>{36 - r}"
    for b in range(2):
        assert len(torch.unique(seen["out"][b], dim=0)) == 36 - r


def test_rope_is_gathered_at_each_merged_tokens_destination():
    # Flux: RoPE over [text; image] positions comes from the position ids; gathering rows must equal the RoPE
    # of the gathered ids, text rows untouched
    flux = tiny.build_denoiser("flux")
    kw = tiny.denoiser_inputs("flux", batch_size=1)
    ids = torch.cat([kw["txt_ids"], kw["img_ids"]])
    rope = flux.pos_embed(ids)
    m = tome.match(_randn(1, 16, 8), (1, 4, 4), 7)
    plan = merge_mod.MergePlan((1, 4, 4), 16, 9, 9, kept=m.kept)
    got = merge_mod._gather_rope(rope, RopeSpec("image_rotary_emb", 0, "first"), plan)
    want = flux.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"][m.kept[0]]]))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Wan: (1, positions, 1, dim) tensors with a broadcast batch dim: every row its own positions in one call
    wan = tiny.build_denoiser("wan")
    lat = _randn(2, 16, 3, 8, 8)
    cos, sin = wan.rope(lat)
    m = tome.match(_randn(2, 48, 8), (3, 4, 4), 20)
    plan = merge_mod.MergePlan((3, 4, 4), 48, 28, 28, kept=m.kept)
    g_cos, g_sin = merge_mod._gather_rope((cos, sin), RopeSpec("rotary_emb", seq_dim=1, batch_dim=0), plan)
    assert g_cos.shape == (2, 28, 1, cos.shape[-1])
    for b in range(2):
        assert torch.equal(g_cos[b], cos[0, m.kept[b]]) and torch.equal(g_sin[b], sin[0, m.kept[b]])


def test_key_mask_over_image_and_text_keeps_its_text_part():
    # Hunyuan's (B, 1, 1, image + text) key mask: the image part shrinks with the tokens, the text part stays
    hunyuan = tiny.build_denoiser("hunyuan")
    mech = merge_mod.TokenMerge(fastdiff.load_config(merge={}).merge)
    mech.adapter = adapters.resolve(hunyuan)
    site = next(s for s in mech.sites(mech.adapter) if s.spec.mask_arg)
    m = tome.match(_randn(2, 48, 8), (3, 4, 4), 20)
    plan = merge_mod.MergePlan((3, 4, 4), 48, 28, 28, kept=m.kept)
    mask = torch.ones(2, 1, 1, 48 + 8, dtype=torch.bool)
    mask[0, ..., -3:] = False  # padded text of row 0
    args_of = merge_mod.Args(site.module)
    _, kwargs = mech._shrink_mask(site, args_of, (), {"attention_mask": mask}, plan)
    out = kwargs["attention_mask"]
    assert out.shape == (2, 1, 1, 28 + 8) and out[..., :28].all()
    assert torch.equal(out[..., 28:], mask[..., 48:])


# -- schedules, levels, depth -------------------------------------------------------------------------
def _sites(family, **cfg):
    mech = merge_mod.TokenMerge(fastdiff.load_config(merge=cfg).merge)
    return mech.sites(adapters.resolve(tiny.build_denoiser(family)))


def test_levels_depth_and_targets_select_the_submodules():
    # sd15: attention at levels 0 and 1 (two transformer blocks each on the way down, three up) and the mid block
    levels = lambda **c: sorted({s.level for s in _sites("sd15", **c)})  # noqa: E731
    assert levels() == [0] and levels(max_downsample=2) == [0, 1] and levels(max_downsample=8) == [0, 1, 2]
    # sdxl has no attention at full resolution: max_downsample counts from its finest attention level (2x)
    assert sorted({s.level for s in _sites("sdxl")}) == [1]
    all_dit = _sites("dit", targets=ALL_TARGETS)
    assert [s.path for s in all_dit] == [f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("attn1", "ff")]
    assert [s.owner for s in _sites("dit", depth="last", depth_fraction=0.5)] == ["transformer_blocks.1"]
    flux = _sites("flux", targets=ALL_TARGETS, depth="first", depth_fraction=0.5)
    assert [s.path for s in flux] == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.1.attn",
                                      "transformer_blocks.1.ff"]
    assert [s.path for s in _sites("hunyuan")][-1] == "single_transformer_blocks.1.attn"


def test_step_schedule_is_predicted_exactly_and_reported_per_step():
    pipe = tiny.build_pipeline("dit")
    cfg = {"merge": {"ratio": 0.6, "ratio_end": 0.2, "start": 0.0, "stop": 0.75}}
    with torch.no_grad(), fastdiff.accelerated(pipe, cfg) as h:
        pipe(**tiny.pipeline_kwargs("dit", steps=8))
        s = h.summary()
    # 8 steps: merging in steps 0-5 (stop 0.75), the ratio going linearly from 0.6 to 0.2; none in the last two
    want = [f"merge=16>{16 - tome.merged_count((1, 4, 4), 0.6 + (0.2 - 0.6) * i / 5, 2, 2)}" for i in range(6)]
    assert [r.decisions[0] for r in s.per_step] == want + ["", ""]
    est = fastdiff.estimate(pipe, cfg, height=16, width=16, steps=8)
    assert est.flops == pytest.approx(s.flops, rel=1e-12) and est.speedup > 1


def test_merging_composes_with_caching_a_reused_block_pays_nothing():
    pipe = tiny.build_pipeline("dit")
    cfg = {"merge": {"ratio": 0.5, "targets": ALL_TARGETS}, "cache": {"interval": 2}}
    with torch.no_grad(), fastdiff.accelerated(pipe, cfg) as h:
        pipe(**tiny.pipeline_kwargs("dit", steps=6))
        s = h.summary()
    reused = [r for r in s.per_step if r.decisions == ["cache=reuse"]]  # no merge decision: its blocks never ran
    computed = [r for r in s.per_step if "cache=compute" in r.decisions[0]]
    assert reused and computed and all("merge=16>8" in r.decisions[0] for r in computed)
    assert all(r.blocks_computed == 0 for r in reused)
    # a reused step pays only for the layers outside the blocks (two CFG rows): no merging, no matching
    outside = CostModel(adapters.resolve(pipe.transformer)).block_flops(TokenLayout((1, 4, 4)))[-1]
    assert all(r.flops == 2 * outside for r in reused)
    merged_only = fastdiff.estimate(pipe, {"merge": cfg["merge"]}, height=16, width=16, steps=6)
    est = fastdiff.estimate(pipe, cfg, height=16, width=16, steps=6)
    assert est.flops == pytest.approx(s.flops, rel=1e-12) and est.flops < merged_only.flops


# -- torch.compile ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{"ratio": 0.5, "proportional": True},
                                 {"ratio": 0.6, "ratio_end": 0.1, "targets": ["self_attention", "mlp"]}])
def test_merging_in_compiled_blocks_matches_eager_and_does_not_recompile_per_step(cfg):
    # The DiT's blocks compiled (aot_eager: dynamo + AOTAutograd without codegen, to stay fast on CPU) with merging
    # attached. The decisions (keeping the block input, the matching, the record) run under torch.compiler.disable,
    # so a block graph-breaks around them: at most 1 + 1 + 2 per merged submodule graphs per block, and the
    # matching's index tensors enter those graphs as inputs — a new matching every step needs no new graph. A
    # constant ratio keeps the merged token count fixed; a ratio schedule changes it every step, and dynamo
    # recompiles the graphs that see it once, with that size dynamic. Either way, a second run with another number
    # of steps (other step indices, matchings, ratios) compiles nothing. (torch 2.13: 6 graphs, and 13 with the
    # schedule on self-attention and MLP.)
    from torch._dynamo.testing import CompileCounterWithBackend

    pipe = tiny.build_pipeline("dit")
    counter = CompileCounterWithBackend("aot_eager")
    blocks = pipe.transformer.transformer_blocks
    with fastdiff.accelerated(pipe, merge=cfg):
        eager = {steps: run(pipe, "dit", steps=steps) for steps in (4, 7)}
        torch._dynamo.reset()
        for block in blocks:
            block.compile(backend=counter)
        try:
            compiled = run(pipe, "dit", steps=4)
            first = counter.frame_count
            again = run(pipe, "dit", steps=7)
            assert counter.frame_count == first  # no recompilation for the new steps
        finally:
            for block in blocks:
                block._compiled_call_impl = None
            torch._dynamo.reset()
    bound = len(blocks) * (2 + 2 * len(cfg.get("targets", ["self_attention"]))) * (2 if "ratio_end" in cfg else 1)
    assert 1 <= first <= bound, (first, bound)
    torch.testing.assert_close(compiled, eager[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, eager[7], rtol=1e-5, atol=1e-6)


# -- the cost model vs FlopCounterMode at the reduced token counts -------------------------------------
@functools.lru_cache(maxsize=None)
def _denoiser(family):
    return tiny.build_denoiser(family)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_cost_model_matches_flop_counter_at_the_reduced_token_count(family):
    model = _denoiser(family)
    kw = tiny.denoiser_inputs(family, batch_size=2)
    for cfg in ({"ratio": 0.7, "targets": ALL_TARGETS, "max_downsample": 2}, {"method": "todo"},
                {"ratio": 0.7, "max_downsample": 2, "proportional": True}):
        if cfg.get("method") == "todo" and family not in TODO_FAMILIES:
            continue
        if cfg.get("proportional") and family not in PROPORTIONAL_FAMILIES:
            continue  # the bias is an elementwise add: no FLOPs in the model, none counted by FlopCounterMode
        with torch.no_grad(), fastdiff.accelerated(model, merge=cfg) as h:
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                model(**kw)
            s = h.summary()
        # the issue asks for 5%; the model is exact (the matching's similarity matmul included), so hold it there
        assert s.flops == pytest.approx(counter.get_total_flops(), rel=1e-6), (family, cfg)
        assert s.flops < s.dense_flops


# -- refusals ------------------------------------------------------------------------------------------
def test_refusals_leave_the_model_untouched(snapshot):
    pipe = tiny.build_pipeline("dit")
    before = snapshot(pipe.transformer, pipe.scheduler)
    for bad, err, match in [({"targets": ["cross_attention"]}, fastdiff.UnsupportedModelError, "select no submodule"),
                            ({"ratio": 1.0}, fastdiff.ConfigError, "ratio"),
                            ({"method": "todo", "targets": ["mlp"]}, fastdiff.ConfigError, "self_attention"),
                            ({"targets": ["attention"]}, fastdiff.ConfigError, "targets"),
                            ({"sx": 1, "sy": 1}, fastdiff.ConfigError, "sx"),
                            ({"start": 0.5, "stop": 0.5}, fastdiff.ConfigError, "start < stop"),
                            ({"max_downsample": 3}, fastdiff.ConfigError, "max_downsample")]:
        with pytest.raises(err, match=match):
            fastdiff.apply(pipe, merge=bad)
        with pytest.raises(err, match=match):
            fastdiff.estimate(pipe, merge=bad, height=16, width=16, steps=2)
    assert snapshot(pipe.transformer, pipe.scheduler) == before
    assert fastdiff.session_of(pipe) is None


def test_a_family_without_token_submodule_data_is_refused_with_the_supported_list():
    from ..unit.toy import ToyDenoiser

    with pytest.raises(fastdiff.UnsupportedModelError, match=r"ToyDenoiser.*token merging.*Supported families: \["):
        fastdiff.apply(ToyDenoiser(), merge={})


def test_strify_names_the_knobs():
    cfg = fastdiff.load_config(merge={"ratio": 0.5, "targets": ["self_attention", "mlp"], "stop": 0.8})
    assert cfg.strify() == "merge[tome,r0.5,2x2,sa+mlp,s0-0.8]"
    assert fastdiff.load_config(merge={"method": "todo", "max_downsample": 2}).strify() == "merge[todo,f2,md2]"


def test_protected_tokens_are_merged_last():
    from fastdiff.mechanisms.merging import tome

    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 36, 8, generator=g)
    free = tome.match(metric, (1, 6, 6), 10)
    protect = torch.zeros(2, 36, dtype=torch.bool)
    protect.scatter_(1, free.src[:, :5], True)  # protect half of what would have been merged
    m = tome.match(metric, (1, 6, 6), 10, protect=protect)
    assert m.r == 10
    assert not protect.gather(1, m.src).any()  # enough unprotected sources: no protected token is merged


def test_keep_changed_protects_the_most_changed_tokens_end_to_end():
    pipe = tiny.build_pipeline("dit")
    kw = lambda: tiny.pipeline_kwargs("dit", steps=4)  # noqa: E731
    outs = []
    for keep in (0.0, 0.25):
        with torch.no_grad(), fastdiff.accelerated(pipe, merge={"ratio": 0.5, "keep_changed": keep}) as h:
            outs.append(tiny.output_tensor(pipe(**kw())))
            assert h.summary().flops < h.summary().dense_flops
    assert not torch.equal(outs[0], outs[1]) and torch.isfinite(outs[1]).all()
    with pytest.raises(fastdiff.ConfigError, match="keep_changed"):
        fastdiff.apply(pipe, merge={"method": "todo", "keep_changed": 0.2})


def test_share_block_matches_per_transformer_block_and_level_per_grid(monkeypatch):
    """share "block": one matching per transformer block and call; "level": one per token grid and call. The
    estimate charges the similarity matmul once per matching either way, as the run does."""
    pipe = tiny.build_pipeline("sd15")
    calls = []
    real = tome.match
    monkeypatch.setattr(tome, "match", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for share in ("block", "level"):
        h = fastdiff.apply(pipe, merge={"ratio": 0.5, "share": share})
        calls.clear()
        run(pipe, "sd15", steps=2)
        s = h.summary()
        h.remove()
        counts[share] = (len(calls), s.flops)
    n_calls = 2  # two steps, batched CFG: one denoiser call each
    assert counts["level"][0] == n_calls * 1  # the tiny SD1.5 merges on one level only (max_downsample 1)
    assert counts["block"][0] > counts["level"][0]
    assert counts["block"][1] > counts["level"][1]  # more matchings, more FLOPs accounted
    with pytest.raises(fastdiff.ConfigError, match="share"):
        fastdiff.load_config(merge={"share": "step"})


# -- fused q/k/v projections (diffusers' fuse_qkv_projections) ---------------------------------------------
def _denoiser_of(pipe):
    return pipe.unet if "unet" in pipe.components else pipe.transformer


@pytest.mark.parametrize("family", ["pixart", "sd15"])
def test_todo_refuses_fused_qkv_projections_before_and_after_apply(family, snapshot):
    """ToDo hands self-attention pooled tokens as its key/value input, which a fused q/k/v projection cannot take
    (it crashed mid-call on `to_kv`: issue 17, r09). Fused before apply: refused at apply, nothing touched. Fused
    after apply: refused at the next call before any block runs; unfusing gives the ToDo output of before."""
    pipe = tiny.build_pipeline(family)
    denoiser = _denoiser_of(pipe)
    base = run(pipe, family, steps=3)
    with fastdiff.accelerated(pipe, preset="merge-todo"):
        want = run(pipe, family, steps=3)
    message = (rf"{type(denoiser).__name__}: merge method 'todo'.*fuse_qkv_projections\(\).*"
               r"unfuse_qkv_projections\(\).*'tome' or sparse attention")
    denoiser.fuse_qkv_projections()
    fused_base = run(pipe, family, steps=3)
    before = snapshot(denoiser, pipe.scheduler)
    with pytest.raises(fastdiff.UnsupportedModelError, match=message):
        fastdiff.apply(pipe, preset="merge-todo")
    assert snapshot(denoiser, pipe.scheduler) == before and fastdiff.session_of(pipe) is None
    assert torch.equal(run(pipe, family, steps=3), fused_base)
    denoiser.unfuse_qkv_projections()

    h = fastdiff.apply(pipe, preset="merge-todo")
    denoiser.fuse_qkv_projections()
    ran = []
    first = denoiser.get_submodule(h.adapter.blocks[0].path).register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(fastdiff.FastDiffError, match=message):
            run(pipe, family, steps=3)
    finally:
        first.remove()
    assert not ran  # refused before the first block computed anything
    denoiser.unfuse_qkv_projections()
    assert torch.equal(run(pipe, family, steps=3), want)
    h.remove()
    assert torch.equal(run(pipe, family, steps=3), base)


@pytest.mark.parametrize("family,cfg", [("pixart", "merge-tome"), ("sd15", "merge-tome"), ("flux", "merge-tome"),
                                        ("pixart", {"merge": {"ratio": 0.5, "proportional": True}})])
@pytest.mark.parametrize("when", ["before", "after"])
def test_tome_works_with_fused_qkv_projections(family, cfg, when):
    """ToMe merges the tokens a fused projection then projects (and FusedAttnProcessor2_0 adds proportional
    attention's bias as AttnProcessor2_0 does): the unfused ToMe output, fused before or after apply, the merge
    still reported."""
    pipe = tiny.build_pipeline(family)
    denoiser = _denoiser_of(pipe)
    with fastdiff.accelerated(pipe, cfg):
        want = run(pipe, family, steps=3)
    base = run(pipe, family, steps=3)
    if when == "before":
        denoiser.fuse_qkv_projections()
    h = fastdiff.apply(pipe, cfg)
    if when == "after":
        denoiser.fuse_qkv_projections()
    got = run(pipe, family, steps=3)
    s = h.summary()
    h.remove()
    assert all(sites.fused_qkv(site.module) for site in sites.find(h.adapter)
               if site.spec.role == "self_attention")  # it did run fused
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, base) and s.mechanisms["merge"]["calls_merged"] == s.calls and s.flops < s.dense_flops
