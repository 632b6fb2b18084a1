"""fastdiff's resolution-bottleneck SAMPLER on tiny real ComfyUI flow models (Flux, SD3, Wan), through
SamplerCustom's path (comfy.sample.sample_custom with a KSAMPLER): the stages run at their sizes and the output has
the full size; a single full-size stage is ComfyUI's own Euler sampler bit for bit; the stage transition is the
model's own re-noising of the resized clean estimate; it composes with fastdiff's cache node; non-flow models and
part-way runs are refused before the model is called."""

import pytest
import torch

from fastdiff.errors import ConfigError, UnsupportedModelError
from tests.comfyui import harness

pytestmark = pytest.mark.usefixtures("comfy")

STEPS = 8
SIZES = {"flux": (16, 16), "sd3": (16, 16), "wan": (2, 16, 16)}


def _node(comfy, node_pack, **settings):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FastDiffBottleneckSampler"]
    kw = {"scale": 2, "low_steps": 0.6, "strength": 0.85, "resize": "bicubic", "strength_is": "time", "stages": "",
          **settings}
    return node.execute(**kw).result[0]


def _inputs(model):
    """The latent sizes the diffusion model is called on (a forward pre-hook on it)."""
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[2:])))
    return seen, handle


@pytest.mark.parametrize("family", ("flux", "sd3", "wan"))
def test_stages_run_at_their_sizes_and_the_output_is_full_size(comfy, node_pack, family):
    model = harness.build_model(family)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    options = repr(model.model_options)
    size = SIZES[family]
    sigmas = harness.sigmas(model, steps=STEPS, scheduler="simple")
    euler = harness.sample_with(model, comfy.samplers.ksampler("euler"), sigmas, size=size)
    sampler = _node(comfy, node_pack)
    seen, handle = _inputs(model)
    try:
        out = harness.sample_with(model, sampler, sigmas, size=size)
    finally:
        handle.remove()
    assert out.shape == euler.shape and torch.isfinite(out).all() and not torch.equal(out, euler)
    low = (*size[:-2], 8, 8)
    assert seen == [low] * 5 + [size] * 3  # round(0.6 * 8) = 5 low-resolution steps, 3 at full size
    run = sampler.sampler_function
    assert [(s.scale, s.size, s.steps) for s in run.last] == [(2, low, 5), (1, size, 3)]
    assert run.last[0].sigmas[0] == 1.0 and run.last[-1].sigmas[-1] == 0.0 and run.speedup > 1.5
    assert "stage 0: scale 2" in run.report and f"estimated speedup {run.speedup:.2f}x" in run.report
    assert model.model_options.__repr__() == options
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert torch.equal(harness.sample_with(model, sampler, sigmas, size=size), out)  # a second queue item


@pytest.mark.parametrize("family", ("flux", "sd3"))
def test_one_full_size_stage_is_comfy_euler(comfy, node_pack, family):
    """scale 1: one stage from strength 1 over every step. Its sigmas are the model's own rule on a uniform time
    grid — ComfyUI's "simple" schedule, read from a table the same rule filled (equal to float rounding) — and the
    run is ComfyUI's Euler sampler on them, bit for bit (the same function, the same tensors)."""
    model = harness.build_model(family)
    sampler = _node(comfy, node_pack, scale=1)
    simple = harness.sigmas(model, steps=STEPS, scheduler="simple")
    out = harness.sample_with(model, sampler, simple)
    stage = torch.tensor(sampler.sampler_function.last[0].sigmas)
    assert torch.allclose(stage, simple, atol=1e-6, rtol=0)
    assert torch.equal(out, harness.sample_with(model, comfy.samplers.ksampler("euler"), stage))
    assert sampler.sampler_function.speedup == 1.0 and "does nothing in this run" in sampler.sampler_function.report


def test_the_stage_transition_renoises_the_resized_clean_estimate(comfy, node_pack):
    from fastdiff.mechanisms.bottleneck import resample

    model = harness.build_model("flux")
    sampler = _node(comfy, node_pack)
    latent = harness.empty_latent("flux", size=(16, 16))
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative = harness.conds("flux", 0)
    steps = []
    with torch.inference_mode():
        comfy.sample.sample_custom(model, noise, 1.0, sampler, harness.sigmas(model, steps=STEPS, scheduler="simple"),
                                   positive, negative, latent, disable_pbar=True, seed=0,
                                   callback=lambda i, denoised, x, total: steps.append((i, denoised, x)))
    assert [i for i, *_ in steps] == list(range(STEPS))
    _, clean, _ = steps[4]  # the low-resolution stage's last step: its clean estimate (8x8)
    _, _, first = steps[5]  # the full-size stage's first input
    sigma = sampler.sampler_function.last[1].sigmas[0]
    fresh = resample.row_noise(noise, first.shape, 1, first.dtype, first.device)  # the run's start is its noise
    expected = sigma * fresh + (1 - sigma) * resample.resize(clean, (16, 16), "bicubic")
    assert clean.shape[-2:] == (8, 8) and torch.allclose(first, expected, atol=1e-6, rtol=0)


def test_composes_with_the_cache_node(comfy, node_pack):
    from fastdiff.integrations import comfyui as host

    model = harness.build_model("flux")
    cached = host.patch(model, "cache", {"policy": "static", "interval": 2, "start": 0.0, "end": 1.0})
    sampler = _node(comfy, node_pack)
    out = harness.sample_with(cached, sampler, harness.sigmas(model, steps=STEPS, scheduler="simple"), size=(16, 16))
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    summary = host.plan_of(cached).last
    assert [r.step for r in summary.per_step] == list(range(STEPS))
    assert [r.image_tokens for r in summary.per_step] == [16] * 5 + [64] * 3  # Flux' 2x2 patches of 8x8 / 16x16
    decisions = [r.decisions for r in summary.per_step]
    assert ["cache=reuse"] in decisions[:5]
    assert decisions[5] == ["cache=compute"]  # a new grid: nothing cached on the small one is reused at full size


def test_refusals_come_before_the_model_runs(comfy, node_pack):
    sampler = _node(comfy, node_pack)
    sd15 = harness.build_model("sd15")
    seen, handle = _inputs(sd15)
    try:
        with pytest.raises(UnsupportedModelError, match="flow-matching"):
            harness.sample_with(sd15, sampler, harness.sigmas(sd15, steps=STEPS))
    finally:
        handle.remove()
    assert not seen
    flux = harness.build_model("flux")
    sigmas = harness.sigmas(flux, steps=STEPS, scheduler="simple")
    seen, handle = _inputs(flux)
    try:
        with pytest.raises(ConfigError, match="starts part-way"):  # denoise < 1 (img2img)
            harness.sample_with(flux, sampler, sigmas[3:], size=(16, 16))
        with pytest.raises(ConfigError, match="not divisible by stage scale 4"):
            harness.sample_with(flux, _node(comfy, node_pack, scale=4), sigmas, size=(18, 18))
    finally:
        handle.remove()
    assert not seen
    with pytest.raises(ConfigError, match="strength"):
        _node(comfy, node_pack, strength=0.0)
    with pytest.raises(ConfigError, match="last stage must be full size"):
        _node(comfy, node_pack, stages="4:0.5:1, 2:0.5:0.8")
    with pytest.raises(ConfigError, match="not scale:steps:strength"):
        _node(comfy, node_pack, stages="4:0.5")


def test_three_stages_from_the_stages_input(comfy, node_pack):
    model = harness.build_model("flux")
    sampler = _node(comfy, node_pack, stages="4:0.25:1, 2:0.25:0.9, 1:0.5:0.8")
    out = harness.sample_with(model, sampler, harness.sigmas(model, steps=STEPS, scheduler="simple"), size=(16, 16))
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    run = sampler.sampler_function
    assert [(s.scale, s.size, s.steps) for s in run.last] == [(4, (4, 4), 2), (2, (8, 8), 2), (1, (16, 16), 4)]
    assert run.last[1].sigmas[0] < 1 and run.last[2].sigmas[0] < run.last[1].sigmas[0]
