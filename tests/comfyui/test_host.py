"""The ComfyUI host (fastdiff.integrations.comfyui) on tiny real ComfyUI models: the same mechanisms as diffusers,
reached through ComfyUI's wrappers and DiT block patches only. Compute changes and the summary says exactly what
ran; the input MODEL, other clones and other queue items are never touched; a no-op setting is bit-identical."""

import types

import pytest
import torch

from fastdiff.errors import ConfigError, UnsupportedModelError
from tests.comfyui import harness

pytestmark = pytest.mark.usefixtures("comfy")

FAMILIES = ("flux", "sd15", "sd3", "wan")
STEPS = 8
STATIC = {"policy": "static", "interval": 2, "start": 0.1, "end": 0.9}


@pytest.fixture(scope="module")
def host():
    from fastdiff.integrations import comfyui

    return comfyui


def _weights(model):
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forwards(model):
    """Counts the diffusion model's real forward passes (its first layer's), whatever the wrappers decide."""
    net = model.model.diffusion_model
    first = {"Flux": lambda: net.img_in, "UNetModel": lambda: net.input_blocks[0][0],
             "OpenAISignatureMMDITWrapper": lambda: net.x_embedder.proj, "WanModel": lambda: net.patch_embedding}
    first = first[type(net).__name__]()
    count = []
    return count, first.register_forward_hook(lambda *a: count.append(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_skips_steps_and_summary_matches_the_cost_model(host, family):
    from fastdiff.context import TokenLayout
    from fastdiff.cost.estimate import dense_table, schedule
    from fastdiff.mechanisms.caching import StepCache

    model = harness.build_model(family)
    base = harness.sample(model, steps=STEPS)
    patched = host.patch(model, "cache", STATIC)
    count, handle = _forwards(model)
    try:
        out = harness.sample(patched, steps=STEPS)
    finally:
        handle.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    plan = host.plan_of(patched)
    summary = plan.last
    reused = [r.step for r in summary.per_step if r.decisions == ["cache=reuse"]]
    # warm-up ceil(0.1 * 8) = 1, cool-down 8 - floor(0.9 * 8) = 1, then every 2nd step reused
    assert reused == [2, 4, 6]
    assert summary.steps == STEPS and summary.calls == STEPS
    if family == "sd15":  # the whole UNet is the cached span: a reused step never runs it
        assert len(count) == STEPS - len(reused)
    else:  # a DiT's embedders run every step, its blocks only where computed
        blocks = summary.per_step[0].blocks_total
        assert len(count) == STEPS and blocks == {"flux": 4, "sd3": 2, "wan": 2}[family]
        assert [r.blocks_computed for r in summary.per_step] == [0 if r.step in reused else blocks
                                                                 for r in summary.per_step]
    # the run's accounted FLOPs are the cost model's price of the same schedule (static: exact)
    run = host.ComfyRun(host.Plan({"cache": STATIC}), model.model.diffusion_model, None, steps=STEPS)
    layout = summary.per_step[0]
    layout = TokenLayout(run.adapter.layout({"x": harness.empty_latent(family),
                                             "context": torch.zeros(1, layout.text_tokens, 1)}).grid,
                         layout.text_tokens, run.adapter.spec.text_position)
    cfg = harness.RECORDS[family].cfg > 1
    dense = dense_table(run.cost_model, schedule([(layout, STEPS)], 1, cfg))
    cached = StepCache(run.config.cache).estimate_cost(dense)
    assert summary.dense_flops == pytest.approx(dense.flops)
    assert summary.flops == pytest.approx(cached.flops)
    assert summary.estimated_speedup == pytest.approx(dense.flops / cached.flops) and summary.estimated_speedup > 1.2
    assert f"{summary.estimated_speedup:.2f}x" in plan.report and "3 reuse" in plan.report


@pytest.mark.parametrize("family", FAMILIES)
def test_input_model_is_untouched(host, family):
    model = harness.build_model(family)
    weights, options = _weights(model), repr(model.model_options)
    base = harness.sample(model, steps=STEPS)
    patched = host.patch(model, "cache", STATIC)
    harness.sample(patched, steps=STEPS)
    assert _same_weights(weights, _weights(model))
    assert repr(model.model_options) == options and not model.wrappers
    assert torch.equal(harness.sample(model, steps=STEPS), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_setting_is_bit_identical_and_says_so(host, family):
    model = harness.build_model(family)
    base = harness.sample(model, steps=STEPS)
    never = host.patch(model, "cache", {**STATIC, "start": 1.0, "end": 1.0})
    assert torch.equal(harness.sample(never, steps=STEPS), base)
    plan = host.plan_of(never)
    assert plan.last.estimated_speedup == 1.0
    assert plan.notes and "cache setting does nothing" in plan.notes[0] and "no step can be skipped" in plan.notes[0]


def test_few_steps_says_the_cache_does_nothing(host):
    model = harness.build_model("flux")
    patched = host.patch(model, "cache", {"policy": "static", "interval": 2, "start": 0.3, "end": 0.7})
    harness.sample(patched, steps=2)  # warm-up 1 of 2 steps, cool-down 2 - floor(1.4) = 1
    assert any("does nothing" in n and "with 2 steps" in n for n in host.plan_of(patched).notes)
    harness.sample(patched, steps=10)  # the same node at 10 steps does skip: the note was that run's only
    assert not host.plan_of(patched).notes and host.plan_of(patched).last.estimated_speedup > 1


@pytest.mark.parametrize("family", ("flux", "sd15"))
def test_two_clones_and_two_queue_items_share_no_state(host, family):
    model = harness.build_model(family)
    a = host.patch(model, "cache", STATIC)
    b = host.patch(model, "cache", {**STATIC, "interval": 3})
    out_a = harness.sample(a, steps=STEPS)
    out_b = harness.sample(b, steps=STEPS)
    assert not torch.equal(out_a, out_b)
    # again, interleaved and with another seed in between: each queue item starts afresh
    harness.sample(a, steps=STEPS, seed=5)
    assert torch.equal(harness.sample(b, steps=STEPS), out_b)
    assert torch.equal(harness.sample(a, steps=STEPS), out_a)
    assert torch.equal(harness.sample(host.patch(model, "cache", STATIC), steps=STEPS), out_a)  # a fresh clone


def test_chained_nodes_make_one_config_and_keep_each_input(host):
    model = harness.build_model("sd15")
    cached = host.patch(model, "cache", STATIC)
    both = host.patch(cached, "guidance", {"start": 0.5})
    out = harness.sample(both, steps=STEPS)
    assert torch.isfinite(out).all()
    summary = host.plan_of(both).last
    assert "cache[" in summary.config and "guidance" in summary.config
    assert [d for r in summary.per_step for d in r.decisions][-1] == "guidance=skip-uncond,cache=compute"
    assert host.plan_of(cached).last is None and set(host.plan_of(cached).sections) == {"cache"}
    assert len(both.get_wrappers("diffusion_model", host.KEY)) == 1  # one clock for both sections


def test_guidance_skips_the_negative_rows(host):
    model = harness.build_model("sd15")
    base = harness.sample(model, steps=6)
    skip = host.patch(model, "guidance", {"start": 0.5})
    out = harness.sample(skip, steps=6)
    summary = host.plan_of(skip).last
    skipped = [r.step for r in summary.per_step if r.decisions == ["guidance=skip-uncond"]]
    assert skipped == [3, 4, 5]
    assert summary.per_step[0].branches == ["cond/uncond"]
    assert summary.estimated_speedup == pytest.approx(12 / 9)  # 3 of 12 rows skipped
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    # Flux dev is sampled at cfg 1 (no negative rows): the setting does nothing, and says so
    flux = host.patch(harness.build_model("flux"), "guidance", {"start": 0.5})
    harness.sample(flux, steps=4)
    assert "cfg 1.0" in host.plan_of(flux).notes[0]


def test_block_patch_chains_to_another_nodes_patch(host):
    model = harness.build_model("flux")
    seen = []

    def theirs(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    other = model.clone()
    other.set_model_patch_replace(theirs, "dit", "double_block", 0)
    base = harness.sample(other, steps=STEPS)
    calls = len(seen)
    never = host.patch(other, "cache", {**STATIC, "start": 1.0, "end": 1.0})
    assert torch.equal(harness.sample(never, steps=STEPS), base)
    assert len(seen) == 2 * calls  # theirs still ran, under ours


def test_refusals_come_before_anything_is_patched(host):
    model = harness.build_model("sd15")
    options = repr(model.model_options)
    with pytest.raises(UnsupportedModelError, match="UNet"):  # a UNet has no block residual to read
        host.patch(model, "cache", {"policy": "residual", "head": 1})
    with pytest.raises(ConfigError, match="fraction"):
        host.patch(model, "cache", {**STATIC, "start": 1.5})
    with pytest.raises(ConfigError, match="after its end"):
        host.patch(model, "cache", {**STATIC, "start": 0.8, "end": 0.2})
    with pytest.raises(ConfigError, match="interval"):
        host.patch(model, "cache", {**STATIC, "interval": 0})
    with pytest.raises(UnsupportedModelError, match="no ComfyUI patch around them"):  # ComfyUI patches no MLP
        host.patch(model, "merge", {"ratio": 0.5, "targets": ["self_attention", "mlp"]})
    assert repr(model.model_options) == options and not model.wrappers
    sd3 = harness.build_model("sd3")  # its MMDiT has no DIFFUSION_MODEL wrapper: nothing wraps the whole model
    with pytest.raises(UnsupportedModelError, match="no DIFFUSION_MODEL wrapper point"):
        host.patch(sd3, "guidance", {"start": 0.5})
    assert not sd3.wrappers
    other = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)), model_options={})
    with pytest.raises(UnsupportedModelError, match="supported ComfyUI diffusion models"):
        host.patch(other, "cache", STATIC)


def test_cost_model_prices_comfy_models(host):
    flux = host.ComfyRun(host.Plan({}), harness.build_model("flux").model.diffusion_model, None, steps=4)
    terms = [t for t in flux.cost_model.terms if t.kind == "attention"]
    assert [t.path for t in terms] == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert [t.block for t in terms] == [0, 1, 2, 3] and terms[0].q_streams == ("joint",)
    unet = host.ComfyRun(host.Plan({}), harness.build_model("sd15").model.diffusion_model, None, steps=4)
    assert {t.block for t in unet.cost_model.terms} == {0}  # the whole UNet is its one block
    levels = {t.path: t.level for t in unet.cost_model.terms}
    assert levels["input_blocks.1.1.transformer_blocks.0.attn1"] == 0
    assert levels["input_blocks.2.0.op"] == 1 and levels["middle_block.1.transformer_blocks.0.attn1"] == 1
    assert levels["output_blocks.1.2.conv"] == 0 and levels["output_blocks.0.1.transformer_blocks.0.attn1"] == 1


@pytest.mark.parametrize("family", ("flux", "sd15"))
def test_accelerate_plans_each_run_for_its_steps(host, family):
    model = harness.build_model(family)
    fast = host.patch(model, host.ACCELERATE, {"speedup": 2.0})
    harness.sample(fast, steps=12)
    plan = host.plan_of(fast)
    summary = plan.last
    assert summary.estimated_speedup >= 2.0
    assert "accelerate: target 2.00x: cache: " in plan.report
    assert f"predicted {summary.estimated_speedup:.2f}x FLOPs over 12 steps" in plan.report  # the plan is what ran
    assert not model.wrappers


def test_accelerate_keeps_what_other_nodes_set_and_refuses_the_unreachable(host):
    from fastdiff.errors import ConfigError

    model = harness.build_model("sd15")
    base = harness.sample(model, steps=12)
    skip = host.patch(model, "guidance", {"start": 0.5})
    both = host.patch(skip, host.ACCELERATE, {"speedup": 2.5})
    harness.sample(both, steps=12)
    summary = host.plan_of(both).last
    assert "guidance[" in summary.config and "cache[" in summary.config and summary.estimated_speedup >= 2.5
    far = host.patch(model, host.ACCELERATE, {"speedup": 50.0})
    with pytest.raises(ConfigError, match="cannot be reached"):
        harness.sample(far, steps=12)
    with pytest.raises(ConfigError, match="target speedup"):
        host.patch(model, host.ACCELERATE, {"speedup": 0.5})
    assert torch.equal(harness.sample(model, steps=12), base)


def test_cost_model_prices_sd3_and_wan_attention(host):
    sd3 = host.ComfyRun(host.Plan({}), harness.build_model("sd3").model.diffusion_model, None, steps=4)
    assert [(t.path, t.block, t.coef) for t in sd3.cost_model.terms if t.kind == "attention"] == \
        [("joint_blocks.0.x_block.attn", 0, 4.0 * 128), ("joint_blocks.1.x_block.attn", 1, 4.0 * 128)]
    wan = host.ComfyRun(host.Plan({}), harness.build_model("wan").model.diffusion_model, None, steps=4)
    attn = [(t.path, t.kv_streams) for t in wan.cost_model.terms if t.kind == "attention"]
    assert attn == [(f"blocks.{i}.{kind}", kv) for i in range(2)
                    for kind, kv in (("self_attn", ("image",)), ("cross_attn", ("text",)))]
    assert {t.stream for t in wan.cost_model.terms if ".cross_attn.k" in t.path} == {"text"}


def test_a_threshold_that_skips_nothing_says_so_after_the_run(host):
    model = harness.build_model("flux")
    base = harness.sample(model, steps=STEPS)
    never = host.patch(model, "cache", {"policy": "easycache", "threshold": 0.0, "start": 0.0, "end": 1.0})
    assert torch.equal(harness.sample(never, steps=STEPS), base)
    notes = host.plan_of(never).notes
    assert len(notes) == 1 and "cache setting skipped nothing in this run (8 model calls" in notes[0]


def test_second_order_sampler_counts_its_calls_in_steps(host):
    model = harness.build_model("sd15")
    patched = host.patch(model, "cache", STATIC)
    out = harness.sample(patched, steps=4, sampler="heun")  # two calls a step but the last
    summary = host.plan_of(patched).last
    assert torch.isfinite(out).all()
    assert summary.calls == 7 and summary.steps == 4 and [r.calls for r in summary.per_step] == [1, 2, 2, 2]


def test_lora_on_a_patched_clone(host):
    """A LoRA-style weight patch on a clone of our clone (what a LoRA loader downstream does) applies under the
    cache, and leaves both our clone and the input model computing what they did."""
    model = harness.build_model("flux")
    base = harness.sample(model, steps=STEPS)
    cached = host.patch(model, "cache", STATIC)
    out = harness.sample(cached, steps=STEPS)
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    weight = model.model.state_dict()[key].clone()
    lora = cached.clone()
    lora.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0)  # a "diff" patch: weight + 0.05
    assert not torch.equal(harness.sample(lora, steps=STEPS), out)
    assert host.plan_of(lora).last.per_step[2].decisions == ["cache=reuse"]  # the clone keeps the cache
    assert torch.equal(harness.sample(cached, steps=STEPS), out)
    assert torch.equal(harness.sample(model, steps=STEPS), base) and torch.equal(model.model.state_dict()[key], weight)


def test_cache_in_comfy_flux_reuses_what_diffusers_flux_reuses(host):
    """ref-flux in ComfyUI's Flux under the static cache computes what the same diffusers Flux computes under
    fastdiff.apply's cache: a computed step then a reused one (the span's residual from the first step added to the
    second step's span input), to float tolerance (the two models differ by ~1e-6 dense, test_harness); and the
    reuse is not the dense result. ComfyUI's blocks add into their inputs in place: a span input kept without a copy
    became the double blocks' output, and the reuse lost their residual (a ~20 dB PSNR cache on ref-flux)."""
    import fastdiff
    from fastdiff.eval.reference.flux import flux_predict

    c = harness.load_comfy()
    model, pipe = harness.build_reference("ref-flux")
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    sigmas, y = torch.tensor([0.8, 0.6, 0.0]), torch.tensor([3, 7])
    conds = harness.reference_conds(pipe, y)

    def sample(m):  # two Euler steps on a zero latent: 0.8 -> 0.6 (computed) -> 0 (reused)
        with torch.inference_mode():
            return c.sample.sample_custom(m, noise, 1.0, c.samplers.ksampler("euler"), sigmas, conds[0], conds[1],
                                          torch.zeros(2, 1, 32, 32), disable_pbar=True, seed=0)

    dense = sample(model)
    patched = host.patch(model, "cache", {"policy": "static", "interval": 2, "start": 0.0, "end": 1.0})
    ours = sample(patched)
    assert [r.decisions for r in host.plan_of(patched).last.per_step] == [["cache=compute"], ["cache=reuse"]]
    parts = {"transformer": pipe.transformer, "class_embedding": pipe.class_embedding,
             "pooled_embedding": pipe.pooled_embedding}
    handle = fastdiff.apply(pipe, {"cache": {"policy": "static", "interval": 2, "warmup": 0, "cooldown": 0}})
    try:
        with torch.no_grad():
            x = sigmas[0] * noise
            for s, t in zip(sigmas[:-1], sigmas[1:]):
                x = x + (t - s) * flux_predict(parts, x, s.reshape(1), y)
        decisions = [r.decisions for r in handle.summary().per_step]
    finally:
        handle.remove()
    assert decisions == [["cache=compute"], ["cache=reuse"]]
    assert torch.allclose(ours, x, atol=1e-4, rtol=0)
    assert (ours - dense).abs().max() > 0.05
