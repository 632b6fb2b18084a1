"""The attention nodes on tiny real ComfyUI models: token merging (fastdiff's ToMe / ToDo through ComfyUI's
attn1/attn2 patches, on the UNet). Each changes compute and its report says exactly what ran (tokens merged, the
summary's FLOPs == the cost model's price), the input MODEL is untouched, a no-op setting is bit-identical, clones
and queue items share nothing, and what cannot apply is refused before anything is patched."""


import pytest
import torch

from fastdiff.errors import UnsupportedModelError
from tests.comfyui import harness

pytestmark = pytest.mark.usefixtures("comfy")

STEPS = 4


@pytest.fixture(scope="module")
def host():
    from fastdiff.integrations import comfyui

    return comfyui


def _price(host, model, sections, summary, family="sd15"):
    """(dense, priced) FLOPs of the run by the cost model, from the run's own layout and steps."""
    from fastdiff.context import TokenLayout
    from fastdiff.cost.estimate import dense_table, schedule

    run = host.ComfyRun(host.Plan(sections), model.model.diffusion_model, None, steps=summary.steps)
    first = summary.per_step[0]
    layout = run.adapter.layout({"x": harness.empty_latent(family), "context": torch.zeros(1, first.text_tokens, 1)})
    layout = TokenLayout(layout.grid, first.text_tokens, run.adapter.spec.text_position)
    table = dense_table(run.cost_model, schedule([(layout, summary.steps)], 1, harness.RECORDS[family].cfg > 1))
    dense = table.flops
    for mechanism in run.mechanisms:
        table = mechanism.estimate_cost(table)
    return dense, table.flops


def _attn1_tokens(model):
    """Token counts attn1 of the finest-level transformer block runs on, per call (a forward hook on it)."""
    net = model.model.diffusion_model
    seen = []
    handle = net.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(
        lambda m, a, kw_out=None: seen.append(a[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("method", ("tome", "todo"))
def test_merge_node_runs_on_fewer_tokens_and_reports_them(host, node_pack, comfy, method):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FastDiffTokenMerge"]
    model = harness.build_model("sd15")
    options = repr(model.model_options)
    base = harness.sample(model, steps=STEPS)
    patched = node.execute(model=model, method=method, ratio=0.5, factor=2, targets="self", max_downsample="1",
                           start_percent=0.0, end_percent=1.0).result[0]
    seen, handle = _attn1_tokens(model)
    try:
        out = harness.sample(patched, steps=STEPS)
    finally:
        handle.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    # tome: attn1 runs on half of the 8x8 latent's 64 tokens; todo: on all 64 queries (its keys pooled)
    assert seen == [32 if method == "tome" else 64] * STEPS
    plan = host.plan_of(patched)
    summary = plan.last
    sections = plan.sections
    dense, priced = _price(host, model, sections, summary)
    assert summary.dense_flops == pytest.approx(dense) and summary.flops == pytest.approx(priced) and priced < dense
    # three transformer blocks are at the finest level (input 1, output 1 and 2): 32 tokens merged at each, per call
    sites = [r for r in summary.per_step]
    assert all(r.decisions == ["merge=" + ("kv 64>16" if method == "todo" else "64>32")] for r in sites)
    # tome merges 32 of the 64 tokens away at each; todo pools the 64 keys 2x2 into 16: 48 pooled away
    away, what = (48, "keys/values pooled away") if method == "todo" else (32, "image tokens merged away")
    assert f"merge: {3 * away * STEPS} of {3 * 64 * STEPS} {what}" in plan.report
    assert repr(model.model_options) == options and not model.wrappers
    assert torch.equal(harness.sample(model, steps=STEPS), base)


def test_merge_noop_settings_are_bit_identical(host):
    model = harness.build_model("sd15")
    base = harness.sample(model, steps=STEPS)
    # ratio 0; a step range no step of 4 falls in (round(0.9 * 4) = 4 to 4)
    for settings in ({"ratio": 0.0}, {"ratio": 0.5, "start": 0.9}, {"method": "todo", "start": 0.9}):
        patched = host.patch(model, "merge", settings)
        assert torch.equal(harness.sample(patched, steps=STEPS), base), settings
        plan = host.plan_of(patched)
        assert "merge setting does nothing" in plan.notes[0] and "no tokens merged" in plan.report


def test_merge_clones_and_queue_items_share_nothing(host):
    model = harness.build_model("sd15")
    a = host.patch(model, "merge", {"ratio": 0.5})
    b = host.patch(model, "merge", {"ratio": 0.3, "targets": ["self_attention", "cross_attention"]})
    out_a, out_b = harness.sample(a, steps=STEPS), harness.sample(b, steps=STEPS)
    assert not torch.equal(out_a, out_b)
    harness.sample(a, steps=STEPS, seed=3)
    assert torch.equal(harness.sample(b, steps=STEPS), out_b)
    assert torch.equal(harness.sample(a, steps=STEPS), out_a)
    # b merges around attn2 too (its queries): priced, and the report says so
    summary = host.plan_of(b).last
    assert summary.flops == pytest.approx(_price(host, model, host.plan_of(b).sections, summary)[1])
    assert f"merge: {2 * 3 * 19 * STEPS} of" in host.plan_of(b).report  # int(0.3 * 64) = 19 at attn1 and attn2


def test_merge_composes_with_the_cache_node(host):
    model = harness.build_model("sd15")
    cached = host.patch(model, "cache", {"policy": "static", "interval": 2, "start": 0.0, "end": 1.0})
    both = host.patch(cached, "merge", {"ratio": 0.5})
    out = harness.sample(both, steps=STEPS)
    summary = host.plan_of(both).last
    assert torch.isfinite(out).all()
    assert [r.decisions for r in summary.per_step] == [["cache=compute,merge=64>32"], ["cache=reuse"]] * 2
    assert summary.flops == pytest.approx(_price(host, model, host.plan_of(both).sections, summary)[1])
    again = host.patch(both, "merge", {"ratio": 0.5})  # a second merge node: one config, the patches once
    patches = again.model_options["transformer_options"]["patches"]
    assert len(patches["attn1_patch"]) == 1 and len(patches["attn2_output_patch"]) == 1


def test_merge_refusals_come_before_anything_is_patched(host):
    for family in ("flux", "sd3", "wan"):
        model = harness.build_model(family)
        options = repr(model.model_options)
        with pytest.raises(UnsupportedModelError, match="token merging runs through ComfyUI's attn1/attn2"):
            host.patch(model, "merge", {"ratio": 0.5})
        assert repr(model.model_options) == options and not model.wrappers
    model = harness.build_model("sd15")
    with pytest.raises(UnsupportedModelError, match="proportional"):
        host.patch(model, "merge", {"ratio": 0.5, "proportional": True})
    assert "patches" not in model.model_options.get("transformer_options", {})


# -- sparse attention ------------------------------------------------------------------------------------
SIZE = (16, 16)  # latent: Flux 8x8 = 64 image tokens (4 blocks of 16), the UNet 16x16 = 256 at its finest level
WINDOW = {"pattern": "window", "window": [1, 1, 1], "block": 16, "start": 0.0}
TOPK = {"pattern": "topk", "density": 0.25, "block": 16, "start": 0.0}


def _sparse_price(host, model, sections, summary, family):
    from fastdiff.context import TokenLayout
    from fastdiff.cost.estimate import dense_table, schedule

    run = host.ComfyRun(host.Plan(sections), model.model.diffusion_model, None, steps=summary.steps)
    first = summary.per_step[0]
    layout = run.adapter.layout({"x": harness.empty_latent(family, size=SIZE),
                                 "context": torch.zeros(1, first.text_tokens, 1)})
    layout = TokenLayout(layout.grid, first.text_tokens, run.adapter.spec.text_position)
    table = dense_table(run.cost_model, schedule([(layout, summary.steps)], 1, harness.RECORDS[family].cfg > 1))
    dense = table.flops
    for mechanism in run.mechanisms:
        table = mechanism.estimate_cost(table)
    return dense, table.flops


@pytest.mark.parametrize("family", ("flux", "sd15"))
@pytest.mark.parametrize("settings", (WINDOW, TOPK), ids=("window", "topk"))
def test_sparse_node_changes_compute_and_reports_its_density(host, node_pack, comfy, family, settings):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FastDiffSparseAttention"]
    model = harness.build_model(family)
    options = repr(model.model_options)
    base = harness.sample(model, steps=STEPS, size=SIZE)
    patched = node.execute(model=model, pattern=settings["pattern"], density=settings.get("density", 0.25),
                           top_p=0.9, window=1, block="16", start_percent=0.0).result[0]
    out = harness.sample(patched, steps=STEPS, size=SIZE)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    plan = host.plan_of(patched)
    summary = plan.last
    report = summary.mechanisms["sparse"]["density"]
    sites = {"flux": 4, "sd15": 7}[family]  # Flux' 2 + 2 blocks; the UNet's 7 transformer blocks
    assert len(report) == sites and all(0 < d < 1 for d in report.values())
    mean = sum(report.values()) / len(report)
    assert f"mean attention density {mean:.3f} over {sites} self-attention sites, {STEPS} of {STEPS} calls" in \
        plan.report
    dense, priced = _sparse_price(host, model, plan.sections, summary, family)
    assert summary.dense_flops == pytest.approx(dense) and summary.flops == pytest.approx(priced) and priced < dense
    assert repr(model.model_options) == options and not model.wrappers
    assert torch.equal(harness.sample(model, steps=STEPS, size=SIZE), base)


@pytest.mark.parametrize("family", ("flux", "sd15"))
def test_sparse_noop_settings_are_bit_identical(host, family):
    model = harness.build_model(family)
    base = harness.sample(model, steps=STEPS, size=SIZE)
    # top-k of every block; a window covering every tile; sparse from a step after the last (round(0.9 * 4) = 4)
    for settings in ({**TOPK, "density": 1.0}, {**WINDOW, "window": [1, 15, 15]}, {**WINDOW, "start": 0.9}):
        patched = host.patch(model, "sparse", settings)
        assert torch.equal(harness.sample(patched, steps=STEPS, size=SIZE), base), settings
        plan = host.plan_of(patched)
        assert plan.last.estimated_speedup == 1.0 and "sparse setting does nothing" in plan.notes[0]


def test_sparse_in_comfy_flux_is_sparse_in_diffusers_flux(host):
    """ref-flux in ComfyUI's Flux under the sparse node computes what the same diffusers Flux computes under
    fastdiff.apply's sparse section: the same pattern on the same tokens (text dense), to float tolerance (the two
    models differ in their op order by ~1e-6 dense, test_harness); and it is not the dense result."""
    import fastdiff
    from fastdiff.eval.reference.flux import flux_predict

    c = harness.load_comfy()
    model, pipe = harness.build_reference("ref-flux")
    settings = {"pattern": "window", "window": [1, 3, 3], "block": 16, "start": 0.0}
    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma, y = 0.7, torch.tensor([3])
    conds = harness.reference_conds(pipe, y)

    def velocity(m):  # one Euler step from sigma to 0 on a zero latent lands on the clean estimate x - sigma v
        with torch.inference_mode():
            out = c.sample.sample_custom(m, noise, 1.0, c.samplers.ksampler("euler"), torch.tensor([sigma, 0.0]),
                                         conds[0], conds[1], torch.zeros(1, 1, 32, 32), disable_pbar=True, seed=0)
        return (sigma * noise - out) / sigma

    dense = velocity(model)
    ours = velocity(host.patch(model, "sparse", settings))
    parts = {"transformer": pipe.transformer, "class_embedding": pipe.class_embedding,
             "pooled_embedding": pipe.pooled_embedding}
    handle = fastdiff.apply(pipe, {"sparse": settings})
    try:
        with torch.no_grad():
            expected = flux_predict(parts, sigma * noise, torch.tensor([sigma]), y)
    finally:
        handle.remove()
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)
    assert (ours - dense).abs().max() > 0.1


def test_sparse_clones_and_queue_items_share_nothing(host):
    model = harness.build_model("flux")
    a = host.patch(model, "sparse", {**TOPK, "density": 0.5, "refresh": 2})  # predicted patterns: per-run state
    b = host.patch(model, "sparse", WINDOW)
    out_a, out_b = harness.sample(a, steps=STEPS, size=SIZE), harness.sample(b, steps=STEPS, size=SIZE)
    assert not torch.equal(out_a, out_b)
    harness.sample(a, steps=STEPS, size=SIZE, seed=4)
    assert torch.equal(harness.sample(b, steps=STEPS, size=SIZE), out_b)
    assert torch.equal(harness.sample(a, steps=STEPS, size=SIZE), out_a)


def test_sparse_chains_to_another_override_and_composes_with_the_cache(host):
    model = harness.build_model("sd15")
    seen = []

    def theirs(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = theirs
    base = harness.sample(other, steps=STEPS, size=SIZE)
    calls = len(seen)
    dense = host.patch(other, "sparse", {**TOPK, "density": 1.0})
    assert torch.equal(harness.sample(dense, steps=STEPS, size=SIZE), base)
    assert len(seen) == 2 * calls  # every call (dense here) still went through theirs
    both = host.patch(host.patch(model, "cache", {"policy": "static", "interval": 2, "start": 0.0, "end": 1.0}),
                      "sparse", WINDOW)
    harness.sample(both, steps=STEPS, size=SIZE)
    summary = host.plan_of(both).last
    assert [r.decisions for r in summary.per_step][:2] == [["cache=compute,sparse=window d0.170"], ["cache=reuse"]]
    assert summary.flops == pytest.approx(_sparse_price(host, model, host.plan_of(both).sections, summary, "sd15")[1])


def test_sparse_refusals_come_before_anything_is_patched(host):
    from fastdiff.errors import ConfigError

    for family in ("sd3", "wan"):
        model = harness.build_model(family)
        options = repr(model.model_options)
        with pytest.raises(UnsupportedModelError, match="sparse attention needs to know which"):
            host.patch(model, "sparse", WINDOW)
        assert repr(model.model_options) == options and not model.wrappers
    model = harness.build_model("sd15")
    merged = host.patch(model, "merge", {"ratio": 0.5})
    with pytest.raises(ConfigError, match="both act on self-attention"):
        host.patch(merged, "sparse", WINDOW)
    assert "optimized_attention_override" not in merged.model_options["transformer_options"]
