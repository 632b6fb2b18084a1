"""diffusers' `cache_context("cond"/"uncond")`, where a pipeline sends it (FluxPipeline true CFG, Qwen-Image, Wan,
...), is the branch signal: it wins over the call order the adapter's CFG layout would guess from."""

import torch

import fastdiff
from fastdiff.eval import tiny


def _spec(pipe):
    return fastdiff.adapters.resolve(pipe.transformer).spec


def test_flux_true_cfg_branches_come_from_cache_context(monkeypatch):
    pipe = tiny.build_pipeline("flux")
    monkeypatch.delitem(_spec(pipe).pipelines, "FluxPipeline")  # no CFG layout: call order cannot say
    with fastdiff.accelerated(pipe, preset="none") as h:
        assert "cache_context" in pipe.transformer.__dict__  # fastdiff listens to it ...
        with torch.no_grad():
            pipe(**tiny.pipeline_kwargs("flux", cfg=True, steps=2))
        got = [(r.ctx.step, r.ctx.call, r.ctx.branches) for r in h.records]
    assert "cache_context" not in pipe.transformer.__dict__  # ... and remove() takes it back out
    assert got == [(0, 0, ("cond",)), (0, 1, ("uncond",)), (1, 0, ("cond",)), (1, 1, ("uncond",))]


def test_cache_context_wins_over_the_call_order():
    pipe = tiny.build_pipeline("flux")  # FluxPipeline's layout: the first call of a step is the conditional one
    model = pipe.transformer
    kw = tiny.denoiser_inputs("flux")
    with fastdiff.accelerated(pipe, preset="none") as h, torch.no_grad():
        with model.cache_context("uncond"):
            model(**kw)
        with model.cache_context("cond"):
            model(**kw)
        model(**kw)  # no signal: back to the layout (a third call of the step: not the first, so "uncond")
        with model.cache_context("cond_uncond"):  # not a branch name (LTX batches both): the layout decides
            model(**kw)
        got = [(r.ctx.call, r.ctx.branches) for r in h.records]
    assert got == [(0, ("uncond",)), (1, ("cond",)), (2, ("uncond",)), (3, ("uncond",))]
