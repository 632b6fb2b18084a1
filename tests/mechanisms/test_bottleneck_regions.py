"""Region-adaptive upsampling (a bottleneck region stage): the exact parts exactly (edge selection and positions by
hand, tokens/place inverse, fraction 0 and 1 = the plain stages bit for bit), then the mode end to end on a tiny FLUX
pipeline (seeded random weights) and on ref-flux: output, remove(), batch rows, caching inside, refusals."""

import dataclasses

import pytest
import torch

import fastdiff
from fastdiff.errors import ConfigError, UnsupportedModelError
from fastdiff.eval import tiny
from fastdiff.mechanisms.bottleneck import regions, resample
from fastdiff.mechanisms.bottleneck.schedule import Stage

from ..conftest import module_snapshot


def test_edge_selection_by_hand():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1.0  # a vertical step between latent columns 3 and 4
    score = regions.edge_score(x, 2)
    # Sobel d/dx is 1 + 2 + 1 = 4 on columns 3 and 4 (replicate padding: d/dy is 0); a 2x2 cell sums two rows of it
    expected = torch.zeros(1, 4, 4)
    expected[..., 1:3] = 8.0
    assert torch.equal(score, expected)
    # the top quarter of 16 cells is 4 of the 8 tied ones: the first in row-major order
    mask = regions.select(score, regions.fine_count(0.25, 16))
    assert mask[0].nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert regions.select(score, 8)[0].equal(expected[0] > 0)


def test_fine_count_keeps_a_mixed_set_mixed():
    assert [regions.fine_count(r, 16) for r in (0, 0.01, 0.3, 0.99, 1)] == [0, 1, 5, 15, 16]


def test_mixed_positions_by_hand():
    cells = torch.tensor([[True, False], [False, False]])  # a 4x4 full-size token grid in 2x2 cells
    pos = regions.positions(cells)
    coarse = [[0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]  # the centre of the 2x2 each coarse token covers
    fine = [[0, 0], [0, 1], [1, 0], [1, 1]]  # the upsampled cell's tokens at their full-size positions
    assert pos.tolist() == coarse + fine


def test_tokens_undo_place_exactly_and_the_cells_read_back():
    p, (h, w) = 2, (8, 12)
    cells = torch.zeros(3, 2, 3, dtype=torch.bool)
    cells[0, 0, 1] = cells[1, 1, 2] = cells[2, 0, 0] = True
    y = torch.randn(3, 5 + 4, 4 * 4)  # 5 coarse cells + 1 fine cell's 4 tokens, 4 channels x 2 x 2 packed
    full = regions.place(y, cells, p, (h, w))
    assert torch.equal(regions.tokens(full, cells, p), y)
    assert torch.equal(regions.read_cells(full, p), cells)
    # a coarse cell holds its token nearest-upsampled: the pick of the block is the token
    low = resample.pack(resample.pick(full, 2), p)
    assert torch.equal(low[0, 0], y[0, 0])


# -- on a tiny FLUX pipeline ------------------------------------------------------------------------------------

def _stages(middle):
    return {"bottleneck": {"stages": [{"scale": 2, "steps": 2}, {"steps": 2, "strength": 0.8, **middle},
                                      {"scale": 1, "steps": 2, "strength": 0.6}]}}


def _regions(r):
    return _stages({"scale": 2, "regions": r})


def _call(batch=1, **kw):
    return tiny.pipeline_kwargs("flux", steps=6, batch_size=batch) | {"height": 32, "width": 32} | kw


@pytest.fixture(scope="module")
def flux():
    pipe = tiny.build_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny.output_tensor(pipe(**_call()))


def _run(pipe, cfg, **kw):
    with fastdiff.accelerated(pipe, cfg) as h:
        out = tiny.output_tensor(pipe(**_call(**kw)))
        return out, h.summary()


def test_fraction_0_and_1_are_the_plain_stages_exactly(flux):
    pipe, _ = flux
    low, _ = _run(pipe, _regions(0))
    assert torch.equal(low, _run(pipe, _stages({"scale": 2}))[0])  # the region stage is a plain scale-2 stage
    full, _ = _run(pipe, _regions(1))
    assert torch.equal(full, _run(pipe, _stages({"scale": 1}))[0])  # ... a plain full-size stage: an earlier switch


def test_a_mixed_stage_runs_end_to_end_and_is_priced(flux):
    pipe, base = flux
    out, s = _run(pipe, _regions(0.3))
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()
    # 16 half-size tokens, then 16 - 5 coarse + 5 x 4 fine, then 64
    assert [(r.stage, r.image_tokens) for r in s.per_step] == [(0, 16)] * 2 + [(1, 31)] * 2 + [(2, 64)] * 2
    assert s.mechanisms["bottleneck"]["stages"][1] == dict(scale=2, strength=0.8, regions=0.3, tokens=31)
    est = fastdiff.estimate(pipe, _regions(0.3), height=32, width=32, steps=6, text_tokens=8)
    assert s.flops == pytest.approx(est.flops, rel=1e-9) and s.dense_flops == pytest.approx(est.dense_flops, rel=1e-9)
    assert est.speedup > fastdiff.estimate(pipe, _regions(1), height=32, width=32, steps=6, text_tokens=8).speedup
    assert torch.equal(_run(pipe, _regions(0.3))[0], out)  # deterministic
    assert torch.equal(tiny.output_tensor(pipe(**_call())), base)  # removed: bit-identical


def test_batch_rows_are_independent(flux):
    pipe, _ = flux
    with fastdiff.accelerated(pipe, _regions(0.3)) as h:
        both = tiny.output_tensor(pipe(**_call(batch=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])))
        # the rows' regions differ: the region stage calls the transformer per row, in each CFG branch
        assert [r.ctx.batch_size for r in h.records if r.ctx.stage == 1] == [1] * 8
    kw = _call(batch=2)
    one = {k: (v[1:] if torch.is_tensor(v) and v.ndim and v.shape[0] == 2 else v) for k, v in kw.items()}
    with fastdiff.accelerated(pipe, _regions(0.3)):
        alone = tiny.output_tensor(pipe(**one | {"generator": [torch.Generator().manual_seed(1)]}))
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_caching_runs_inside_the_mixed_stage_and_the_estimate_agrees(flux):
    pipe, _ = flux
    cfg = {"bottleneck": {"stages": [{"scale": 2, "steps": 2}, {"scale": 2, "steps": 3, "strength": 0.8, "regions": 0.3},
                                     {"scale": 1, "steps": 1, "strength": 0.6}]},
           "cache": {"policy": "static", "interval": 2, "warmup": 1, "cooldown": 0}}
    out, s = _run(pipe, cfg)
    # the mixed set is its own grid: its first step computes, then the static schedule reuses within it
    assert [r.decisions[0] for r in s.per_step if r.stage == 1] == ["cache=compute", "cache=compute", "cache=reuse"]
    assert torch.isfinite(out).all()
    est = fastdiff.estimate(pipe, cfg, height=32, width=32, steps=6, text_tokens=8)
    assert s.flops == pytest.approx(est.flops, rel=1e-9)  # the mixed grid is its own state key in both
    with pytest.raises(ConfigError, match="no rectangular grid"):
        fastdiff.estimate(pipe, {**_regions(0.3), "merge": {"method": "tome", "ratio": 0.5}}, height=32, width=32,
                          steps=6, text_tokens=8)


def test_guidance_skipping_runs_inside_the_mixed_stage_one_image_per_call(flux):
    pipe, _ = flux
    cfg = {**_regions(0.3), "guidance": {"mode": "step", "start": 0.3}}
    out, s = _run(pipe, cfg)
    assert torch.isfinite(out).all()
    # the mixed set is its own grid: its first step measures the branches' difference, the next skips
    assert [any("guidance=skip-uncond" in d for d in r.decisions) for r in s.per_step if r.stage == 1] == [False, True]
    # two images with their own regions are two calls a branch: guidance skipping cannot pair them
    with fastdiff.accelerated(pipe, cfg):
        with pytest.raises(ConfigError, match="guidance skipping cannot pair"):
            pipe(**_call(batch=2))


def test_refusals_before_anything_is_touched(flux):
    pipe, base = flux
    before = module_snapshot(pipe.transformer, pipe.scheduler)
    for extra, match in (({"merge": {"method": "tome", "ratio": 0.5}}, r"\['merge'\] need one"),
                         ({"sparse": {}}, r"\['sparse'\] need one")):
        with pytest.raises(ConfigError, match=match):
            fastdiff.apply(pipe, {**_regions(0.3), **extra})
        assert module_snapshot(pipe.transformer, pipe.scheduler) == before and fastdiff.session_of(pipe) is None
    sd3 = tiny.build_pipeline("sd3")
    with pytest.raises(UnsupportedModelError, match=r"SD3Transformer2DModel: .*region stage.*'sd3'.*supported "
                                                    r"families: \['flux'\]"):
        fastdiff.apply(sd3, _regions(0.3))
    assert fastdiff.session_of(sd3) is None
    # three images with true CFG would make six calls in a step of the region stage: refused at the first step
    with fastdiff.accelerated(pipe, _regions(0.3)):
        with pytest.raises(ConfigError, match="at most 2 images per call"):
            pipe(**_call(batch=3))
    assert torch.equal(tiny.output_tensor(pipe(**_call())), base)


@pytest.mark.parametrize("stages, match", [
    ([{"scale": 2, "steps": 0.5, "regions": 0.3}, {"scale": 1, "steps": 0.5}], "needs a stage before it"),
    ([{"scale": 2, "steps": 0.3}, {"scale": 1, "steps": 0.3, "regions": 0.3}, {"scale": 1, "steps": 0.4}],
     "is at scale 2"),
    ([{"scale": 2, "steps": 0.3}, {"scale": 2, "steps": 0.3, "regions": 1.5}, {"scale": 1, "steps": 0.4}],
     r"regions must be a fraction in \[0, 1\]"),
    ([{"scale": 2, "steps": 0.3}, {"scale": 2, "steps": 0.3, "regions": 0.3}, {"scale": 2, "steps": 0.2},
      {"scale": 1, "steps": 0.2}], "stage after a region stage must be at scale 1"),
    ([{"scale": 2, "steps": 0.2}, {"scale": 2, "steps": 0.2, "regions": 0.3}, {"scale": 1, "steps": 0.2},
      {"scale": 2, "steps": 0.2, "regions": 0.3}, {"scale": 1, "steps": 0.2}], "at most one region stage"),
])
def test_bad_region_stages_are_refused(stages, match):
    with pytest.raises(ConfigError, match=match):
        fastdiff.load_config({"bottleneck": {"stages": stages}})


def test_the_driver_checks_its_region_stage_too():
    with pytest.raises(ConfigError, match="needs a stage before it"):
        regions.RegionDriver((Stage(2, 0.5), Stage(1, 0.5)), region=0, fraction=0.3, positions=lambda b, g: {})


def test_config_names_what_the_mechanism_implements():
    from fastdiff import config

    assert set(config.BOTTLENECK_STAGE_KEYS) == {f.name for f in dataclasses.fields(Stage)} | {"regions"}


# -- on ref-flux ----------------------------------------------------------------------------------------------

def test_ref_flux_runs_a_mixed_stage():
    from fastdiff.eval import reference

    pipe = reference.load("ref-flux")
    pipe.set_progress_bar_config(disable=True)
    kw = lambda: dict(class_labels=[3], num_inference_steps=6, guidance_scale=3.0,  # noqa: E731
                      generator=torch.Generator().manual_seed(0), output_type="pt")
    base = pipe(**kw()).images
    cfg = {"bottleneck": {"stages": [{"scale": 2, "steps": 2}, {"scale": 2, "steps": 2, "strength": 0.8,
                                                                "regions": 0.3}, {"scale": 1, "steps": 2,
                                                                                  "strength": 0.6}]}}
    with fastdiff.accelerated(pipe, cfg) as h:
        out = pipe(**kw()).images
        s = h.summary()
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()
    tokens = [r.image_tokens for r in s.per_step]
    assert tokens[0] * 4 == tokens[-1] and tokens[0] < tokens[2] < tokens[-1]
    assert torch.equal(pipe(**kw()).images, base)
