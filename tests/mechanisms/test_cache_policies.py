"""Caching policies and estimators: worked out by hand on analytic blocks, then end to end on every
family's tiny model (never-reuse settings are bit-identical, remove() is exact, nothing leaks)."""

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny
from fastdiff.mechanisms.caching import estimators

from ..adapters.facts import OUTPUT_REUSE
from ..adapters.test_families import _sample, _seeded, run
from ..unit.toy import FakePipeline, ShiftDenoiser, ToyDenoiser


# -- estimators, by hand ------------------------------------------------------------------------------
def _leaf(v):
    return [torch.full((2, 3), float(v)), None]


@pytest.mark.parametrize("est", [estimators.Taylor(1), estimators.Taylor(2), estimators.FoCa()])
def test_forecasts_are_exact_on_features_linear_in_the_step(est):
    for s in (0, 2, 3):  # uneven gaps, as dynamic policies leave them
        est.push(s, _leaf(5 - 1.5 * s))
    for s in (4, 5, 9):
        out = est.predict(s)
        torch.testing.assert_close(out[0], torch.full((2, 3), 5 - 1.5 * s), rtol=1e-6, atol=1e-6)
        assert out[1] is None


def test_taylor_order_two_is_exact_on_quadratics_and_foca_halves_the_bend():
    f = lambda s: 1 + 2 * s - 0.5 * s * s  # noqa: E731
    t2, foca = estimators.Taylor(2), estimators.FoCa()
    for s in (0, 1, 3):
        t2.push(s, _leaf(f(s)))
        foca.push(s, _leaf(f(s)))
    assert t2.predict(5)[0][0, 0].item() == pytest.approx(f(5))
    # FoCa by hand: d_k = (f(3) - f(1)) / 2, d_{k-1} = f(1) - f(0), F = f(3) + h (5 d_k - d_{k-1}) / 4
    d0, d1, h = (f(3) - f(1)) / 2, f(1) - f(0), 2
    assert foca.predict(5)[0][0, 0].item() == pytest.approx(f(3) + h * (5 * d0 - d1) / 4)


def test_reuse_keeps_one_step_and_offload_round_trips():
    est = estimators.Reuse(offload=True)
    est.push(0, _leaf(1))
    est.push(1, _leaf(2))
    assert len(est.history) == 1 and est.nbytes() == 2 * 3 * 4
    assert torch.equal(est.predict(7)[0], torch.full((2, 3), 2.0))


# -- policies on analytic blocks ----------------------------------------------------------------------
def test_taylor_forecast_of_a_linear_residual_is_exact_end_to_end():
    # each block adds t/1000 and the timesteps are evenly spaced: the span residual is linear in the step
    pipe = FakePipeline(ShiftDenoiser(n_blocks=3))
    base = pipe(steps=7)
    with fastdiff.accelerated(pipe, cache={"interval": 2, "estimator": "taylor", "order": 1}) as h:
        forecast = pipe(steps=7)
        s = h.summary()
    with fastdiff.accelerated(pipe, cache={"interval": 2}):
        stale = pipe(steps=7)
    assert [r.blocks_computed for r in s.per_step] == [3, 3, 0, 3, 0, 3, 0]
    assert ["cache=forecast" in r.decisions for r in s.per_step] == [False, False, True, False, True, False, True]
    torch.testing.assert_close(forecast, base, rtol=1e-6, atol=1e-6)
    assert (stale - base).abs().max() > 1e-3  # reusing the stale residual is not exact here


def _residual_policy_by_hand(steps, threshold, max_skip, n_blocks=3):
    """The residual policy on Double blocks with head=1, replayed with scalars: x is a multiple of ones."""
    x, prev_sig, acc, cached, consecutive, decisions = 1.0, None, 0.0, None, 0, []
    for step in range(steps):
        sig = x  # head residual: 2x - x
        rel = None if prev_sig is None else abs(sig - prev_sig) / abs(prev_sig)
        prev_sig = sig
        reuse = False
        if step >= 1 and cached is not None and rel is not None and not (max_skip and consecutive >= max_skip):
            acc += rel
            reuse = acc < threshold
        if reuse:
            consecutive += 1
            eps = 2 * x + cached
        else:
            eps = 2 ** n_blocks * x
            cached, acc, consecutive = eps - 2 * x, 0.0, 0
        decisions.append("R" if reuse else "C")
        x = x - 0.01 * eps
    return x, decisions


@pytest.mark.parametrize("threshold,max_skip", [(0.1, 0), (0.2, 0), (0.5, 0), (0.5, 2), (0.0, 0)])
def test_residual_policy_matches_a_hand_replay(threshold, max_skip):
    pipe = FakePipeline(ToyDenoiser(n_blocks=3))
    cfg = {"policy": "residual", "head": 1, "threshold": threshold, "max_skip": max_skip}
    with fastdiff.accelerated(pipe, cache=cfg) as h:
        out = pipe(steps=8)
        s = h.summary()
    x, decisions = _residual_policy_by_hand(8, threshold, max_skip)
    got = ["R" if "cache=reuse" in r.decisions else "C" for r in s.per_step]
    assert got == decisions
    torch.testing.assert_close(out, torch.full_like(out, x), rtol=1e-5, atol=0)
    assert [r.blocks_computed for r in s.per_step] == [1 if d == "R" else 3 for d in decisions]
    if threshold > 0.1:
        assert "R" in decisions


def test_delta_dit_caches_rear_blocks_early_and_front_blocks_late():
    pipe = FakePipeline(ToyDenoiser(n_blocks=4))
    cfg = {"policy": "delta", "interval": 2, "boundary": 0.5, "stage_blocks": 0.5}
    with fastdiff.accelerated(pipe, cache=cfg) as h:
        pipe(steps=8)
        ran = [sorted(r.blocks) for r in h.records]
        s = h.summary()
    assert ran == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3], [0, 1], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3], [2, 3]]
    est = fastdiff.estimate(FakePipeline(ToyDenoiser(n_blocks=4)), cache=cfg, height=4, width=4, steps=8, cfg=False)
    assert est.flops == pytest.approx(s.flops, rel=1e-12)


def test_easycache_reuses_once_the_rate_is_known_and_not_at_threshold_zero():
    pipe = FakePipeline(ToyDenoiser(n_blocks=3))
    with fastdiff.accelerated(pipe, cache={"policy": "easycache", "threshold": 0.3}) as h:
        pipe(steps=8)
        got = ["R" if "cache=reuse" in r.decisions else "C" for r in h.summary().per_step]
    assert got[:2] == ["C", "C"]  # the transformation rate needs two computed steps
    assert "R" in got
    base = pipe(steps=8)
    with fastdiff.accelerated(pipe, cache={"policy": "easycache", "threshold": 0.0}):
        assert torch.equal(pipe(steps=8), base)


# -- every policy on every family ---------------------------------------------------------------------
POLICIES = {
    "residual": {"policy": "residual", "head": 1, "threshold": 0.6, "max_skip": 2},
    "easycache": {"policy": "easycache", "threshold": 0.5},
    "delta": {"policy": "delta", "interval": 2},
    "taylor2": {"policy": "static", "interval": 3, "estimator": "taylor", "order": 2},
    "foca": {"policy": "static", "interval": 3, "estimator": "foca", "offload": True},
}
UNET = OUTPUT_REUSE  # blocks a cache replays by their output (DeepCache): easycache and delta are refused


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_pipe(request):
    pipe = tiny.build_pipeline(request.param)
    return request.param, pipe, run(pipe, request.param, steps=8)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_runs_end_to_end_and_remove_is_exact(family_pipe, policy):
    family, pipe, base = family_pipe
    cfg = POLICIES[policy]
    if family in UNET and policy in ("easycache", "delta"):
        with pytest.raises(fastdiff.UnsupportedModelError, match="UNet2DConditionModel.*static"):
            fastdiff.apply(pipe, cache=cfg)
        assert torch.equal(run(pipe, family, steps=8), base)  # the refusal touched nothing
        return
    with fastdiff.accelerated(pipe, cache=cfg) as h:
        a = run(pipe, family, steps=8)
        b = run(pipe, family, steps=8)
        s = h.summary()
    assert torch.equal(a, b)  # the second run starts from a clean cache
    assert torch.isfinite(a).all()
    assert torch.equal(run(pipe, family, steps=8), base)
    reused = sum("cache=reuse" in r.decisions or "cache=forecast" in r.decisions for r in s.per_step)
    if policy in ("delta", "taylor2", "foca"):  # schedules fixed in advance always skip
        assert reused > 0 and s.estimated_speedup > 1.1
    assert s.mechanisms["cache"]["cache_peak_bytes"] > 0


@pytest.mark.parametrize("cfg", [{"policy": "residual", "head": 1, "threshold": 0.0},
                                 {"policy": "easycache", "threshold": 0.0}, {"policy": "delta", "interval": 1}])
def test_never_reuse_settings_are_bit_identical(family_pipe, cfg):
    family, pipe, base = family_pipe
    if family in UNET and cfg["policy"] != "residual":
        pytest.skip("refused for UNets (tested above)")
    with fastdiff.accelerated(pipe, cache=cfg) as h:
        assert torch.equal(run(pipe, family, steps=8), base)
        assert all("cache=compute" in r.decisions for r in h.summary().per_step)


@pytest.mark.parametrize("family", ["dit", "flux", "sd15", "cogvideox"])
def test_dynamic_batch_rule_never_mixes_rows(family):
    # The decision is shared by a call's rows (the most-changed row decides); storage is per row. Two copies
    # of one sample in a batch therefore give exactly that sample's result and decisions.
    pipe = tiny.build_pipeline(family)
    cfg = {"cache": {"policy": "residual", "head": 1, "threshold": 0.6, "max_skip": 2}}
    kw = tiny.pipeline_kwargs(family, batch_size=2, steps=6)
    with torch.no_grad(), fastdiff.accelerated(pipe, **cfg) as h:
        alone = tiny.output_tensor(pipe(**_sample(_seeded(kw), 0, 2)))
        d_alone = [r.decisions for r in h.summary().per_step]
        both = tiny.output_tensor(pipe(**_twice(kw)))
        d_both = [r.decisions for r in h.summary().per_step]
    assert d_alone == d_both
    for i in range(2):  # tolerances cover batch-size numerics (2e-5 on sd15); a mixed row would be O(1) off
        torch.testing.assert_close(both[i: i + 1], alone, rtol=1e-3, atol=1e-4)


def _twice(kw):
    """A batch of two copies of sample 0 of `kw` (a batch-2 call)."""
    out = {}
    for key, value in kw.items():
        if key == "generator":
            out[key] = [torch.Generator().manual_seed(11) for _ in range(2)]
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2:
            out[key] = torch.cat([value[:1], value[:1]])
        elif isinstance(value, list) and len(value) == 2:
            out[key] = [value[0], value[0]]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("family", ["flux", "wan", "sd3", "dit"])
def test_static_schedules_keep_batch_rows_and_cfg_branches_apart(family):
    pipe = tiny.build_pipeline(family)
    kw = tiny.pipeline_kwargs(family, batch_size=2, steps=6)
    for cfg in ({"policy": "delta", "interval": 2}, {"policy": "static", "interval": 3, "estimator": "foca"}):
        with torch.no_grad(), fastdiff.accelerated(pipe, cache=cfg):
            both = tiny.output_tensor(pipe(**_seeded(kw)))
            alone = [tiny.output_tensor(pipe(**_sample(_seeded(kw), i, 2))) for i in range(2)]
        for i in range(2):
            torch.testing.assert_close(both[i: i + 1], alone[i], rtol=1e-3, atol=1e-4)


def test_blocks_compiled_with_torch_compile_do_not_recompile_per_step():
    from torch._dynamo.utils import counters

    pipe = tiny.build_pipeline("dit")
    with fastdiff.accelerated(pipe, cache={"policy": "residual", "head": 1, "threshold": 0.5, "estimator": "taylor"}):
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend="eager")
        try:
            torch._dynamo.reset()
            counters.clear()
            run(pipe, "dit", steps=8)  # compute, reuse and forecast paths all seen: a handful of graphs
            first = dict(counters["stats"])
            run(pipe, "dit", steps=16)  # twice the steps, other step indices: no new graph
            assert dict(counters["stats"]) == first and 1 <= first["unique_graphs"] <= 8
            assert not counters["recompiles"]
        finally:
            for block in pipe.transformer.transformer_blocks:
                block._compiled_call_impl = None
            torch._dynamo.reset()


def test_bad_combinations_are_refused_before_touching_the_model():
    pipe = tiny.build_pipeline("dit")
    for bad, err in [({"policy": "residual", "head": 0}, fastdiff.ConfigError),
                     ({"order": 3}, fastdiff.ConfigError), ({"estimator": "magic"}, fastdiff.ConfigError),
                     ({"rescale": [1.0, 0.0]}, fastdiff.ConfigError),
                     ({"head": 2, "tail": 2}, fastdiff.UnsupportedModelError)]:
        with pytest.raises(err):
            fastdiff.apply(pipe, cache=bad)
        assert "_fastdiff_session" not in pipe.transformer.__dict__
