"""Sparse attention: patterns are what they say at the token level, the mechanism computes exactly the masked
attention, runs on every family's tiny model, is bit-identical where it lists every block, and leaves nothing
behind."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.adapters.base import TokenModule
from fastdiff.attention import dispatch
from fastdiff.clock import CallRecord
from fastdiff.config import SparseConfig
from fastdiff.context import RunState, StepContext, TokenLayout
from fastdiff.errors import ConfigError, FastDiffError, UnsupportedModelError
from fastdiff.eval import tiny
from fastdiff.host import Call
from fastdiff.mechanisms.sparse_attention import SparseAttention
from fastdiff.mechanisms.sparse_attention import patterns as P
from tests.adapters.facts import FAMILIES, UNET, VIDEO


def token_window(grid, tile, window):
    """(N, N) bool in raster order, from coordinates alone: key tile within window // 2 tiles on every axis."""
    f, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    tiles = coords.reshape(-1, 3) // torch.tensor(tile)
    dist = (tiles[:, None, :] - tiles[None, :, :]).abs()
    return (dist <= torch.tensor([x // 2 for x in window])).all(-1)


def in_sequence_order(geom, block_mask):
    """A (Q, K) block mask as the (N, N) token mask in the module's own sequence order."""
    tok = block_mask.repeat_interleave(geom.block, 0)[: geom.n].repeat_interleave(geom.block, 1)[:, : geom.n]
    out = torch.empty_like(tok)
    order = geom.order if geom.order is not None else torch.arange(geom.n)
    out[order[:, None], order[None, :]] = tok
    return out


@pytest.mark.parametrize("grid,tile,window", [((1, 16, 16), (1, 4, 4), (1, 3, 3)), ((1, 8, 12), (1, 4, 4), (1, 1, 1)),
                                              ((4, 8, 8), (2, 4, 4), (3, 3, 3)), ((4, 8, 8), (2, 4, 4), (1, 1, 3))])
def test_window_is_the_tile_neighbourhood(grid, tile, window):
    geom = P.geometry(grid, 0, False, tile, math.prod(tile))
    got = in_sequence_order(geom, P.window(geom, window))
    assert torch.equal(got, token_window(grid, tile, window))


def test_full_window_and_text_are_dense():
    geom = P.geometry((1, 17, 23), 7, True, (1, 4, 4), 16)  # odd grid, text first: edge tiles straddle blocks
    assert bool(P.window(geom, (1, 9, 11)).all())  # a window of the whole grid lists every block
    m = P.window(geom, (1, 1, 1))
    assert bool(m[geom.text].all()) and bool(m[:, geom.text].all())  # text attends and is attended everywhere
    tok = in_sequence_order(geom, m)
    assert bool(tok[:7].all()) and bool(tok[:, :7].all())  # the text positions of the sequence (first 7)
    order = geom.order
    assert sorted(order.tolist()) == list(range(geom.n))


def test_crisscross_adds_rows_and_columns():
    geom = P.geometry((1, 16, 16), 0, False, (1, 4, 4), 16)
    cc = in_sequence_order(geom, P.crisscross(geom, (1, 1, 1)))
    tiles = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2) // 4
    same_row, same_col = (tiles[:, None, 0] == tiles[None, :, 0]), (tiles[:, None, 1] == tiles[None, :, 1])
    assert torch.equal(cc, same_row | same_col)
    assert P.density(geom, P.crisscross(geom, (1, 1, 1))) == pytest.approx(7 / 16)


def test_to_index_round_trip():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    mask[0, 0, 1] = False  # an empty row
    index, count = dispatch.mask_to_index(mask, trim=True)
    assert torch.equal(dispatch.index_to_mask(index, count, 7), mask)
    assert bool((index[..., 1:] >= index[..., :-1]).all())  # ascending, padding repeats the last id


def _attend(cfg, grid, q, k, v, n_text=0, text="none", position="none", step=0):
    """The mechanism's attention on raw q/k/v, outside any model: pattern, tile order and backend together."""
    mech = SparseAttention(SparseConfig(**cfg))
    mech.adapter = SimpleNamespace(name="test", spec=SimpleNamespace(text_position=position))
    store = RunState()
    mech.host = SimpleNamespace(state=lambda call, m, slot=None: store.get(m.name, call.ctx.call, call.ctx.grid,
                                                                           m.new_state))
    layout = TokenLayout(grid, n_text, position)
    call = Call(CallRecord(StepContext(0, step, 4, 0.0, 0, ("?",) * q.shape[0], layout)), {})
    site = SimpleNamespace(path="attn", level=0, spec=TokenModule("attn", "self_attention", text=text))
    return mech._attend(site, call, q, k, v, None, None), call.record


@pytest.mark.parametrize("backend", ["gather", "sdpa", "flex"])
@pytest.mark.parametrize("n_text,position", [(0, "none"), (5, "first"), (5, "last")])
def test_mechanism_computes_the_masked_attention(backend, n_text, position):
    grid, tile, window = (1, 8, 12), (1, 4, 4), (1, 1, 1)
    n_img = math.prod(grid)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n_img + n_text, 16) for _ in range(3))
    cfg = dict(pattern="window", block=16, tile=list(tile), window=list(window), backend=backend)
    text = "none" if not n_text else "separate"
    out, rec = _attend(cfg, grid, q, k, v, n_text, text, position)
    allowed = torch.ones(n_img + n_text, n_img + n_text, dtype=torch.bool)
    img = slice(n_text, None) if position == "first" else slice(0, n_img)
    allowed[img, img] = token_window(grid, tile, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert 0 < rec.reductions["attn"].density < 1


def test_family_tiny_models_run_each_pattern():
    """Every family, window and criss-cross (predicted patterns: below): runs, changes the output, reports a density
    below 1, the estimate prices it, and remove() restores bit-identical output."""
    for family in FAMILIES:
        pipe = tiny.build_pipeline(family)
        kw = _big(family)
        base = run(pipe, family, **kw)
        for pattern in ("window", "crisscross"):
            h = fastdiff.apply(pipe, {"sparse": _cfg(pattern)})
            out = run(pipe, family, **kw)
            s = h.summary()
            h.remove()
            assert torch.isfinite(out).all(), (family, pattern)
            dens = s.mechanisms["sparse"]["density"]
            if family == "dit":  # 4x4 tokens: one block, dense, untouched, and reported as such
                assert torch.equal(out, base) and dens and set(dens.values()) == {1.0}
                assert s.flops == s.dense_flops
                continue
            assert not torch.equal(out, base), (family, pattern)
            # 1.0: a site whose grid is all one neighbourhood (the UNets' coarse levels) ran dense
            assert dens and all(0 < d <= 1 for d in dens.values()) and min(dens.values()) < 1, (family, pattern, dens)
            assert s.flops < s.dense_flops, (family, pattern)
            assert torch.equal(run(pipe, family, **kw), base), (family, pattern)


def _cfg(pattern, **kw):
    return {"pattern": pattern, "block": 16, "window": [1, 1, 1], "start": 0.0, **kw}


def _big(family):
    """Grids with several 16-token blocks (the tiny defaults have 16 tokens per frame; DiT's size is fixed)."""
    return {} if family == "dit" else {"scale": 2 if family in VIDEO | UNET else 4}


def run(pipe, family, scale=1, **kw):
    kwargs = tiny.pipeline_kwargs(family, **kw)
    if scale > 1:
        kwargs["height"] *= scale
        kwargs["width"] *= scale
    with torch.no_grad():
        return tiny.output_tensor(pipe(**kwargs))


@pytest.mark.parametrize("pattern", ["topk", "topp"])
def test_predicted_patterns_on_families(pattern):
    """Predicted patterns on a DiT-like, a joint-text and a video family: run, report a density, restore."""
    for family in ("pixart", "flux", "wan"):
        pipe = tiny.build_pipeline(family)
        kw = _big(family)
        base = run(pipe, family, **kw)
        h = fastdiff.apply(pipe, {"sparse": _cfg(pattern, density=0.3, top_p=0.5)})
        out = run(pipe, family, **kw)
        dens = h.summary().mechanisms["sparse"]["density"]
        h.remove()
        assert torch.isfinite(out).all() and not torch.equal(out, base), family
        assert dens and all(0 < d < 1 for d in dens.values()), (family, dens)
        assert torch.equal(run(pipe, family, **kw), base)


@pytest.mark.parametrize("family,cfg", [
    ("pixart", _cfg("topk", density=1.0)),  # k of all blocks: nothing to predict
    ("pixart", _cfg("topp", top_p=0.99)),  # the scores keep every block of these grids
    ("flux", _cfg("topp", top_p=0.99)),  # joint text: text blocks dense as well
    ("dit", "sparse-topk"),  # the preset on a grid of one 64-token block (as on ref-digits)
])
def test_a_predicted_pattern_listing_every_block_runs_dense_attention(family, cfg, monkeypatch):
    """A predicted pattern that keeps every block is dense attention: the model's own SDPA (bit-identical, never
    the block-sparse dispatch), reported at density 1.0 on every site and priced as dense. It used to divide by
    zero averaging the call's sparse densities (issue 17, r01)."""
    pipe = tiny.build_pipeline(family)
    kw = _big(family)
    base = run(pipe, family, steps=4, **kw)
    sparse_calls = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **k: sparse_calls.append(1) or real(*a, **k))
    h = fastdiff.apply(pipe, preset=cfg) if isinstance(cfg, str) else fastdiff.apply(pipe, {"sparse": cfg})
    out = run(pipe, family, steps=4, **kw)
    s = h.summary()
    h.remove()
    assert torch.equal(out, base) and not sparse_calls
    dens = s.mechanisms["sparse"]["density"]
    assert len(dens) == len(SparseAttention(h.config.sparse).sites(h.adapter)) and set(dens.values()) == {1.0}
    assert s.flops == s.dense_flops
    assert all(d.endswith("d1.000") for r in s.per_step[1:] for d in r.decisions), s.per_step


def test_prediction_is_reused_across_steps_and_reset_between_runs(monkeypatch):
    pipe = tiny.build_pipeline("pixart")
    calls = []
    real = dispatch.predict

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "predict", counting)
    sites = 2  # the tiny PixArt's two self-attention modules
    for refresh, per_run in ((0, 1), (2, 3)):  # 5 steps: predicted once, or at steps 0, 2 and 4
        h = fastdiff.apply(pipe, {"sparse": _cfg("topk", refresh=refresh)})
        for _ in range(2):
            calls.clear()
            a = run(pipe, "pixart", scale=4, steps=5)
            assert len(calls) == per_run * sites * 1, (refresh, len(calls))  # batched CFG: one call slot
        b = run(pipe, "pixart", scale=4, steps=5)
        h.remove()
        assert torch.equal(a, b)  # a new run predicts afresh: nothing carried over


def test_batch_rows_get_their_own_pattern():
    """Two samples in one batch give what each gives alone (each row predicts its own blocks)."""
    pipe = tiny.build_pipeline("pixart")
    h = fastdiff.apply(pipe, {"sparse": _cfg("topk")})
    kw = tiny.pipeline_kwargs("pixart", batch_size=2, seed=3)
    for key in ("height", "width"):
        kw[key] *= 4
    kw["generator"] = [torch.Generator().manual_seed(s) for s in (11, 12)]
    with torch.no_grad():
        both = tiny.output_tensor(pipe(**kw))
        for i, seed in enumerate((11, 12)):
            one = {k: (v[i: i + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v) for k, v in kw.items()}
            one["generator"] = torch.Generator().manual_seed(seed)
            torch.testing.assert_close(tiny.output_tensor(pipe(**one)), both[i: i + 1], rtol=1e-3, atol=1e-3)
    h.remove()


def test_dense_settings_are_bit_identical():
    """A window over the whole grid, dense steps, dense heads for every head: the model's own SDPA, bit for bit."""
    pipe = tiny.build_pipeline("sd3")
    base = run(pipe, "sd3", scale=4)
    heads = pipe.transformer.config.num_attention_heads
    for cfg in (_cfg("window", window=[1, 99, 99]), _cfg("window", start=0.9),
                _cfg("crisscross", dense_heads=list(range(heads)))):
        h = fastdiff.apply(pipe, {"sparse": cfg})
        out = run(pipe, "sd3", scale=4)
        h.remove()
        assert torch.equal(out, base), cfg


def test_estimate_matches_the_run_and_composes_with_cache():
    pipe = tiny.build_pipeline("pixart")
    cfg = {"sparse": _cfg("window", start=0.4)}
    h = fastdiff.apply(pipe, cfg)
    run(pipe, "pixart", scale=4, steps=5)
    s = h.summary()
    h.remove()
    est = fastdiff.estimate(pipe, cfg, steps=5, height=64, width=64, text_tokens=s.per_step[0].text_tokens)
    assert est.flops == pytest.approx(s.flops, rel=1e-9)  # static patterns: the run's own accounting, exactly
    assert est.speedup == pytest.approx(s.estimated_speedup, rel=1e-9) and est.speedup > 1.1
    h = fastdiff.apply(pipe, {**cfg, "cache": {"policy": "static", "interval": 2}})
    run(pipe, "pixart", scale=4, steps=5)
    both = h.summary()
    h.remove()
    assert both.flops < s.flops  # reused blocks run no attention at all


def test_refusals_touch_nothing():
    with pytest.raises(ConfigError, match="block"):
        SparseConfig(block=48).validate()
    with pytest.raises(ConfigError, match="merge"):
        fastdiff.FastDiffConfig(sparse={}, merge={}).validate()
    pipe = tiny.build_pipeline("pixart")
    base = run(pipe, "pixart", scale=4)
    with pytest.raises(UnsupportedModelError, match="dense_blocks"):
        fastdiff.apply(pipe, {"sparse": _cfg("window", dense_blocks=[0, 1])})
    assert torch.equal(run(pipe, "pixart", scale=4), base)
    # a processor that computes attention without SDPA cannot be made sparse: a clear error, not a silent no-op
    from diffusers.models.attention_processor import AttnProcessor

    procs = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(AttnProcessor())
    h = fastdiff.apply(pipe, {"sparse": _cfg("window")})
    with pytest.raises(FastDiffError, match="scaled_dot_product_attention"):
        run(pipe, "pixart", scale=4)
    h.remove()
    pipe.transformer.set_attn_processor(procs)
    assert torch.equal(run(pipe, "pixart", scale=4), base)
    assert F.scaled_dot_product_attention is dispatch._sdpa  # nothing left routed


def test_compiled_blocks_give_the_eager_sparse_output():
    """torch.compile'd blocks: the routed attention still runs sparse (the decision code is compiler-disabled)."""
    pipe = tiny.build_pipeline("pixart")
    h = fastdiff.apply(pipe, {"sparse": _cfg("window")})
    eager = run(pipe, "pixart", scale=4)
    blocks = pipe.transformer.transformer_blocks
    try:
        for b in blocks:
            b.compile(backend="aot_eager")
        compiled = run(pipe, "pixart", scale=4)
        dens = h.summary().mechanisms["sparse"]["density"]
    finally:
        for b in blocks:
            b._compiled_call_impl = None  # back to eager for the other tests sharing nothing but this process
        h.remove()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert dens and all(d < 1 for d in dens.values())


@pytest.mark.parametrize("family", ["pixart", "flux", "sd15"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_fused_qkv_projections_run_sparse(family, when):
    """Fused q/k/v projections (diffusers' fuse_qkv_projections) still call SDPA on the same q, k, v: the unfused
    sparse output, fused before or after apply, with the same densities."""
    from fastdiff.mechanisms import sites

    pipe = tiny.build_pipeline(family)
    denoiser = pipe.unet if "unet" in pipe.components else pipe.transformer
    kw = _big(family)
    cfg = {"sparse": _cfg("window")}
    with fastdiff.accelerated(pipe, cfg) as h:
        want = run(pipe, family, **kw)
        want_dens = h.summary().mechanisms["sparse"]["density"]
    if when == "before":
        denoiser.fuse_qkv_projections()
    h = fastdiff.apply(pipe, cfg)
    if when == "after":
        denoiser.fuse_qkv_projections()
    got = run(pipe, family, **kw)
    dens = h.summary().mechanisms["sparse"]["density"]
    h.remove()
    assert all(sites.fused_qkv(s.module) for s in SparseAttention(h.config.sparse).sites(h.adapter))  # ran fused
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert dens == want_dens and min(dens.values()) < 1


@pytest.mark.parametrize("section", [{"dense_heads": [5]}, {"dense_blocks": [99]}])
def test_out_of_range_dense_heads_or_blocks_are_refused_at_apply(section):
    p = tiny.build_pipeline("pixart")
    with pytest.raises(fastdiff.ConfigError, match="dense_"):
        fastdiff.apply(p, sparse={"pattern": "window", **section})
    assert fastdiff.session_of(p) is None and "forward" not in p.transformer.__dict__
