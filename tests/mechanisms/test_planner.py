"""The planner turns a target speedup into a config: from the cost model for fixed schedules, by tuning the
threshold on the user's own call for adaptive policies."""

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny

from ..unit.toy import FakePipeline, ToyDenoiser


def test_static_plan_comes_from_the_cost_model_without_running_the_model():
    pipe = tiny.build_pipeline("pixart")
    p = fastdiff.plan(pipe, {"cache": {"policy": "static", "warmup": 1, "cooldown": 1}}, target=2.0, height=32, width=32,
                      steps=20)
    assert p.runs == 0 and p.knob == "cache.interval" and p.config.cache.interval == p.value
    est = fastdiff.estimate(pipe, p.config, height=32, width=32, steps=20)
    assert est.speedup == pytest.approx(p.speedup) and abs(p.speedup - 2.0) < 0.35


def test_adaptive_plan_tunes_the_threshold_on_the_call_and_reaches_the_target():
    pipe = tiny.build_pipeline("wan")
    kw = lambda: tiny.pipeline_kwargs("wan", steps=12)  # noqa: E731
    base = {"cache": {"policy": "residual", "head": 1, "max_skip": 3}}
    with torch.no_grad():
        p = fastdiff.plan(pipe, base, target=1.4, call=lambda: pipe(**kw()))
        with fastdiff.accelerated(pipe, p.config) as h:
            pipe(**kw())
            measured = h.summary().estimated_speedup
    assert p.knob == "cache.threshold" and 1 <= p.runs <= 10
    assert measured == pytest.approx(p.speedup) and abs(measured - 1.4) <= 0.1 * 1.4
    assert fastdiff.session_of(pipe) is None  # tuning runs leave nothing applied


def test_plan_refuses_what_it_cannot_plan():
    pipe = FakePipeline(ToyDenoiser())
    with pytest.raises(fastdiff.ConfigError, match="call"):
        fastdiff.plan(pipe, {"cache": {"policy": "easycache"}}, target=2.0)
    with pytest.raises(fastdiff.ConfigError, match="target"):
        fastdiff.plan(pipe, {"cache": {}}, target=0.5)
    with pytest.raises(fastdiff.ConfigError, match="cache"):
        fastdiff.plan(pipe, {}, target=2.0)


def test_calibrate_fits_the_signal_to_output_change_map():
    # Shift blocks add t/1000: the first block's residual and the span's residual change by the same
    # relative amount each step, so the fitted map is the identity.
    from ..unit.toy import ShiftDenoiser

    pipe = FakePipeline(ShiftDenoiser(n_blocks=3))
    coeffs = fastdiff.calibrate(pipe, lambda: pipe(steps=10), degree=1)
    assert coeffs == pytest.approx([1.0, 0.0], abs=1e-5)
    with fastdiff.accelerated(pipe, cache={"policy": "residual", "head": 1, "threshold": 0.5, "rescale": coeffs}) as h:
        pipe(steps=10)
        assert any("cache=reuse" in r.decisions for r in h.summary().per_step)
    with pytest.raises(fastdiff.ConfigError, match="too few"):
        fastdiff.calibrate(pipe, lambda: pipe(steps=2), degree=2)
