"""Every preset *runs* end to end on every family's tiny model and on every reference model — not only priced.

For each (model, preset) pair the preset is applied to the pipeline and sampled; the output must be finite,
`summary()` must show the work the preset skipped or reduced, by the preset's own mechanism (its reuse, merge or
sparse path really taken), and after remove() the pipeline gives its unaccelerated output bit for bit. Three sets,
held exactly so that a change shows up as a failing pair:

- REFUSED: the preset raises UnsupportedModelError at apply, naming the class and the mechanism, and touches nothing;
- DENSE: a sparse preset whose pattern lists every block on this model's grid (one 64-token block, or a grid
  all within one 3x3 window of 8x8 tiles): it runs the model's own attention, bit-identical, reported at density 1.0;
- every other pair accelerates.

Shapes and steps are the fewest that exercise each path: 2 steps (merging, sparse attention with its prediction
reused at step 1), 4 (cache-safe reuses step 2), 5 (cache-fast / cache-ultra forecast step 3; cache-ultra skips the
unconditional branch from step 2); grids widened to hold several 64-token blocks where the family allows.
"""

from importlib import import_module

import pytest
import torch

import fastdiff
from fastdiff.eval import reference, tiny

from .adapters.facts import spec_of, todo_supported
from .conftest import module_snapshot

PRESETS = fastdiff.presets()
MODELS = list(tiny.FAMILIES) + reference.names()

# (height, width) multipliers of the tiny default sizes: token grids of 8x24 (images; UNets at their first attention
# level) and 3x4x24 (video), several 64-token blocks and three 8x8-ish tiles across. DiT's size is fixed (4x4 tokens);
# SD3's tiny positional table stops at 16x16 tokens (2x2 tiles: any 3x3 window covers them all).
WIDEN = {"pixart": (2, 6), "sd3": (4, 4), "flux": (2, 6), "sd15": (1, 3), "sdxl": (1, 3),
         "wan": (1, 6), "cogvideox": (1, 6), "hunyuan": (1, 6)}

STEPS = {"none": 2, "cache-safe": 4, "cache-fast": 5, "cache-ultra": 5, "merge-tome": 2, "merge-todo": 2,
         "sparse-topk": 2, "sparse-window": 2, "bottleneck-fast": 4}


def _denoiser_class(name: str) -> str:
    """A model's denoiser class: its tiny record's, or its reference recipe's (built on the meta device: no weights
    read or initialised, the RNG untouched, the weights need not exist yet)."""
    if name in tiny.RECORDS:
        return tiny.record(name).denoiser
    recipe = import_module(reference._MODELS[name], reference.__name__).RECIPE
    with torch.device("meta"):
        parts = recipe.build(recipe.parts)
    return type(parts["unet" if "unet" in parts else "transformer"]).__name__


# (model, preset) -> what the error names besides the model class. ToDo pools self-attention keys/values apart from
# the queries: refused on every model whose adapter gives no self-attention a key/value input (joint attention, RoPE).
REFUSED = {(m, "merge-todo"): "merge method 'todo'" for m in MODELS if not todo_supported(spec_of(_denoiser_class(m)))}

# Resolution-bottleneck sampling: refused where the adapter does not say how latents resize (every tiny pipeline's
# sampler is one it runs: FlowMatchEuler, DDIM, DPM-Solver, Euler, UniPC); the message names what is missing.
REFUSED |= {(m, "bottleneck-fast"): "resolution-bottleneck sampling needs to know how"
            for m in MODELS if spec_of(_denoiser_class(m)).resample is None}
# Sparse presets (block 64, window 3x3 tiles) on grids where the pattern lists every block.
DENSE = {(m, p) for m in ("dit", "ref-digits", "ref-textures") for p in ("sparse-topk", "sparse-window")}
# SD3 and the Flux references (32 px: 16x16 tokens) have 2x2 tiles of 8x8: any 3x3 window covers them all.
DENSE |= {(m, "sparse-window") for m in ("sd3", "ref-flux", "ref-flux-textures")}


pytestmark = pytest.mark.usefixtures("one_thread")


_models: dict = {}


@pytest.fixture(scope="module")
def models():
    """model name -> (pipeline, its denoiser, {steps: unaccelerated output}); built once for the module."""
    yield _models
    _models.clear()


def _model(models, name):
    if name not in models:
        pipe = reference.load(name) if name in reference.names() else tiny.build_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        denoiser = pipe.unet if "unet" in pipe.components else pipe.transformer
        models[name] = (pipe, denoiser, {})
    return models[name]


def _run(pipe, name, steps):
    if name in reference.names():
        kw = dict(class_labels=[3], num_inference_steps=steps, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0))
    else:
        kw = tiny.pipeline_kwargs(name, steps=steps)
        hm, wm = WIDEN.get(name, (1, 1))
        if "height" in kw:
            kw["height"], kw["width"] = kw["height"] * hm, kw["width"] * wm
    with torch.no_grad():
        return tiny.output_tensor(pipe(**kw))


def _base(models, name, steps):
    pipe, _, bases = _model(models, name)
    if steps not in bases:
        bases[steps] = _run(pipe, name, steps)
    return bases[steps]


def _hooks_left(pipe) -> list[str]:
    """fastdiff wrappers still installed on the pipeline or its scheduler (the denoiser is compared whole)."""
    return [f"{type(obj).__name__}.{k}" for obj in (pipe, pipe.scheduler) for k, v in vars(obj).items()
            if getattr(v, "__fastdiff_hook__", None)]


def test_the_sets_name_real_pairs():
    pairs = {(m, p) for m in MODELS for p in PRESETS}
    assert set(REFUSED) <= pairs and DENSE <= pairs and not set(REFUSED) & DENSE and set(STEPS) == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", MODELS)
def test_preset_runs(models, name, preset):
    pipe, denoiser, _ = _model(models, name)
    before = module_snapshot(denoiser)
    if (name, preset) in REFUSED:
        with pytest.raises(fastdiff.UnsupportedModelError, match=rf"{type(denoiser).__name__}: {REFUSED[name, preset]}"):
            fastdiff.apply(pipe, preset=preset)
        assert module_snapshot(denoiser) == before and not _hooks_left(pipe) and fastdiff.session_of(pipe) is None
        return
    steps = STEPS[preset]
    h = fastdiff.apply(pipe, preset=preset)
    try:
        out = _run(pipe, name, steps)
        s = h.summary()
    finally:
        h.remove()
    assert module_snapshot(denoiser) == before and not _hooks_left(pipe)
    assert torch.equal(_run(pipe, name, steps), _base(models, name, steps))  # remove(): bit-identical again
    assert torch.isfinite(out).all()
    assert s.steps == steps and s.flops is not None
    decisions = [d for row in s.per_step for d in row.decisions]
    mechanism = preset.split("-")[0]

    if preset == "none" or (name, preset) in DENSE:
        assert torch.equal(out, _base(models, name, steps))  # bit-identical to the model without fastdiff
        assert s.flops == s.dense_flops
        if preset != "none":
            dens = s.mechanisms["sparse"]["density"]
            assert dens and set(dens.values()) == {1.0}, dens  # the full pattern is reported, not hidden
        return

    assert s.flops < s.dense_flops, s  # predicted FLOPs below dense: work skipped or reduced
    if mechanism == "bottleneck":  # one run of two stages, the first on a quarter of the tokens
        assert s.stages == 2 and [r.stage for r in s.per_step] == [0, 0, 1, 1], s
        assert s.per_step[0].image_tokens * 4 == s.per_step[-1].image_tokens
    elif mechanism == "cache":
        path = "cache=reuse" if preset == "cache-safe" else "cache=forecast"
        assert any(path in d for d in decisions), decisions
        assert sum(r.blocks_computed for r in s.per_step) < sum(r.blocks_total for r in s.per_step)
        if preset == "cache-ultra":
            assert any("guidance=skip-uncond" in d for d in decisions), decisions
    elif mechanism == "merge":
        rep = s.mechanisms["merge"]
        assert rep["method"] == preset.split("-")[1] and rep["calls_merged"] == s.calls and rep["submodules"] > 0
    else:
        dens = s.mechanisms["sparse"]["density"]
        assert dens and min(dens.values()) < 1, dens  # at least one site ran block-sparse
        assert all(d.startswith("sparse=") for row in s.per_step[1:] for d in row.decisions), decisions
