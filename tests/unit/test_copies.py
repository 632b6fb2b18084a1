"""Copies of accelerated objects (hardening issue, item 3): a copied block or scheduler is its own, a copy of
an accelerated model is refused clearly and leaves the original working, pickling says what to do."""

import copy
import pickle

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny


def _call(p, steps=6):
    with torch.no_grad():
        return tiny.output_tensor(p(**tiny.pipeline_kwargs("sd3", steps=steps)))


def test_deepcopy_of_an_accelerated_pipeline_is_refused_and_the_original_keeps_working():
    p = tiny.build_pipeline("sd3")
    fastdiff.apply(p, preset="cache-fast")
    before = _call(p)
    with pytest.raises(fastdiff.FastDiffError, match="deepcopy"):
        copy.deepcopy(p)
    assert torch.equal(_call(p), before)
    fastdiff.remove(p)
    c = copy.deepcopy(p)  # after remove: an ordinary copy, which can be accelerated on its own
    fastdiff.apply(c, preset="cache-fast")
    assert torch.equal(_call(c), before)


def test_copied_block_and_scheduler_are_their_own():
    p = tiny.build_pipeline("sd3")
    fastdiff.apply(p, preset="cache-fast")
    block = p.transformer.transformer_blocks[0]
    twin = copy.deepcopy(block)
    with torch.no_grad():
        for prm in twin.parameters():
            prm.mul_(0.5)
    kw = {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 8, 16),
          "temb": torch.randn(1, 16)}
    with torch.no_grad():
        assert not torch.equal(twin(**kw)[1], block(**kw)[1])  # the copy runs its own (halved) weights
    sched = copy.deepcopy(p.scheduler)
    sched.set_timesteps(3)
    assert len(sched.timesteps) == 3 and "step" in p.scheduler.__dict__
    h = fastdiff.session_of(p)
    _call(p)
    assert [r.ctx.num_steps for r in h.records] == [6] * 6  # the original's clock never heard the copy


def test_pickling_an_accelerated_pipeline_raises_a_clear_error():
    p = tiny.build_pipeline("dit")
    fastdiff.apply(p, preset="cache-safe")
    with pytest.raises(fastdiff.FastDiffError, match="remove"):
        pickle.dumps(p)
    fastdiff.remove(p)
    pickle.dumps(p)
