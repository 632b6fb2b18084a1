"""The node pack as ComfyUI loads it (custom_nodes/, V3 `comfy_entrypoint`), its classic-API twin, tooltips, the
report node, and ComfyUI core's EasyCache beside our cache node on the same model at equal settings."""

import pytest
import torch

from tests.comfyui import harness

pytestmark = pytest.mark.usefixtures("comfy")

STEPS = 8
IDS = ("FastDiffCache", "FastDiffSkipCFG", "FastDiffTokenMerge", "FastDiffSparseAttention", "FastDiffAccelerate",
       "FastDiffBottleneckSampler", "FastDiffReport")


def _node(comfy, node_pack, node_id):
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
    assert issubclass(cls, comfy.io.ComfyNode)  # registered through comfy_entrypoint, the V3 schema
    return cls


def test_pack_loads_as_v3_nodes_with_tooltips(comfy, node_pack):
    assert not hasattr(node_pack, "NODE_CLASS_MAPPINGS")  # ComfyUI would take it over comfy_entrypoint
    for node_id in IDS:
        schema = _node(comfy, node_pack, node_id).define_schema()
        assert schema.node_id == node_id and schema.description
        assert all(i.tooltip for i in schema.inputs), node_id
        assert all(o.tooltip for o in schema.outputs), node_id
    assert comfy.nodes.NODE_CLASS_MAPPINGS["FastDiffReport"].define_schema().is_output_node


def test_classic_nodes_for_older_comfyui(node_pack):
    from comfyui_fastdiff import nodes

    classes = {n.id: nodes.v1(n) for n in nodes.NODES}
    for node_id, cls in classes.items():
        required = cls.INPUT_TYPES()["required"]
        assert all(opts.get("tooltip") for _, opts in required.values()), node_id
        assert len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert classes["FastDiffCache"].INPUT_TYPES()["required"]["policy"][0] == ["static", "easycache", "residual",
                                                                              "delta"]
    model = harness.build_model("flux")
    (patched,) = classes["FastDiffCache"]().run(model=model, policy="static", interval=2, threshold=0.2,
                                                 estimator="reuse", start_percent=0.1, end_percent=0.9,
                                                 head_blocks=0, tail_blocks=0)
    latent = harness.sample(patched, steps=STEPS)
    out = classes["FastDiffReport"]().run(model=patched, latent=latent)
    assert out["result"][1] is latent and "3 reuse" in out["result"][0] and out["ui"]["text"] == [out["result"][0]]


@pytest.mark.parametrize("family", ("flux", "sd15"))
def test_cache_node_and_report(comfy, node_pack, family):
    from fastdiff.integrations import comfyui as host

    model = harness.build_model(family)
    base = harness.sample(model, steps=STEPS)
    cache = _node(comfy, node_pack, "FastDiffCache")
    patched = cache.execute(model=model, policy="static", interval=2, threshold=0.2, estimator="reuse",
                            start_percent=0.1, end_percent=0.9, head_blocks=0, tail_blocks=0).result[0]
    assert patched is not model and not model.wrappers
    latent = harness.sample(patched, steps=STEPS)
    assert not torch.equal(latent, base)
    report = _node(comfy, node_pack, "FastDiffReport").execute(model=patched, latent={"samples": latent})
    text = report.result[0]
    summary = host.plan_of(patched).last
    assert text.startswith(f"fastdiff (comfy-{'flux' if family == 'flux' else 'unet'}")
    assert f"{summary.estimated_speedup:.2f}x" in text and "5 compute, 3 reuse" in text
    assert report.result[1] == {"samples": latent} and report.ui["text"] == [text]
    assert torch.equal(harness.sample(model, steps=STEPS), base)


def test_report_before_any_run(comfy, node_pack):
    report = _node(comfy, node_pack, "FastDiffReport")
    model = harness.build_model("flux")
    assert "not patched" in report.execute(model=model, latent=None).result[0]
    skip = _node(comfy, node_pack, "FastDiffSkipCFG").execute(model=model, start_percent=0.5, mode="step",
                                                              threshold=0.99).result[0]
    assert "not been sampled" in report.execute(model=skip, latent=None).result[0]


def test_beside_comfy_easycache_at_equal_settings(comfy, node_pack):
    """ComfyUI core's EasyCache and our cache node's easycache policy on one tiny Flux, same threshold and range:
    both skip steps and stay close to the dense result (the benchmark has the numbers)."""
    easycache = harness.load_comfy_node("nodes_easycache.py").EasyCacheNode
    ours = _node(comfy, node_pack, "FastDiffCache")
    model = harness.build_model("flux")
    steps = 12
    base = harness.sample(model, steps=steps)
    theirs = easycache.execute(model, reuse_threshold=0.5, start_percent=0.1, end_percent=0.95, verbose=False).result[0]
    mine = ours.execute(model=model, policy="easycache", interval=2, threshold=0.5, estimator="reuse",
                        start_percent=0.1, end_percent=0.95, head_blocks=0, tail_blocks=0).result[0]
    out_theirs, out_mine = harness.sample(theirs, steps=steps), harness.sample(mine, steps=steps)
    from fastdiff.integrations import comfyui as host

    summary = host.plan_of(mine).last
    skipped = sum(r.decisions == ["cache=reuse"] for r in summary.per_step)
    assert 0 < skipped < steps
    for out in (out_theirs, out_mine):
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        assert (out - base).abs().mean() < base.abs().mean()
    assert torch.equal(harness.sample(model, steps=steps), base)


def test_accelerate_node(comfy, node_pack):
    from fastdiff.integrations import comfyui as host

    model = harness.build_model("sd15")
    fast = _node(comfy, node_pack, "FastDiffAccelerate").execute(model=model, speedup=2.0).result[0]
    latent = harness.sample(fast, steps=12)
    text = _node(comfy, node_pack, "FastDiffReport").execute(model=fast, latent=latent).result[0]
    assert "accelerate: target 2.00x" in text and host.plan_of(fast).last.estimated_speedup >= 2.0
