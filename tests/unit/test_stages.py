"""Stages: a driver's `begin_stage` makes one run of several stages (resolution-bottleneck sampling), with the global
step counting on, summary() holding every stage, and `fastdiff.estimate` of the stage schedule equal to the run."""

import pytest
import torch

import fastdiff
from fastdiff.context import RunState
from fastdiff.eval import tiny

from .test_clock import contexts
from .toy import ToyDenoiser

STATIC = {"telemetry": {"enabled": True},
          "cache": {"policy": "static", "interval": 2, "warmup": 1, "cooldown": 1, "estimator": "reuse"}}


def _flux(pipe, size, steps):
    kw = tiny.pipeline_kwargs("flux", cfg=False, steps=steps) | {"height": size, "width": size}
    with torch.no_grad():
        return tiny.output_tensor(pipe(**kw))


def test_two_stage_flux_run_is_one_run_and_its_estimate_is_its_accounting():
    pipe = tiny.build_pipeline("flux")
    with fastdiff.accelerated(pipe, STATIC) as h:
        h.begin_stage(run_steps=8, new_run=True)  # the driver knows the whole schedule
        _flux(pipe, 8, 4)  # low resolution: 2x2 tokens
        h.begin_stage()
        _flux(pipe, 16, 4)  # full resolution: 4x4 tokens, its own set_timesteps
        records, s = list(h.records), h.summary()
    ctxs = [r.ctx for r in records]
    assert [(c.run, c.stage, c.step, c.stage_step, c.stage_steps, c.num_steps) for c in ctxs] == \
        [(0, 0, i, i, 4, 8) for i in range(4)] + [(0, 1, 4 + i, i, 4, 8) for i in range(4)]
    assert [c.layout.grid for c in ctxs] == [(1, 2, 2)] * 4 + [(1, 4, 4)] * 4
    # warm-up at step 0, every 2nd step after it, cool-down at the run's last; the new grid's first step computes
    assert [r.decisions["cache"] for r in records] == \
        ["compute", "compute", "reuse", "compute", "compute", "compute", "reuse", "compute"]
    assert (s.run, s.stages, s.steps, s.num_steps) == (0, 2, 8, 8)
    assert [(r.step, r.stage, r.stage_step, r.image_tokens) for r in s.per_step] == \
        [(i, 0, i, 4) for i in range(4)] + [(4 + i, 1, i, 16) for i in range(4)]
    assert "2 stages" in str(s)
    stages = [{"height": 8, "width": 8, "steps": 4}, {"height": 16, "width": 16, "steps": 4}]
    est = fastdiff.estimate(pipe, STATIC, stages=stages, cfg=False, text_tokens=s.per_step[0].text_tokens)
    assert est.flops == s.flops and est.dense_flops == s.dense_flops  # the same sums, term for term
    assert est.steps == 8 and [(lay.grid, n) for lay, n in est.stages] == [((1, 2, 2), 4), ((1, 4, 4), 4)]
    # without the driver the second call is a new run, as before
    with fastdiff.accelerated(pipe, STATIC) as h:
        _flux(pipe, 8, 4)
        _flux(pipe, 16, 4)
        assert [(r.ctx.run, r.ctx.stage, r.ctx.step) for r in h.records] == [(1, 0, i) for i in range(4)]


def test_begin_stage_on_a_bare_denoiser_overrides_the_new_run_signals():
    model = ToyDenoiser()
    small, large = torch.ones(1, 1, 2, 2), torch.ones(1, 1, 4, 4)
    with fastdiff.accelerated(model) as h:
        def go():
            h.begin_stage(2, run_steps=5, new_run=True)
            model(small, timestep=900)
            model(small, timestep=800)
            h.begin_stage(3)
            for t in (950, 600, 300):  # a timestep above the last and a new shape: the stage's, not a new run's
                model(large, timestep=t)
            model(large, timestep=999)  # no driver: a new run
            h.begin_stage()  # a stage of a reset run is a new run
            fastdiff.reset(model)
            model(large, timestep=999)
        ctxs = contexts(h, go)
    assert [(c.run, c.stage, c.step, c.stage_step, c.stage_steps, c.num_steps) for c in ctxs] == [
        (0, 0, 0, 0, 2, 5), (0, 0, 1, 1, 2, 5), (0, 1, 2, 0, 3, 5), (0, 1, 3, 1, 3, 5), (0, 1, 4, 2, 3, 5),
        (1, 0, 0, 0, None, None), (2, 0, 0, 0, None, None)]


def test_begin_stage_refuses_bad_steps():
    h = fastdiff.apply(ToyDenoiser())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(fastdiff.FastDiffError, match="num_steps must be a positive int"):
            h.begin_stage(bad)
    h.remove()


def test_stage_rule_keeps_state_of_the_same_grid_only():
    st = RunState()
    a = st.get("cache", 0, (1, 2, 2), dict)
    st.enter_stage(0, 0, (1, 2, 2))
    st.enter_stage(0, 1, (1, 2, 2))  # another stage on the same grid: kept
    assert st.get("cache", 0, (1, 2, 2), dict) is a
    st.enter_stage(0, 2, (1, 4, 4))  # another grid: dropped
    assert st.states == {} and st.get("cache", 0, (1, 2, 2), dict) is not a


def test_estimate_refuses_stages_with_a_size():
    pipe = tiny.build_pipeline("flux")
    with pytest.raises(fastdiff.ConfigError, match="either stages"):
        fastdiff.estimate(pipe, stages=[{"height": 8, "width": 8, "steps": 2}], height=8)
    with pytest.raises(fastdiff.ConfigError, match="unknown key"):
        fastdiff.estimate(pipe, stages=[{"height": 8, "width": 8, "steps": 2, "frames": 1}])
    with pytest.raises(fastdiff.ConfigError, match="steps must be"):
        fastdiff.estimate(pipe, stages=[{"height": 8, "width": 8, "steps": 0}])
