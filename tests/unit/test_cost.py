"""The analytic cost model against torch's FlopCounterMode on every tiny family (at two token grids),
fastdiff.estimate against the summary of a real run, and the per-block accounting."""

import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff import adapters
from fastdiff.context import TokenLayout
from fastdiff.cost.model import CostModel
from fastdiff.eval import tiny

from ..adapters.facts import SEPARATE_CFG

# The issue asks for 5%; the analytic model is exact on every family today, so hold it to that:
# a dropped term (e.g. DiT re-running its embedder, ~3%) must fail.
REL = 1e-6  # cost model vs measured FLOPs


@functools.lru_cache(maxsize=None)
def denoiser(family):
    return tiny.build_denoiser(family)


def measured_flops(model, kwargs) -> int:
    # On CPU, FlopCounterMode does not count the fused SDPA kernel; the math backend runs attention as
    # bmm/matmul, which it does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    return counter.get_total_flops()


def predicted(model, kwargs) -> tuple[TokenLayout, float]:
    adapter = adapters.resolve(model)
    bound = adapter.bind((), kwargs)
    layout = adapter.layout(bound)
    batch = adapter.hidden_input(bound).shape[0]
    return layout, CostModel(adapter).call_flops(layout, batch)


# -- cost model vs FlopCounterMode --------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_call_flops_match_flop_counter(family):
    model = denoiser(family)
    kwargs = tiny.denoiser_inputs(family, batch_size=2)
    layout, flops = predicted(model, kwargs)
    real = measured_flops(model, kwargs)
    assert real > 0
    assert flops == pytest.approx(real, rel=REL), f"{family} {layout}: predicted {flops:.0f}, measured {real}"


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _larger(family: str, kwargs: dict) -> tuple[dict, int, int]:
    """kwargs on a larger token grid (or longer text), with the image and text tokens the layout must show."""
    b = 2
    kw = dict(kwargs)
    if family == "dit":  # diffusers' DiT unpatchifies a square grid only
        kw["hidden_states"] = _randn(b, 4, 12, 12)
        return kw, 6 * 6, 0
    if family == "sd3":  # non-square grid and a longer prompt
        kw["hidden_states"] = _randn(b, 4, 12, 16)
        kw["encoder_hidden_states"] = _randn(b, 20, kwargs["encoder_hidden_states"].shape[-1])
        return kw, 6 * 8, 20
    if family == "flux":  # packed latents: the grid comes from the position ids
        from diffusers import FluxPipeline

        kw["hidden_states"] = _randn(b, 6 * 8, 16)
        kw["img_ids"] = FluxPipeline._prepare_latent_image_ids(b, 6, 8, "cpu", torch.float32)
        return kw, 6 * 8, tiny.TEXT_LEN
    if family == "sd15":  # odd sizes at the lower levels, which round up (6x18 -> 3x9 -> 2x5)
        kw["sample"] = _randn(b, 4, 6, 18)
        return kw, 6 * 18, tiny.TEXT_LEN
    if family == "wan":  # more latent frames, non-square
        kw["hidden_states"] = _randn(b, 16, 5, 8, 12)
        return kw, 5 * 4 * 6, tiny.TEXT_LEN
    if family == "hunyuan":  # more latent frames, joint attention with text
        kw["hidden_states"] = _randn(b, 4, 5, 8, 12)
        return kw, 5 * 4 * 6, tiny.TEXT_LEN
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["dit", "sd3", "flux", "sd15", "wan", "hunyuan"])
def test_call_flops_scale_with_tokens(family):
    model = denoiser(family)
    small_kw = tiny.denoiser_inputs(family, batch_size=2)
    small_layout, _ = predicted(model, small_kw)
    kwargs, image_tokens, text_tokens = _larger(family, small_kw)
    layout, flops = predicted(model, kwargs)
    assert (layout.image_tokens, layout.text_tokens) == (image_tokens, text_tokens)
    assert layout.image_tokens > small_layout.image_tokens
    real = measured_flops(model, kwargs)
    assert real > 1.5 * measured_flops(model, small_kw)  # a genuinely different workload, not the same shape
    assert flops == pytest.approx(real, rel=REL), f"{family} {layout}: predicted {flops:.0f}, measured {real}"


# -- fastdiff.estimate vs a real run -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    return request.param, tiny.build_pipeline(request.param)


@pytest.mark.parametrize("cfg", [True, False])
def test_estimate_matches_summary_of_a_real_run(pipe, cfg):
    family, pipeline = pipe
    steps = 3
    kw = tiny.pipeline_kwargs(family, steps=steps, cfg=cfg)
    size = dict(height=kw["height"], width=kw["width"], steps=steps, cfg=cfg, text_tokens=tiny.TEXT_LEN)

    est = fastdiff.estimate(pipeline, **size)
    assert est.speedup == 1.0
    assert est.flops == est.dense_flops > 0
    assert fastdiff.estimate(pipeline, preset="none", **size).speedup == 1.0
    assert est.calls_per_step == (2 if cfg else 1) and est.batch == 1 and est.steps == steps

    handle = fastdiff.apply(pipeline)
    try:
        with torch.no_grad():
            pipeline(**kw)
        summary = handle.summary()
    finally:
        fastdiff.remove(pipeline)

    # sd3 batches cond+uncond into one call of 2 rows; flux makes one call per branch
    separate = family in SEPARATE_CFG
    assert summary.calls == steps * (2 if cfg and separate else 1)
    row = summary.per_step[0]
    assert (row.image_tokens, row.text_tokens) == (est.layout.image_tokens, est.layout.text_tokens)
    assert summary.estimated_speedup == 1.0
    # integer-valued float sums: exact
    assert est.dense_flops == summary.dense_flops, (
        f"{family} cfg={cfg}: estimate {est.dense_flops:.0f} vs run {summary.dense_flops:.0f}")


def test_estimate_cfg_doubles_and_steps_scale():
    pipeline = tiny.build_pipeline("sd3")
    one = fastdiff.estimate(pipeline, height=16, width=16, steps=1, cfg=False, text_tokens=tiny.TEXT_LEN)
    assert fastdiff.estimate(pipeline, height=16, width=16, steps=1, cfg=True,
                             text_tokens=tiny.TEXT_LEN).dense_flops == 2 * one.dense_flops
    assert fastdiff.estimate(pipeline, height=16, width=16, steps=5, cfg=False,
                             text_tokens=tiny.TEXT_LEN).dense_flops == 5 * one.dense_flops
    assert fastdiff.estimate(pipeline, height=16, width=16, steps=1, cfg=False, batch=3,
                             text_tokens=tiny.TEXT_LEN).dense_flops == 3 * one.dense_flops
    bigger = fastdiff.estimate(pipeline, height=32, width=32, steps=1, cfg=False, text_tokens=tiny.TEXT_LEN)
    assert bigger.layout.image_tokens == 4 * one.layout.image_tokens
    assert bigger.dense_flops > 3 * one.dense_flops


def test_estimate_on_the_pixel_space_reference_model_prices_its_real_grid():
    # ref-digits samples 16x16 pixels with a patch-2 DiT: 8x8 tokens. Assuming a VAE x8 priced a 1x1 grid (and
    # merging at 1.00x); the estimate must equal the accounting of a real run (issue 17 item 16).
    from fastdiff.eval import reference

    pipe = reference.load("ref-digits")
    steps = 2
    est = fastdiff.estimate(pipe, height=16, width=16, steps=steps)
    assert est.layout.grid == (1, 8, 8) and est.layout.image_tokens == 64
    with torch.no_grad(), fastdiff.accelerated(pipe) as handle:
        pipe([1, 7], num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        summary = handle.summary()
    assert summary.per_step[0].image_tokens == 64
    assert est.dense_flops * 2 == summary.dense_flops  # two class labels: a batch of 2 (integer-valued sums)
    assert fastdiff.estimate(pipe, height=16, width=16, steps=steps, batch=2).dense_flops == summary.dense_flops
    assert fastdiff.estimate(pipe, "merge-tome", height=16, width=16, steps=steps).speedup > 1.1
    with pytest.raises(fastdiff.ConfigError, match=r"height 15 makes no whole token grid: it must be a multiple of 2 "
                                                   r"\(latent scale 1 of ClassDiTPipeline"):
        fastdiff.estimate(pipe, height=15, width=16, steps=steps)


# -- per-block accounting ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_block_flops_accounting(family):
    model = denoiser(family)
    adapter = adapters.resolve(model)
    cost = CostModel(adapter)
    layout = adapter.layout(adapter.bind((), tiny.denoiser_inputs(family, batch_size=1)))
    per = cost.block_flops(layout)
    assert len(per) == len(adapter.blocks) + 1
    assert all(f >= 0 for f in per)
    assert all(f > 0 for f in per[:-1])  # every block runs matmuls or convs
    assert sum(per) == cost.call_flops(layout) == cost.call_flops(layout, 3) / 3


def _attention_flops(cost, layout):
    return [cost.term_flops(t, layout) for t in cost.terms if t.kind == "attention"]


def test_attention_terms_scale_quadratically():
    cost = CostModel(adapters.resolve(denoiser("dit")))
    small, double = TokenLayout((1, 4, 4)), TokenLayout((1, 4, 8))
    assert double.image_tokens == 2 * small.image_tokens
    attn_small, attn_double = _attention_flops(cost, small), _attention_flops(cost, double)
    assert len(attn_small) == len(denoiser("dit").transformer_blocks) > 0
    for a, b in zip(attn_small, attn_double):
        assert a > 0 and b > 2 * a
        assert b == pytest.approx(4 * a)  # image-only self-attention: Nq * Nk
    # per-token layers only double, so the whole call grows by more than 2x but less than 4x
    linear = [(cost.term_flops(t, small), cost.term_flops(t, double)) for t in cost.terms
              if t.kind != "attention" and t.stream == "image"]
    assert linear and all(b == 2 * a for a, b in linear)
    total_small, total_double = cost.call_flops(small), cost.call_flops(double)
    assert 2 * total_small < total_double < 4 * total_small


def test_attention_with_text_grows_faster_than_tokens():
    # SD3 joint attention over image + text tokens: doubling the image tokens more than doubles attention
    cost = CostModel(adapters.resolve(denoiser("sd3")))
    small = TokenLayout((1, 4, 4), tiny.TEXT_LEN, "last")
    double = TokenLayout((1, 4, 8), tiny.TEXT_LEN, "last")
    n_small, n_double = 16 + tiny.TEXT_LEN, 32 + tiny.TEXT_LEN
    for a, b in zip(_attention_flops(cost, small), _attention_flops(cost, double)):
        assert b > 2 * a
        assert b / a == pytest.approx((n_double / n_small) ** 2)
