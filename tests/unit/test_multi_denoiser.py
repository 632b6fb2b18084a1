"""Pipelines that call more than one network per step (hardening issue, item 14): Wan 2.2's second expert is
accelerated under the same clock, a ControlNet's calls are accounted, unknown CFG layouts are refused at apply."""

import diffusers
import pytest
import torch

import fastdiff
from fastdiff.eval import tiny


def _wan22():
    p = tiny.build_pipeline("wan")
    q = diffusers.WanPipeline(**{**p.components, "transformer_2": tiny.build_denoiser("wan", seed=1)},
                              boundary_ratio=0.875)
    q.set_progress_bar_config(disable=True)
    return q


def _run(pipe, family, steps, **extra):
    kw = {**tiny.pipeline_kwargs(family, steps=steps), **extra}
    with torch.no_grad():
        return tiny.output_tensor(pipe(**kw))


def test_wan22_second_expert_is_accelerated_under_one_clock():
    q = _wan22()
    bare = _run(q, "wan", 8)
    h = fastdiff.apply(q, preset="cache-fast")
    acc = _run(q, "wan", 8)
    parts = [r.part for r in h.records]
    assert {"transformer", "transformer_2"} == set(parts) and parts.index("transformer_2") > 0
    steps = [r.ctx.step for r in h.records]
    assert steps == sorted(steps) and steps[-1] == 7  # one run, global steps across both experts
    second = [r.decisions["cache"] for r in h.records if r.part == "transformer_2"]
    assert "forecast" in second  # not a silent no-op on the low-noise expert
    s = h.summary()
    assert s.calls == 16 and any(k.startswith("transformer_2:") and v for k, v in s.per_block.items())
    assert 1.0 < s.estimated_speedup and torch.isfinite(acc).all() and not torch.equal(acc, bare)
    fastdiff.remove(q)
    assert torch.equal(_run(q, "wan", 8), bare)
    assert not any("forward" in m.__dict__ for m in q.transformer_2.modules())


def _controlnet_pipe():
    p = tiny.build_pipeline("sd15")
    cn = diffusers.ControlNetModel.from_unet(p.unet, conditioning_embedding_out_channels=(4, 8))
    q = diffusers.StableDiffusionControlNetPipeline(**{**p.components, "controlnet": cn})
    q.set_progress_bar_config(disable=True)
    return p, q


def _image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_controlnet_calls_are_accounted_and_every_preset_runs():
    plain, q = _controlnet_pipe()
    bare = _run(q, "sd15", 6, image=_image())
    with fastdiff.accelerated(plain, preset="cache-safe") as h:
        _run(plain, "sd15", 6)
        without = h.summary()
    for preset in ("cache-safe", "cache-ultra"):  # cache-ultra skips uncond rows: the residuals are cut too
        with fastdiff.accelerated(q, preset=preset) as h:
            out = _run(q, "sd15", 6, image=_image())
            s = h.summary()
        assert torch.isfinite(out).all() and s.calls == 6
        assert sum(r.part == "controlnet" for r in h.records) == 6
        if preset == "cache-safe":
            # the ControlNet runs every step: the same skipped UNet work is a smaller share of the pipeline
            assert s.dense_flops > without.dense_flops and s.estimated_speedup < without.estimated_speedup
    assert torch.equal(_run(q, "sd15", 6, image=_image()), bare)


def test_a_control_network_alone_is_refused():
    _, q = _controlnet_pipe()
    with pytest.raises(fastdiff.UnsupportedModelError, match="control network"):
        fastdiff.apply(q.controlnet, preset="cache-safe")


def test_guidance_on_a_pipeline_with_unknown_cfg_layout_is_refused_at_apply():
    p = tiny.build_pipeline("sd15")

    class MyPipeline(type(p)):  # a call of its own: it may lay out CFG differently
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    q = MyPipeline(**p.components)
    with pytest.raises(fastdiff.UnsupportedModelError, match="MyPipeline"):
        fastdiff.apply(q, preset="cache-ultra")
    assert fastdiff.session_of(q) is None and "forward" not in q.unet.__dict__

    class Renamed(type(p)):  # runs StableDiffusionPipeline.__call__ itself: its layout is known
        pass

    r = Renamed(**p.components)
    with fastdiff.accelerated(r, preset="cache-ultra"):
        pass
