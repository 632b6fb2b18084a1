"""Every family's tiny real diffusers pipeline: fastdiff with a no-op config changes nothing, remove()
restores everything, runs do not leak into each other, and the step clock reads the loop right."""

import pytest
import torch

import fastdiff
from fastdiff.errors import FastDiffError
from fastdiff.eval import tiny
from fastdiff.mechanisms import registry
from fastdiff.mechanisms.base import Mechanism

from .facts import FAMILIES, SEPARATE_CFG


def run(pipe, family, **kw):
    with torch.no_grad():
        return tiny.output_tensor(pipe(**tiny.pipeline_kwargs(family, **kw)))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipe_and_base(family):
    pipe = tiny.build_pipeline(family)
    return pipe, run(pipe, family)


def test_noop_is_bit_identical_and_remove_restores(family, pipe_and_base, snapshot):
    pipe, base = pipe_and_base
    before = snapshot(pipe.components[_denoiser_attr(pipe)], pipe.scheduler)
    handle = fastdiff.apply(pipe, preset="none")
    assert torch.equal(run(pipe, family), base)
    assert torch.equal(run(pipe, family), base)  # a second run: identical, nothing carried over
    fastdiff.remove(pipe)
    assert snapshot(pipe.components[_denoiser_attr(pipe)], pipe.scheduler) == before
    assert torch.equal(run(pipe, family), base)
    assert handle.summary().steps == 3


@pytest.mark.parametrize("cfg", [True, False])
def test_step_clock_reads_steps_and_branches(family, pipe_and_base, cfg):
    pipe, _ = pipe_and_base
    with fastdiff.accelerated(pipe) as handle:
        run(pipe, family, cfg=cfg, steps=3)
        first = handle.summary()
        run(pipe, family, cfg=cfg, steps=4)
        s = handle.summary()
    assert first.steps == 3 and s.steps == 4 and s.num_steps == 4
    assert s.run == first.run + 1  # the second pipeline call started a new run by itself
    calls_per_step = 2 if (cfg and family in SEPARATE_CFG) else 1
    assert s.calls == 4 * calls_per_step
    for row in s.per_step:
        if not cfg:
            assert row.branches == ["cond"] * calls_per_step
        elif family in SEPARATE_CFG:
            assert row.branches == ["cond", "uncond"]
        else:
            assert row.branches == ["cond/uncond"]
        assert row.blocks_computed == row.blocks_total  # nothing skipped by a no-op config
    assert s.estimated_speedup == pytest.approx(1.0)


def test_batch_of_two_equals_each_sample_alone(family, pipe_and_base):
    pipe, _ = pipe_and_base
    kw = tiny.pipeline_kwargs(family, batch_size=2)
    with fastdiff.accelerated(pipe), torch.no_grad():
        both = tiny.output_tensor(pipe(**_seeded(kw)))
        alone = [tiny.output_tensor(pipe(**_sample(_seeded(kw), i, 2))) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], alone[i], rtol=1e-4, atol=1e-5)


def test_failed_apply_leaves_model_untouched(family, pipe_and_base, snapshot, monkeypatch):
    pipe, base = pipe_and_base
    denoiser = pipe.components[_denoiser_attr(pipe)]
    before = snapshot(denoiser, pipe.scheduler)

    class Broken(Mechanism):
        name = "broken"

        def estimate_cost(self, table):
            return table

        def attach(self, adapter, host):  # hooks some blocks, then fails half-way
            for block in adapter.blocks[:2]:
                host.wrap(block.module, "broken", lambda call, inner, a, k: inner(*a, **k) * 0)
            raise RuntimeError("boom")

    monkeypatch.setattr(registry, "build", lambda cfg: [Broken(None)])
    with pytest.raises(RuntimeError, match="boom"):
        fastdiff.apply(pipe)
    monkeypatch.undo()
    with pytest.raises(fastdiff.ConfigError):
        fastdiff.apply(pipe, preset="no-such-preset")
    with pytest.raises(fastdiff.ConfigError):
        fastdiff.apply(pipe, telemetry={"enabled": "yes"})
    assert snapshot(denoiser, pipe.scheduler) == before
    assert torch.equal(run(pipe, family), base)


def test_double_apply_is_refused_and_first_stays(family, pipe_and_base):
    pipe, base = pipe_and_base
    with fastdiff.accelerated(pipe) as handle:
        with pytest.raises(FastDiffError, match="already applied"):
            fastdiff.apply(pipe)
        assert torch.equal(run(pipe, family), base)
        assert handle.summary().calls > 0


def test_apply_to_bare_denoiser(family):
    denoiser = tiny.build_denoiser(family)
    kw = tiny.denoiser_inputs(family, batch_size=2)
    with torch.no_grad():
        base = denoiser(**kw, return_dict=False)[0]
        with fastdiff.accelerated(denoiser) as handle:
            out = denoiser(**kw, return_dict=False)[0]
        s = handle.summary()
    assert torch.equal(out, base)
    assert s.calls == 1 and s.num_steps is None  # no scheduler: steps are not known in advance


def _denoiser_attr(pipe):
    return "transformer" if "transformer" in pipe.components else "unet"


def _seeded(kw):
    """kw with a fresh generator per sample (generators are consumed by a call)."""
    return {**kw, "generator": [torch.Generator().manual_seed(s) for s in (11, 12)]}


def _sample(kw, i, batch):
    """The kwargs of sample i of a batched call."""
    out = {}
    for key, value in kw.items():
        if key == "generator":
            out[key] = [value[i]]
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[i : i + 1]
        elif isinstance(value, list) and len(value) == batch:
            out[key] = value[i : i + 1]
        else:
            out[key] = value
    return out
