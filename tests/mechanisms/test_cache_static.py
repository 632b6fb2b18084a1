"""Static step caching: exact on analytic blocks, bit-identical when it never reuses, no state leaks,
and the cost model predicts exactly what the run did."""

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny

from ..adapters.facts import ALWAYS_COMPUTE
from ..adapters.test_families import _sample, _seeded
from ..unit.toy import FakePipeline, ToyDenoiser


def test_reuse_is_input_plus_cached_residual_by_hand():
    pipe = FakePipeline(ToyDenoiser(n_blocks=3))  # each block: x -> 2x, so the model is x -> 8x
    with fastdiff.accelerated(pipe, cache={"interval": 2, "warmup": 1, "cooldown": 0}) as h:
        out = pipe(steps=4)
        s = h.summary()
    # steps 0, 1, 3 compute; step 2 reuses. Residuals cached at step 1 (input x1): x1, 2*x1, 4*x1,
    # so at step 2 the model returns x2 + 7*x1 instead of 8*x2.
    x0 = torch.ones(1, 1, 4, 4)
    x1 = x0 - 0.01 * 8 * x0
    x2 = x1 - 0.01 * 8 * x1
    x3 = x2 - 0.01 * (x2 + 7 * x1)
    x4 = x3 - 0.01 * 8 * x3
    torch.testing.assert_close(out, x4, rtol=1e-6, atol=0)
    assert [r.blocks_computed for r in s.per_step] == [3, 3, 0, 3]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_interval_one_is_bit_identical_and_interval_two_skips(family):
    pipe = tiny.build_pipeline(family)
    kw = lambda: tiny.pipeline_kwargs(family, steps=6)  # noqa: E731
    with torch.no_grad():
        base = tiny.output_tensor(pipe(**kw()))
        with fastdiff.accelerated(pipe, cache={"interval": 1}):
            assert torch.equal(tiny.output_tensor(pipe(**kw())), base)
        with fastdiff.accelerated(pipe, cache={"interval": 2, "warmup": 1, "cooldown": 1}) as h:
            cached = tiny.output_tensor(pipe(**kw()))
            s = h.summary()
        assert torch.equal(tiny.output_tensor(pipe(**kw())), base)  # removed: bit-exact again
    assert not torch.equal(cached, base)
    computed = [r.blocks_computed for r in s.per_step]
    full = s.per_step[0].blocks_total
    assert computed[0] == computed[1] == computed[3] == computed[5] == full  # warm-up, interval, cool-down
    assert computed[2] == computed[4] < full
    if family in ALWAYS_COMPUTE:  # DeepCache: the outermost down and up block always run
        assert computed[2] == 2 * (s.calls // s.steps)
    else:
        assert computed[2] == 0
    # the planner's prediction is the run's own accounting, exactly
    layout = s.per_step[0]
    est = fastdiff.estimate(pipe, cache={"interval": 2, "warmup": 1, "cooldown": 1}, steps=6,
                            **_size(family), text_tokens=layout.text_tokens)
    assert est.flops == pytest.approx(s.flops, rel=1e-9)
    assert est.speedup == pytest.approx(s.estimated_speedup, rel=1e-9) and est.speedup > 1.2


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "wan"])
def test_no_state_leaks_between_runs_batch_rows_and_branches(family):
    pipe = tiny.build_pipeline(family)
    cfg = {"cache": {"interval": 2}}
    with torch.no_grad(), fastdiff.accelerated(pipe, **cfg):
        a_then_b = [tiny.output_tensor(pipe(**tiny.pipeline_kwargs(family, steps=5, seed=s))) for s in (0, 1)]
    with torch.no_grad(), fastdiff.accelerated(pipe, **cfg):
        b_alone = tiny.output_tensor(pipe(**tiny.pipeline_kwargs(family, steps=5, seed=1)))
    assert torch.equal(a_then_b[1], b_alone)  # run B does not see run A's cache
    kw = tiny.pipeline_kwargs(family, batch_size=2, steps=5)
    with torch.no_grad(), fastdiff.accelerated(pipe, **cfg):
        both = tiny.output_tensor(pipe(**_seeded(kw)))
        alone = [tiny.output_tensor(pipe(**_sample(_seeded(kw), i, 2))) for i in range(2)]
    for i in range(2):  # rows of a batch (and the CFG halves/calls within them) never mix
        torch.testing.assert_close(both[i : i + 1], alone[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [{"interval": 0}, {"interval": -2}, {"policy": "magic"}, {"warmup": -1},
                                 {"interval": 2.5}, {"bogus": 1}])
def test_bad_cache_config_is_refused_before_touching_the_model(bad):
    pipe = tiny.build_pipeline("dit")
    with pytest.raises(fastdiff.ConfigError):
        fastdiff.apply(pipe, cache=bad)
    assert "_fastdiff_session" not in pipe.transformer.__dict__ and "forward" not in pipe.transformer.__dict__


def _size(family):
    kw = tiny.pipeline_kwargs(family)
    out = {"height": kw.get("height", 16), "width": kw.get("width", 16)}
    if "num_frames" in kw:
        out["num_frames"] = kw["num_frames"]
    return out
