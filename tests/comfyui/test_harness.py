"""The ComfyUI harness itself: each tiny ComfyUI model builds from its seed, samples deterministically through
ComfyUI's own sampler, and ComfyUI's public patching hooks (wrappers, DiT block replacement, attn1 patches, the
attention override) and a core node of ComfyUI's (EasyCache) act on it. The node-pack tests build on these."""

import pytest
import torch

from tests.comfyui import harness

pytestmark = pytest.mark.usefixtures("comfy")

FAMILIES = harness.FAMILIES


def _state(model):
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_seeded_and_leaves_torch_rng_alone(family):
    rng = torch.random.get_rng_state()
    a, b, c = harness.build_model(family, seed=0), harness.build_model(family, seed=0), harness.build_model(family, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.isfinite(v).all() for v in sa.values())  # nothing left as torch.empty


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_deterministically(family):
    model = harness.build_model(family)
    out = harness.sample(model, seed=0)
    assert out.shape == harness.empty_latent(family).shape
    assert torch.isfinite(out).all() and out.abs().mean() > 0
    assert torch.equal(out, harness.sample(model, seed=0))
    assert not torch.equal(out, harness.sample(model, seed=1))


# SD3's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py) has no DIFFUSION_MODEL wrapper point in 0.3.75:
# per-call state that must work on every family sits in APPLY_MODEL
HAS_DIFFUSION_MODEL_WRAPPER = {"flux": True, "sd15": True, "sd3": False, "wan": True}


@pytest.mark.parametrize("family", FAMILIES)
def test_wrappers_fire_on_a_clone_only(comfy, family):
    wmp = comfy.patcher_extension.WrappersMP
    model = harness.build_model(family)
    base = harness.sample(model)
    seen = {"outer": 0, "sigmas": [], "branches": set(), "diffusion": 0}

    def outer(executor, *args, **kwargs):
        seen["outer"] += 1
        return executor(*args, **kwargs)

    def apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen["sigmas"].append(float(transformer_options["sigmas"][0]))
        seen["branches"].update(transformer_options["cond_or_uncond"])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def diffusion(executor, *args, **kwargs):
        seen["diffusion"] += 1
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(wmp.OUTER_SAMPLE, "harness", outer)
    patched.add_wrapper_with_key(wmp.APPLY_MODEL, "harness", apply_model)
    patched.add_wrapper_with_key(wmp.DIFFUSION_MODEL, "harness", diffusion)
    out = harness.sample(patched)
    rec = harness.RECORDS[family]
    schedule = harness.sigmas(model)
    assert seen["outer"] == 1
    assert seen["sigmas"] == pytest.approx(schedule[:-1].tolist())  # one call a step (CFG batched), in order
    assert seen["branches"] == ({0, 1} if rec.cfg > 1 else {0})  # 0 = cond, 1 = uncond
    assert seen["diffusion"] == (len(seen["sigmas"]) if HAS_DIFFUSION_MODEL_WRAPPER[family] else 0)
    assert torch.equal(out, base)  # pass-through wrappers change nothing
    assert not model.wrappers and torch.equal(harness.sample(model), base)  # the input MODEL is untouched


def test_flux_double_block_replace():
    model = harness.build_model("flux")
    base = harness.sample(model)
    depth = harness.RECORDS["flux"].unet_config["depth"]
    calls = []

    def replace(i, scale):
        def block(args, extra):
            calls.append(i)
            out = extra["original_block"](args)
            return {"img": out["img"] * scale, "txt": out["txt"]}
        return block

    same, changed = model.clone(), model.clone()
    for i in range(depth):
        same.set_model_patch_replace(replace(i, 1.0), "dit", "double_block", i)
    changed.set_model_patch_replace(replace(0, 0.5), "dit", "double_block", 0)
    assert torch.equal(harness.sample(same), base)
    assert calls == list(range(depth)) * harness.RECORDS["flux"].steps
    assert not torch.equal(harness.sample(changed), base)


def test_sd15_attn1_patch():
    model = harness.build_model("sd15")
    base = harness.sample(model)
    seen = []

    def identity(q, k, v, extra):
        seen.append(extra["block"])
        return q, k, v

    same, changed = model.clone(), model.clone()
    same.set_model_attn1_patch(identity)
    changed.set_model_attn1_patch(lambda q, k, v, extra: (q * 0.5, k, v))
    assert torch.equal(harness.sample(same), base)
    blocks = {b[0] for b in seen}
    assert blocks == {"input", "middle", "output"}
    assert len(seen) == 7 * harness.RECORDS["sd15"].steps  # 2 input + 1 middle + 4 output transformers, batched CFG
    assert not torch.equal(harness.sample(changed), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_override_reaches_every_attention(family):
    model = harness.build_model(family)
    base = harness.sample(model)
    calls = []

    def override(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    patched = model.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = override
    assert torch.equal(harness.sample(patched), base)
    assert len(calls) > 0 and len(calls) % harness.RECORDS[family].steps == 0
    assert "optimized_attention_override" not in model.model_options["transformer_options"]


def _computed_calls(model):
    """Count the denoiser's real forward passes (its first layer's calls), whatever a wrapper decides."""
    first = model.model.diffusion_model.img_in
    count = []
    handle = first.register_forward_hook(lambda *a: count.append(1))
    return count, handle


def test_comfy_easycache_node_runs_on_tiny_flux(comfy):
    easycache = harness.load_comfy_node("nodes_easycache.py").EasyCacheNode
    assert comfy.nodes.NODE_CLASS_MAPPINGS["EasyCache"] is easycache
    model = harness.build_model("flux")
    steps = 8
    base = harness.sample(model, steps=steps)
    never = easycache.execute(model, reuse_threshold=0.0, start_percent=0.0, end_percent=1.0, verbose=False).result[0]
    eager = easycache.execute(model, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False).result[0]
    count, handle = _computed_calls(model)
    try:
        assert torch.equal(harness.sample(never, steps=steps), base)  # a threshold of 0 never reuses
        assert len(count) == steps
        count.clear()
        out = harness.sample(eager, steps=steps)
        skipped = steps - len(count)
    finally:
        handle.remove()
    assert 0 < skipped < steps
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert not model.wrappers and torch.equal(harness.sample(model, steps=steps), base)


def test_ref_flux_loads_into_comfy_flux_and_samples_its_digits():
    """Our trained diffusers Flux, through ComfyUI's own key conversion, is the same function in ComfyUI's Flux,
    and ComfyUI's sampler draws the digits it was asked for (the reference classifier judges)."""
    from fastdiff.eval import timing
    from fastdiff.eval.reference.flux import flux_predict

    model, pipe = harness.build_reference("ref-flux")
    g = torch.Generator().manual_seed(0)
    x, y, sigma = torch.randn(2, 1, 32, 32, generator=g), torch.tensor([3, 10]), torch.tensor([0.7, 0.7])
    parts = {"transformer": pipe.transformer, "class_embedding": pipe.class_embedding,
             "pooled_embedding": pipe.pooled_embedding}
    (positive, _) = harness.reference_conds(pipe, y)
    with torch.no_grad():
        expected = flux_predict(parts, x, sigma, y)
        got = model.model.diffusion_model(x, sigma, positive[0][0], y=positive[0][1]["pooled_output"])
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    labels = torch.arange(2)  # the classifier's check reads sample i as class i
    out = harness.sample(model, "flux", steps=6, cfg=3.0, conditioning=harness.reference_conds(pipe, labels),
                         latent=torch.zeros(2, 1, 32, 32))
    assert timing.class_accuracy("ref-flux")(((out + 1) / 2).clamp(0, 1)) == 1.0


def test_comfy_easycache_writes_into_the_model_input_on_fp32_flow_models(comfy):
    """Why bench_comfyui has an "input copied" EasyCache row: ComfyUI 0.3.75's EasyCache adds its cached difference
    into the diffusion model's input in place on a skipped step, and on a float32 flow model that tensor is also the
    sampler's model_input, so the skipped step's denoised output is wrong. With the input copied first (what a
    fp16/bf16 run's cast does) the same skips stay close to the uncached run. If ComfyUI fixes it, this fails."""
    from fastdiff.eval.bench_comfyui import _copy_input
    from fastdiff.eval.metrics import psnr

    easycache = harness.load_comfy_node("nodes_easycache.py").EasyCacheNode
    model = harness.build_model("flux")
    base = harness.sample(model, steps=10)
    copied = model.clone()
    copied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "copy_input", _copy_input)
    settings = dict(reuse_threshold=0.2, start_percent=0.0, end_percent=1.0, verbose=False)
    shipped = harness.sample(easycache.execute(model, **settings).result[0], steps=10)
    fixed = harness.sample(easycache.execute(copied, **settings).result[0], steps=10)
    span = float(base.max() - base.min())
    assert psnr(fixed, base, span) > psnr(shipped, base, span) + 10
