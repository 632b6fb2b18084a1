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


# -- stateful samplers (DDIM, DPM-Solver, Euler, UniPC): epsilon, v and flow predictions -----------------------------

from fastdiff.mechanisms.bottleneck.schedule import clean_estimate, stage_length, stage_schedules  # noqa: E402

# the tiny families whose pipelines sample with a stateful sampler: SD1.5 DDIM, SDXL Euler, DiT DDIM, PixArt DPM,
# Wan UniPC (flow_prediction)
STATEFUL = ("sd15", "sdxl", "dit", "pixart", "wan")
ONE_STAGE = {"bottleneck": {"stages": [{"scale": 1, "steps": 1.0}]}}


def test_stage_length_and_a_stage_schedule_by_hand():
    from diffusers import DDIMScheduler

    assert stage_length(4, 1.0) == (4, 0)
    assert stage_length(8, 0.85) == (9, 1)  # 8 of 9 steps: 0.89, the nearest to 0.85
    assert stage_length(2, 0.85) == (3, 1)  # below pure noise whenever the strength is
    assert stage_length(4, 0.5) == (8, 4)
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                        timestep_spacing="leading", set_alpha_to_one=False)
    sch.set_timesteps(6)  # the pipeline's run: 6 steps, split 4 + 2, the second stage from strength 0.7
    first, second = stage_schedules(sch, {}, (Stage(2, 4), Stage(1, 2, 0.7)), [4, 2])
    assert first.steps.tolist() == [751, 501, 251, 1]  # leading spacing for 4 steps: 250 apart, offset 1
    assert (second.total, second.begin, second.steps.tolist()) == (3, 1, [334, 1])  # 3 steps 333 apart, from the 2nd
    a = sch.alphas_cumprod[torch.tensor([334, 1])].double()
    torch.testing.assert_close(second.alpha, a.sqrt())
    torch.testing.assert_close(second.sigma, (1 - a).sqrt())
    assert sch.timesteps.tolist() == [831, 665, 499, 333, 167, 1]  # the scheduler given is untouched (a copy)


@pytest.mark.parametrize("kind", ["ddim-epsilon", "ddim-v_prediction", "ddim-sample", "euler-epsilon",
                                  "euler-v_prediction", "unipc-flow_prediction"])
def test_clean_estimate_inverts_each_prediction_type(kind):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    name, pred = kind.split("-")
    x0, n = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    if name == "unipc":
        sch = UniPCMultistepScheduler(prediction_type=pred, use_flow_sigmas=True, flow_shift=3.0)
        alpha, sigma = 0.6, 0.4
    else:
        sch = DDIMScheduler(prediction_type=pred, clip_sample=False) if name == "ddim" else \
            EulerDiscreteScheduler(prediction_type=pred)
        alpha = 0.8
        sigma = (1 - alpha ** 2) ** 0.5
    x = alpha * x0 + sigma * n  # the forward process at (alpha, sigma)
    out = {"epsilon": n, "v_prediction": alpha * n - sigma * x0, "sample": x0, "flow_prediction": n - x0}[pred]
    sample = x / alpha if name == "euler" else x  # Euler holds x0 + (sigma / alpha) noise
    torch.testing.assert_close(clean_estimate(sch, out, sample, alpha, sigma), x0, atol=1e-5, rtol=1e-5)


_pipes: dict = {}


@pytest.fixture(scope="module")
def pipes():
    """family -> (pipeline, its plain output at 4 steps); built once for the module."""
    yield _pipes
    _pipes.clear()


def _plain(pipes, name):
    if name not in pipes:
        pipe = tiny.build_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = (pipe, tiny.output_tensor(pipe(**tiny.pipeline_kwargs(name, steps=4))))
    return pipes[name]


def _denoiser(pipe):
    return pipe.unet if "unet" in pipe.components else pipe.transformer


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_samplers_run_the_stages_and_one_full_stage_is_the_plain_run(pipes, name):
    pipe, base = _plain(pipes, name)
    tokens = []
    with fastdiff.accelerated(pipe, preset="bottleneck-fast") as h:
        out = tiny.output_tensor(pipe(**tiny.pipeline_kwargs(name, steps=4)))
        s = h.summary()
        tokens = [r.image_tokens for r in s.per_step]
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()
    assert [r.stage for r in s.per_step] == [0, 0, 1, 1] and tokens[0] * 4 == tokens[-1]  # a quarter, then full
    assert not torch.equal(out, base)
    with fastdiff.accelerated(pipe, ONE_STAGE):  # the scheduler re-entered for the one stage: the same schedule
        assert torch.equal(tiny.output_tensor(pipe(**tiny.pipeline_kwargs(name, steps=4))), base)
    assert torch.equal(tiny.output_tensor(pipe(**tiny.pipeline_kwargs(name, steps=4))), base)  # removed: bit-exact


def _spy_steps(pipe, log):
    """Wrap the scheduler's step innermost (before fastdiff): what the driver hands the sampler, per step."""
    hs, sch = HookSet(), pipe.scheduler

    def spy(inner, args, kwargs):
        state = getattr(sch, "lower_order_nums", None), [m is None for m in getattr(sch, "model_outputs", [])]
        out = inner(*args, **kwargs)
        log.append(dict(e=args[0].clone(), t=args[1], y=args[2].clone(), prev=out[0].clone(), state=state))
        return out

    hs.wrap(sch, "test.spy", spy, attr="step")
    return hs


@pytest.mark.usefixtures("one_thread")
def test_renoise_at_a_stage_start_is_the_schedulers_own_rule_by_hand(pipes):
    """SD1.5 with DDIM, no CFG (the step's model output is the UNet's): at the end of the 16 px stage the clean estimate
    (x - sqrt(1 - a) eps) / sqrt(a) is resized and re-noised to sqrt(a') x0 + sqrt(1 - a') n at the next stage's first
    timestep, with the run's per-row noise."""
    pipe, _ = _plain(pipes, "sd15")
    first = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(3))
    kw = tiny.pipeline_kwargs("sd15", steps=6, cfg=False) | {"width": 48, "latents": first}
    log = []
    spy = _spy_steps(pipe, log)
    try:
        with fastdiff.accelerated(pipe, TWO_STAGES):  # 3 steps at half size, then 3 from strength 0.6 (3 of 5)
            pipe(**kw)
    finally:
        spy.remove()
    assert [tuple(r["y"].shape[-2:]) for r in log] == [(4, 12)] * 3 + [(8, 24)] * 3
    # leading spacing: 3 steps 333 apart; then the last 3 of 5 (200 apart), as img2img at strength 0.6 runs them
    assert [int(r["t"]) for r in log] == [667, 334, 1] + [401, 201, 1]
    a = pipe.scheduler.alphas_cumprod
    end = log[2]
    x0 = (end["y"] - (1 - a[1]).sqrt() * end["e"]) / a[1].sqrt()
    x0 = resample.resize(x0, (8, 24), "bicubic")
    noise = resample.row_noise(first, x0.shape, 1, torch.float32, "cpu")
    torch.testing.assert_close(log[3]["y"], a[401].sqrt() * x0 + (1 - a[401]).sqrt() * noise, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_each_stage_starts_dpm_solver_afresh_first_order_by_hand(pipes):
    """PixArt with DPM-Solver++ (2nd order): a stage's first step sees no history (lower_order_nums 0, no model
    outputs kept) and is the first-order update x' = (s'/s) x - a' (exp(-h) - 1) x0, on the stage's own sigmas."""
    pipe, _ = _plain(pipes, "pixart")
    log = []
    spy = _spy_steps(pipe, log)
    try:
        with fastdiff.accelerated(pipe, TWO_STAGES):
            pipe(**tiny.pipeline_kwargs("pixart", steps=6))
    finally:
        spy.remove()
    assert [r["state"][0] for r in log] == [0, 1, 2, 0, 1, 2]  # the warm-up restarts at the stage
    assert all(log[3]["state"][1])
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(5)  # the second stage: 3 steps of a 5-step schedule (strength 0.6)
    s_s, s_t = sch.sigmas[2].double(), sch.sigmas[3].double()
    assert int(log[3]["t"]) == int(sch.timesteps[2])
    a_s, a_t = 1 / (1 + s_s ** 2).sqrt(), 1 / (1 + s_t ** 2).sqrt()
    sig_s, sig_t = s_s * a_s, s_t * a_t
    h = (a_t.log() - sig_t.log()) - (a_s.log() - sig_s.log())
    y, e = log[3]["y"].double(), log[3]["e"].double()
    x0 = (y - sig_s * e) / a_s
    torch.testing.assert_close(log[3]["prev"].double(), (sig_t / sig_s) * y - a_t * (torch.exp(-h) - 1) * x0,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_batch_rows_are_independent(pipes):
    """SD1.5 (DDIM, batched CFG): two prompts with a generator each equal each alone (re-noise is per row)."""
    pipe, _ = _plain(pipes, "sd15")

    def run(rows):
        kw = tiny.pipeline_kwargs("sd15", steps=4, batch_size=2)
        kw["prompt_embeds"], kw["negative_prompt_embeds"] = kw["prompt_embeds"][rows], kw["negative_prompt_embeds"][rows]
        kw["generator"] = [torch.Generator().manual_seed(10 + r) for r in rows]
        return tiny.output_tensor(pipe(**kw))

    with fastdiff.accelerated(pipe, preset="bottleneck-fast"):
        both, one, two = run([0, 1]), run([0]), run([1])
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_sdxl_size_conditioning_follows_the_stage(pipes):
    pipe, _ = _plain(pipes, "sdxl")
    seen = []
    hook = pipe.unet.add_time_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].view(-1, 6)[0].tolist()))
    try:
        with fastdiff.accelerated(pipe, preset="bottleneck-fast"):
            pipe(**tiny.pipeline_kwargs("sdxl", steps=4))
    finally:
        hook.remove()
    assert seen == [[32, 32, 0, 0, 16, 16]] * 2 + [[32, 32, 0, 0, 32, 32]] * 2  # target size: the stage's


@pytest.mark.usefixtures("one_thread")
def test_stateful_refusals_touch_nothing(pipes, snapshot):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe, base = _plain(pipes, "sd15")
    unet, kw = pipe.unet, lambda **o: tiny.pipeline_kwargs("sd15", steps=4) | o
    before = snapshot(unet, pipe.scheduler)
    # a per-stage shift is FlowMatchEuler's: refused at apply, and by estimate, which prices only what apply runs
    shifted = {"bottleneck": {"stages": [{"scale": 2, "steps": 0.5},
                                         {"scale": 1, "steps": 0.5, "strength": 0.6, "shift": 3.0}]}}
    for refused in (lambda: fastdiff.apply(pipe, shifted),
                    lambda: fastdiff.estimate(pipe, shifted, height=32, width=32, steps=4)):
        with pytest.raises(fastdiff.UnsupportedModelError, match="UNet2DConditionModel: .*DDIMScheduler: stages "
                                                                 "\\[1\\] set a shift"):
            refused()
    assert fastdiff.session_of(pipe) is None and snapshot(unet, pipe.scheduler) == before
    # an ancestral sampler: refused at apply, naming it and what runs
    saved, pipe.scheduler = pipe.scheduler, EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        with pytest.raises(fastdiff.UnsupportedModelError, match="deterministic samplers .*UniPCMultistepScheduler, "
                                                                 "and StableDiffusionPipeline samples with "
                                                                 "EulerAncestralDiscreteScheduler"):
            fastdiff.apply(pipe, preset="bottleneck-fast")
        assert fastdiff.session_of(pipe) is None
    finally:
        pipe.scheduler = saved
    # a latent size the UNet's downsampling does not divide at half size (12 / 2 = 6, not a multiple of 4), and DDIM's
    # eta: refused at the run's first call / first step, before the UNet runs / before a second call
    calls = []
    hook = unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        with fastdiff.accelerated(pipe, preset="bottleneck-fast"):
            with pytest.raises(fastdiff.ConfigError, match=r"latents of \(12, 12\) do not divide .*multiples of 8"):
                pipe(**kw(height=24, width=24))
            assert not calls
            with pytest.raises(fastdiff.UnsupportedModelError, match=r"DDIMScheduler with \['eta'\]"):
                pipe(**kw(eta=0.5))
            assert len(calls) == 1
    finally:
        hook.remove()
    assert torch.equal(tiny.output_tensor(pipe(**kw())), base)  # the pipeline as before


@pytest.mark.usefixtures("one_thread")
def test_a_call_that_starts_part_way_is_refused(pipes):
    """img2img starts at its strength's timestep (a slice of the pipeline's schedule): the stages would not be the
    ones run, so the first step refuses it; at strength 1 it is the whole schedule and runs."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, _ = _plain(pipes, "sd15")
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in tiny.pipeline_kwargs("sd15", steps=4).items() if k not in ("height", "width")}
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with fastdiff.accelerated(i2i, preset="bottleneck-fast"):
        with pytest.raises(fastdiff.UnsupportedModelError, match="starts part-way"):
            i2i(image=image, strength=0.5, **kw)
        out = tiny.output_tensor(i2i(image=image, strength=1.0, **kw))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
