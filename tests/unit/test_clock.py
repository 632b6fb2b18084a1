"""The step clock on an analytic toy denoiser: runs, steps and calls read from timesteps or the scheduler."""

import inspect

import pytest
import torch

import fastdiff
from fastdiff.errors import FastDiffError
from fastdiff.hooks import HookSet

from .toy import FakePipeline, ToyDenoiser


def contexts(handle, fn):
    """Run fn() and return the StepContexts of the denoiser calls it made."""
    seen = []
    hooks = HookSet()
    hooks.wrap(handle.adapter.blocks[0].module, "test.spy",
               lambda inner, a, k: (seen.append(handle.current), inner(*a, **k))[1])
    try:
        fn()
    finally:
        hooks.remove()
    return seen


def test_timestep_heuristic_steps_calls_and_runs():
    model = ToyDenoiser()
    x = torch.ones(1, 1, 2, 2)
    with fastdiff.accelerated(model) as h:
        ctxs = contexts(h, lambda: [model(x, timestep=t) for t in (900, 900, 800, 800, 700, 950, 100)])
    assert [(c.run, c.step, c.call) for c in ctxs] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0),  # two calls per step (separate CFG)
        (1, 0, 0), (1, 1, 0),  # the timestep went up: a new run
    ]
    assert all(c.num_steps is None for c in ctxs)
    assert ctxs[0].layout.grid == (1, 2, 2) and ctxs[0].branches == ("?",)


def test_new_latent_shape_starts_a_new_run():
    model = ToyDenoiser()
    with fastdiff.accelerated(model) as h:
        ctxs = contexts(h, lambda: [model(torch.ones(1, 1, 2, 2), timestep=900),
                                    model(torch.ones(1, 1, 2, 2), timestep=800),
                                    model(torch.ones(1, 1, 4, 4), timestep=700)])
    assert [(c.run, c.step) for c in ctxs] == [(0, 0), (0, 1), (1, 0)]


def test_reset_starts_a_new_run():
    model = ToyDenoiser()
    x = torch.ones(1, 1, 2, 2)
    with fastdiff.accelerated(model) as h:
        def go():
            model(x, timestep=900)
            fastdiff.reset(model)
            model(x, timestep=800)
        ctxs = contexts(h, go)
    assert [(c.run, c.step) for c in ctxs] == [(0, 0), (1, 0)]


def test_scheduler_drives_steps_even_for_second_order_samplers():
    pipe = FakePipeline(ToyDenoiser())
    base = pipe(steps=4, heun=True)
    with fastdiff.accelerated(pipe) as h:
        ctxs = contexts(h, lambda: (pipe(steps=4, heun=True), pipe(steps=3)))
        out = pipe(steps=4, heun=True)
    # Heun repeats timesteps (t1, t1, t2, t2, ...): the timestep alone would call those CFG branches.
    assert [(c.run, c.step, c.call) for c in ctxs[:7]] == [(0, i, 0) for i in range(7)]
    assert [(c.run, c.step, c.num_steps) for c in ctxs[7:]] == [(1, 0, 3), (1, 1, 3), (1, 2, 3)]
    assert torch.equal(out, base)


def test_scheduler_hooks_keep_signatures_and_are_removed():
    pipe = FakePipeline(ToyDenoiser())
    step_sig = inspect.signature(pipe.scheduler.step)
    handle = fastdiff.apply(pipe)
    # pipelines inspect scheduler.step for 'eta' / 'generator': the wrapper must not hide parameters
    assert inspect.signature(pipe.scheduler.step) == step_sig
    assert "step" in pipe.scheduler.__dict__ and "forward" in pipe.transformer.__dict__
    assert sorted(handle.hooks.names()) == sorted(
        ["fastdiff.clock"] + [f"fastdiff.telemetry.transformer_blocks.{i}" for i in range(3)])
    assert [pipe.scheduler.__dict__[a].__fastdiff_hook__ for a in ("set_timesteps", "step")] == [
        "fastdiff.clock.set_timesteps", "fastdiff.clock.step"]
    fastdiff.remove(pipe)
    assert "step" not in pipe.scheduler.__dict__ and "forward" not in pipe.transformer.__dict__
    assert not any("forward" in m.__dict__ for m in pipe.transformer.modules())
    assert fastdiff.remove(pipe) is False  # nothing left to remove


def test_remove_refuses_when_wrapped_over_and_keeps_working():
    model = ToyDenoiser()
    x = torch.ones(1, 1, 2, 2)
    fastdiff.apply(model)
    other = HookSet()
    other.wrap(model, "someone-else", lambda inner, a, k: inner(*a, **k))
    with pytest.raises(FastDiffError, match="wrapped again"):
        fastdiff.remove(model)
    assert torch.equal(model(x, timestep=1), x * 8)  # still fully hooked and working
    other.remove()
    assert fastdiff.remove(model) is True
    assert "forward" not in model.__dict__


def test_summary_counts_blocks_and_flops_on_toy():
    pipe = FakePipeline(ToyDenoiser(n_blocks=3))
    with fastdiff.accelerated(pipe) as h:
        pipe(steps=5)
        s = h.summary()
    assert (s.steps, s.calls, s.num_steps) == (5, 5, 5)
    assert s.per_block == {f"transformer_blocks.{i}": 5 for i in range(3)}
    assert s.dense_flops == 0.0  # x * 2 has no matmul: the cost model must not invent any
    assert "5 steps" in str(s)
