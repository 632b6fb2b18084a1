"""The attention nodes on tiny real ComfyUI models: token merging (fastdiff's ToMe / ToDo through ComfyUI's
attn1/attn2 patches, on the UNet). Each changes compute and its report says exactly what ran (tokens merged, the
summary's FLOPs == the cost model's price), the input MODEL is untouched, a no-op setting is bit-identical, clones
and queue items share nothing, and what cannot apply is refused before anything is patched."""

import math

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
    merged = 0 if method == "todo" else 3 * 32 * STEPS
    assert f"merge: {merged} of {3 * 64 * STEPS} image tokens merged away" in plan.report
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
