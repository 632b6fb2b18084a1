"""The committed reference models (ref-digits, ref-unet, ref-textures, ref-flux, ref-flux-textures) and their
classifiers load, sample deterministically, are good enough to judge accelerations by, run through the real
diffusers classes, and lay out CFG the way fastdiff's adapters read it; fastdiff applies to each and its removal
restores them bit for bit."""

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)

import fastdiff
from fastdiff.eval import reference

NULL = 10  # every reference model has 10 classes; the null (unconditional) class id is 10

# name -> (denoiser attribute, its diffusers class, fastdiff family, sample shape, min. accuracy of samples)
MODELS = {
    "ref-digits": ("transformer", DiTTransformer2DModel, "dit", (1, 16, 16), 0.7),
    "ref-unet": ("unet", UNet2DConditionModel, "unet", (1, 32, 32), 0.8),
    "ref-textures": ("transformer", DiTTransformer2DModel, "dit", (3, 32, 32), 0.5),  # chance: 0.1
    "ref-flux": ("transformer", FluxTransformer2DModel, "flux", (1, 32, 32), 0.8),
    "ref-flux-textures": ("transformer", FluxTransformer2DModel, "flux", (3, 32, 32), 0.5),
}
# held-out real images the classifier must recognise (the model cards give the exact numbers)
CLASSIFIER_MIN = {"ref-digits": 0.95, "ref-unet": 0.95, "ref-textures": 0.8, "ref-flux": 0.95,
                  "ref-flux-textures": 0.8}
FLUX = [n for n in MODELS if MODELS[n][2] == "flux"]


pytestmark = pytest.mark.usefixtures("one_thread")


_pipes: dict = {}


@pytest.fixture(params=sorted(MODELS))
def name(request):
    return request.param


@pytest.fixture
def pipe(name):
    if name not in _pipes:  # one load per model for the whole module
        _pipes[name] = reference.load(name)
    return _pipes[name]


def _seeds(n, start=0):
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


def test_registry():
    assert reference.names() == sorted(MODELS)
    assert all(reference.num_classes(n) == NULL for n in MODELS)
    with pytest.raises(KeyError, match="ref-digits"):
        reference.load("ref-nothing")


def test_denoiser_is_the_real_diffusers_class(name, pipe):
    attr, cls, *_ = MODELS[name]
    assert isinstance(pipe, DiffusionPipeline)
    assert type(getattr(pipe, attr)) is cls
    assert pipe.num_classes == NULL
    assert not getattr(pipe, attr).training


def test_load_twice_same_seed_is_bit_identical(name, pipe):
    rng = torch.get_rng_state()
    other = reference.load(name)
    assert torch.equal(torch.get_rng_state(), rng)  # loading reads weights, it draws nothing
    a = pipe([3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    b = other([3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)
    assert a.shape == (2, *MODELS[name][3]) and 0 <= a.min() and a.max() <= 1


def test_one_generator_per_sample_makes_samples_independent_of_the_batch(name, pipe):
    both = pipe([3, 7], num_inference_steps=4, generator=_seeds(2)).images
    alone = pipe([7], num_inference_steps=4, generator=_seeds(1, start=1)).images
    # Not bit-equal (matmuls over 4 vs 2 rows round differently, ~1e-4); another noise draw would differ by ~1.
    torch.testing.assert_close(both[1:], alone, atol=1e-3, rtol=0)


def test_dit_cfg_batches_cond_first_then_null_class():
    pipe = reference.load("ref-digits")
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs["class_labels"].tolist(), (args[0] if args else kwargs["hidden_states"]).clone()))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe([2, 5, 9], num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        pipe([2, 5], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    for labels, hidden in seen[:2]:
        assert labels == [2, 5, 9, NULL, NULL, NULL]
        assert torch.equal(hidden[:3], hidden[3:])  # the same latents in both halves, as in DiTPipeline
    assert seen[2][0] == [2, 5]  # guidance 1: conditional branch only


def test_unet_cfg_batches_null_class_first_like_stable_diffusion():
    pipe = reference.load("ref-unet")
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0].clone(), kwargs["encoder_hidden_states"].clone(), pipe.do_classifier_free_guidance))

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe([2, 5, 9], num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        pipe([2, 5], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    with torch.no_grad():
        null, cond = pipe.class_embedding(torch.tensor([NULL] * 3)), pipe.class_embedding(torch.tensor([2, 5, 9]))
    for sample, states, flag in seen[:2]:
        assert flag and torch.equal(states, torch.cat([null, cond]))  # negative (null) embeddings first, as SD
        assert torch.equal(sample[:3], sample[3:])
    assert not seen[2][2] and torch.equal(seen[2][1], cond[:2])  # guidance 1: conditional branch only


def test_classifier_recognises_held_out_real_images(name):
    if reference.dataset(name) == "textures":
        pytest.importorskip("skimage", reason="the texture photographs come with scikit-image")
    clf = reference.load_classifier(name)
    x, y = reference.held_out(name)
    assert x.shape[1:] == MODELS[name][3]
    assert clf.accuracy(x, y) >= CLASSIFIER_MIN[name]
    assert clf.features(x[:4]).shape == (4, 128)


def test_generated_samples_are_recognised(name, pipe):
    clf = reference.load_classifier(name)
    labels = torch.arange(10).repeat(2)
    images = pipe(labels.tolist(), num_inference_steps=10, guidance_scale=3.0, generator=_seeds(20, start=100)).images
    assert clf.accuracy(images, labels) >= MODELS[name][4]


def test_fastdiff_sees_cond_and_uncond_branches(name, pipe):
    kw = dict(num_inference_steps=3, guidance_scale=3.0)
    base = pipe([1, 4], generator=_seeds(2), **kw).images
    session = fastdiff.apply(pipe, preset="none")  # telemetry only: must not change a bit
    try:
        out = pipe([1, 4], generator=_seeds(2), **kw).images
        summary = session.summary()
    finally:
        fastdiff.remove(pipe)
    assert torch.equal(out, base)
    assert summary.family == MODELS[name][2] and summary.steps == 3
    # DiT/UNet pipelines batch both branches in one call; FluxPipeline's true CFG makes one call per branch
    expected = {"cond", "uncond"} if name in FLUX else {"cond/uncond"}
    assert {b for row in summary.per_step for b in row.branches} == expected


@pytest.mark.parametrize("preset", ["cache-fast", "cache-ultra"])
def test_cache_preset_accelerates_and_remove_restores_bit_identical_output(name, pipe, preset):
    kw = dict(num_inference_steps=8, guidance_scale=3.0)
    base = pipe([1, 4], generator=_seeds(2), **kw).images
    session = fastdiff.apply(pipe, preset=preset)
    try:
        out = pipe([1, 4], generator=_seeds(2), **kw).images
        summary = session.summary()
    finally:
        fastdiff.remove(pipe)
    assert summary.estimated_speedup > 1.1 and not torch.equal(out, base)
    assert (out - base).abs().mean() < 0.2  # still the same images, roughly (no blow-up)
    assert torch.equal(pipe([1, 4], generator=_seeds(2), **kw).images, base)


@pytest.mark.parametrize("name", FLUX)
def test_flux_reference_runs_through_fluxpipeline_with_true_cfg_at_every_trained_size(name):
    pipe = reference.load(name)
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"].shape[0], kwargs["encoder_hidden_states"]))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for size in (16, 24, 32):
            images = pipe([2, 5], num_inference_steps=2, guidance_scale=3.0, size=size, generator=_seeds(2)).images
            assert images.shape == (2, MODELS[name][3][0], size, size) and 0 <= images.min() and images.max() <= 1
    finally:
        handle.remove()
    assert [n for n, _, _ in seen] == [64] * 4 + [144] * 4 + [256] * 4  # packed 2x2 tokens; 2 calls per step
    assert all(n == ids for n, ids, _ in seen)
    with torch.no_grad():
        cond, null = pipe.class_prompt(torch.tensor([2, 5])), pipe.class_prompt(torch.tensor([NULL, NULL]))
    assert torch.equal(seen[0][2], cond[0]) and torch.equal(seen[1][2], null[0])  # cond call first, then the null


@pytest.mark.parametrize("name", FLUX)
def test_flux_reference_samples_are_recognised_at_the_bottleneck_size(name):
    pipe, clf = reference.load(name), reference.load_classifier(name)
    labels = torch.arange(10).repeat(2)
    images = pipe(labels.tolist(), num_inference_steps=10, guidance_scale=3.0, size=16, generator=_seeds(20, 100)).images
    assert clf.accuracy(images, labels) >= MODELS[name][4]
