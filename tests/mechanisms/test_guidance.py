"""CFG skipping: the skipped unconditional prediction is cond − last delta, worked out by hand; separate and
batched CFG; never-skip settings are bit-identical; the cost model predicts what the run did."""

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny

from ..adapters.test_families import _sample, _seeded


def _dit_call(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=torch.full((x.shape[0],), t), class_labels=torch.tensor(labels), return_dict=False)[0]


def test_skipped_uncond_rows_are_cond_minus_the_last_delta_by_hand():
    # DiT marks unconditional rows with the null class, so the bare denoiser already knows its branches.
    model = tiny.build_denoiser("dit")
    null = model.config.num_embeds_ada_norm
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    labels = [3, 5, null, null]  # cond rows first, as DiTPipeline does
    ref0 = _dit_call(model, torch.cat([x0, x0 + 1, x0, x0 + 1]), 900, labels)
    ref1_cond = _dit_call(model, torch.cat([x1, x1 - 1]), 800, labels[:2])
    with fastdiff.accelerated(model, guidance={"mode": "step", "start": 0.0}) as h:
        out0 = _dit_call(model, torch.cat([x0, x0 + 1, x0, x0 + 1]), 900, labels)  # both branches run: delta measured
        out1 = _dit_call(model, torch.cat([x1, x1 - 1, x1, x1 - 1]), 800, labels)  # uncond skipped
        rec = h.records[-1]
    assert torch.equal(out0, ref0)
    delta = ref0[:2] - ref0[2:]
    torch.testing.assert_close(out1[:2], ref1_cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1[2:], ref1_cond - delta, rtol=1e-5, atol=1e-6)
    assert rec.decisions == {"guidance": "skip-uncond"} and rec.branches == ("cond", "cond")


@pytest.mark.parametrize("family", ["dit", "sd3", "flux", "wan", "sd15"])
def test_skips_from_start_and_never_skip_is_bit_identical(family):
    pipe = tiny.build_pipeline(family)
    kw = lambda: tiny.pipeline_kwargs(family, steps=6)  # noqa: E731
    with torch.no_grad():
        base = tiny.output_tensor(pipe(**kw()))
        with fastdiff.accelerated(pipe, guidance={"mode": "step", "start": 1.0}):
            assert torch.equal(tiny.output_tensor(pipe(**kw())), base)
        with fastdiff.accelerated(pipe, guidance={"mode": "converged", "start": 0.0, "threshold": 1.0}):
            assert torch.equal(tiny.output_tensor(pipe(**kw())), base)  # cos never reaches 1 exactly
        with fastdiff.accelerated(pipe, guidance={"mode": "step", "start": 0.5}) as h:
            out = tiny.output_tensor(pipe(**kw()))
            s = h.summary()
        assert torch.equal(tiny.output_tensor(pipe(**kw())), base)
    skipped = ["guidance=skip-uncond" in " ".join(r.decisions) for r in s.per_step]
    assert skipped == [False, False, False, True, True, True]
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    text = s.per_step[0].text_tokens
    size = {k: v for k, v in tiny.pipeline_kwargs(family).items() if k in ("height", "width", "num_frames")}
    est = fastdiff.estimate(pipe, guidance={"start": 0.5}, steps=6, text_tokens=text, **({"height": 16, "width": 16} | size))
    assert est.flops == pytest.approx(s.flops, rel=1e-9)
    assert est.speedup == pytest.approx(4 / 3, rel=0.05)  # half the steps at half the calls (blocks only ~)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guidance_skipping_keeps_batch_rows_apart(family):
    pipe = tiny.build_pipeline(family)
    kw = tiny.pipeline_kwargs(family, batch_size=2, steps=6)
    with torch.no_grad(), fastdiff.accelerated(pipe, guidance={"start": 0.5}, cache={"interval": 2}):
        both = tiny.output_tensor(pipe(**_seeded(kw)))
        alone = [tiny.output_tensor(pipe(**_sample(_seeded(kw), i, 2))) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(both[i: i + 1], alone[i], rtol=1e-3, atol=1e-4)


def test_unknown_branches_are_an_error_not_a_silent_no_op():
    model = tiny.build_denoiser("sd3")  # bare denoiser: nothing says which rows are unconditional
    inputs = tiny.denoiser_inputs("sd3")
    with fastdiff.accelerated(model, guidance={}):
        with pytest.raises(fastdiff.FastDiffError, match="branch"):
            with torch.no_grad():
                model(**inputs)
