"""Resolution-bottleneck sampling: the exact parts exactly (pick/up, pack/unpack, one full stage = the pipeline's
own schedule), the stage arithmetic by hand, and the driver on a tiny FLUX pipeline (seeded random weights: shapes,
stages and determinism; fidelity is measured on ref-flux in eval/results)."""

import inspect

import pytest
import torch

from fastdiff.errors import ConfigError, UnsupportedModelError
from fastdiff.eval import tiny
from fastdiff.hooks import HookSet
from fastdiff.mechanisms.bottleneck import Driver, Stage, resample, split_steps
from fastdiff.mechanisms.bottleneck.schedule import stage_sigmas


def test_pick_undoes_up_exactly_and_pack_is_fluxs():
    from diffusers import FluxPipeline

    y = torch.randn(2, 3, 5, 7)
    for s in (1, 2, 3):
        assert torch.equal(resample.pick(resample.up(y, s), s), y)
    x = torch.randn(2, 3, 8, 12)
    tokens = FluxPipeline._pack_latents(x, 2, 3, 8, 12)
    assert torch.equal(resample.pack(x, 2), tokens)
    assert torch.equal(resample.unpack(tokens, 8, 12, 2), x)


@pytest.mark.parametrize("method", resample.METHODS)
def test_resize_keeps_a_constant_and_the_shape(method):
    c = torch.full((2, 1, 3, 6, 6), 0.7)
    out = resample.resize(c, (12, 9), method)
    assert out.shape == (2, 1, 3, 12, 9)
    torch.testing.assert_close(out, torch.full_like(out, 0.7), atol=1e-5, rtol=0)


def test_split_steps_by_hand():
    three = (Stage(1, 0.2), Stage(2, 0.6), Stage(1, 0.2))
    assert split_steps(20, three) == [4, 12, 4]
    assert split_steps(7, three) == [2, 4, 1]  # 1.4 / 4.2 / 1.4: the remainder to the largest fraction, first
    assert split_steps(10, (Stage(2, 6), Stage(1, 1.0))) == [6, 4]
    with pytest.raises(ConfigError, match="cannot be split"):
        split_steps(2, three)
    with pytest.raises(ConfigError, match="fraction in"):
        split_steps(10, (Stage(1, 1.5),))


def test_one_full_stage_is_the_pipelines_own_schedule():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=256)
    mu = 0.5 + 0.65 * (256 - 64) / 192
    sch.set_timesteps(sigmas=np.linspace(1, 1 / 20, 20), mu=mu)
    torch.testing.assert_close(stage_sigmas(sch, Stage(1, 1.0), 20, 256), sch.sigmas[:-1].float(), atol=1e-6, rtol=0)
    # strength as a sigma: the stage starts exactly there; as a time: at the shifted value
    assert float(stage_sigmas(sch, Stage(2, 0.5, 0.6), 5, 64, "sigma")[0]) == pytest.approx(0.6, abs=1e-6)
    assert float(stage_sigmas(sch, Stage(2, 0.5, 0.6), 5, 64, "time")[0]) > 0.6  # shift > 1 raises it


def test_row_noise_is_per_row():
    first = torch.randn(3, 4, 8, 8)
    both = resample.row_noise(first, (3, 4, 4, 4), 1, torch.float32, "cpu")
    one = resample.row_noise(first[1:2], (1, 4, 4, 4), 1, torch.float32, "cpu")
    assert torch.equal(both[1:2], one) and not torch.equal(both[0], both[1])
    assert not torch.equal(resample.row_noise(first, (3, 4, 4, 4), 2, torch.float32, "cpu"), both)  # per stage


def test_bad_stages_are_refused():
    with pytest.raises(ConfigError, match="last stage must be at scale 1"):
        Driver((Stage(1, 0.5), Stage(2, 0.5)))
    with pytest.raises(ConfigError, match="resize must be one of"):
        Driver((Stage(2, 0.5), Stage(1, 0.5, 0.6)), resize="lanczos5")
    with pytest.raises(ConfigError, match="strengths"):
        Driver((Stage(2, 0.5), Stage(1, 0.5, 0.0)))
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    Driver.check_scheduler(DDIMScheduler(), "DiTTransformer2DModel", "ClassDiTPipeline")  # runs
    with pytest.raises(UnsupportedModelError, match="runs the deterministic samplers FlowMatchEulerDiscreteScheduler, "
                                                    "DDIMScheduler.*samples with EulerAncestralDiscreteScheduler"):
        Driver.check_scheduler(EulerAncestralDiscreteScheduler(), "DiTTransformer2DModel", "ClassDiTPipeline")
    with pytest.raises(UnsupportedModelError, match="DPMSolverMultistepScheduler: its algorithm_type 'sde-dpmsolver"):
        Driver.check_scheduler(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "X", "Y")
    with pytest.raises(UnsupportedModelError, match="thresholding=True"):
        Driver.check_scheduler(DDIMScheduler(thresholding=True), "X", "Y")


def _flux_positions(bound, hw):
    ids = bound["img_ids"]
    h, w = hw
    new = ids.new_zeros(h * w, 3)
    new[:, 1] = torch.arange(h).repeat_interleave(w).to(ids)
    new[:, 2] = torch.arange(w).repeat(h).to(ids)
    return {"img_ids": new}


def _drive(pipe, stages, shapes):
    d = Driver(stages, packing=2, positions=_flux_positions)
    hs, sch, den = HookSet(), pipe.scheduler, pipe.transformer
    sig, fsig = inspect.signature(sch.step), inspect.signature(den.forward)
    hs.wrap(sch, "t.set", lambda inner, a, k: d.set_timesteps(sch, inner, a, k), attr="set_timesteps")
    hs.wrap(sch, "t.step", lambda inner, a, k: d.step(sig, inner, a, k), attr="step")

    def spy(inner):
        return lambda **c: (shapes.append(c["hidden_states"].shape[1]), inner(**c))[1]

    hs.wrap(den, "t.fwd", lambda inner, a, k: d.forward(lambda a, k: dict(fsig.bind(*a, **k).arguments),
                                                         spy(inner), a, k))
    try:
        return tiny.output_tensor(pipe(**_call()))
    finally:
        hs.remove()


def _call():
    return tiny.pipeline_kwargs("flux", steps=6) | {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def flux():
    pipe = tiny.build_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny.output_tensor(pipe(**_call()))


def test_one_full_stage_reproduces_the_pipeline(flux):
    pipe, base = flux
    shapes = []
    out = _drive(pipe, (Stage(1, 1.0),), shapes)
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)  # the same schedule up to the shift's rounding
    assert set(shapes) == {64}


def test_two_stages_run_low_then_full_and_repeat_exactly(flux):
    pipe, base = flux
    shapes = []
    out = _drive(pipe, (Stage(2, 0.5), Stage(1, 0.5, 0.6)), shapes)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert shapes == [16] * 6 + [64] * 6  # 3 steps x 2 CFG calls at a quarter of the tokens, then full
    assert torch.equal(_drive(pipe, (Stage(2, 0.5), Stage(1, 0.5, 0.6)), []), out)  # deterministic
    assert torch.equal(tiny.output_tensor(pipe(**_call())), base)  # hooks gone: the pipeline as before


# -- through fastdiff.apply ------------------------------------------------------------------------------------

import fastdiff  # noqa: E402

TWO_STAGES = {"bottleneck": {"stages": [{"scale": 2, "steps": 0.5}, {"scale": 1, "steps": 0.5, "strength": 0.6}]}}


def test_apply_runs_the_stages_as_one_run_and_estimate_matches_the_accounting(flux):
    pipe, base = flux
    h = fastdiff.apply(pipe, TWO_STAGES)
    try:
        out = tiny.output_tensor(pipe(**_call()))
        s = h.summary()
    finally:
        h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)
    assert s.steps == 6 and [r.step for r in s.per_step] == list(range(6))  # one run, global steps 0..5
    assert [r.stage for r in s.per_step] == [0, 0, 0, 1, 1, 1]
    est = fastdiff.estimate(pipe, TWO_STAGES, height=32, width=32, steps=6, text_tokens=8)
    assert s.flops == pytest.approx(est.flops, rel=1e-9) and s.dense_flops == pytest.approx(est.dense_flops, rel=1e-9)
    assert est.speedup > 1.2
    assert torch.equal(tiny.output_tensor(pipe(**_call())), base)  # removed: bit-identical


def test_apply_matches_the_bare_driver(flux):
    pipe, _ = flux
    with fastdiff.accelerated(pipe, TWO_STAGES):
        out = tiny.output_tensor(pipe(**_call()))
    stages = (Stage(2, 0.5), Stage(1, 0.5, 0.6))
    assert torch.equal(out, _drive(pipe, stages, []))


def test_bottleneck_composes_with_caching(flux):
    pipe, base = flux
    cfg = {**TWO_STAGES, "cache": {"policy": "static", "interval": 2, "warmup": 1, "cooldown": 0}}
    with fastdiff.accelerated(pipe, cfg) as h:
        out = tiny.output_tensor(pipe(**_call()))
        s = h.summary()
    decisions = [d for r in s.per_step for d in r.decisions]
    assert torch.isfinite(out).all() and any("cache=reuse" in d for d in decisions)
    assert s.flops < fastdiff.estimate(pipe, TWO_STAGES, height=32, width=32, steps=6, text_tokens=8).flops


def test_refusals_name_what_is_supported():
    cog = tiny.build_pipeline("cogvideox")
    with pytest.raises(fastdiff.UnsupportedModelError, match=r"CogVideoXTransformer3DModel: resolution-bottleneck.*"
                                                             r"'cogvideox'.*supported families: \['dit', 'flux', "
                                                             r"'hunyuan', 'pixart', 'sd3', 'unet', 'wan'\]"):
        fastdiff.apply(cog, TWO_STAGES)
    assert fastdiff.session_of(cog) is None
    flux_pipe = tiny.build_pipeline("flux")
    with pytest.raises(fastdiff.UnsupportedModelError, match="apply fastdiff to the pipeline"):
        fastdiff.apply(flux_pipe.transformer, TWO_STAGES)
    from diffusers import EulerAncestralDiscreteScheduler

    flux_pipe.scheduler = EulerAncestralDiscreteScheduler()
    with pytest.raises(fastdiff.UnsupportedModelError, match="deterministic samplers.*EulerAncestralDiscreteScheduler"):
        fastdiff.apply(flux_pipe, TWO_STAGES)
    assert fastdiff.session_of(flux_pipe) is None


def test_a_compiled_denoiser_runs_the_stages_without_recompiling():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    pipe = tiny.build_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    fastdiff.apply(pipe, preset="bottleneck-fast")
    try:
        eager = tiny.output_tensor(pipe(**_call()))
        dynamo.reset()
        counters.clear()
        pipe.transformer.compile(backend="eager")
        first = tiny.output_tensor(pipe(**_call()))
        graphs = counters["stats"].get("unique_graphs", 0)
        tiny.output_tensor(pipe(**_call()))
        assert counters["stats"].get("unique_graphs", 0) == graphs  # the second run reuses every graph
        torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-5)
    finally:
        dynamo.reset()
        fastdiff.remove(pipe)


def test_config_names_what_the_mechanism_implements():
    from fastdiff import config
    from fastdiff.mechanisms.bottleneck.schedule import STRENGTH_RULES

    assert config.BOTTLENECK_RESIZE == resample.METHODS and set(config.BOTTLENECK_STRENGTH) == set(STRENGTH_RULES)
