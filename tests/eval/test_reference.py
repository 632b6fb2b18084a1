"""ref-digits: the committed reference DiT and its classifier load, sample deterministically, are good enough to
judge accelerations by, and lay out CFG the way fastdiff's DiT adapter reads it."""

import pytest
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel

import fastdiff
from fastdiff.eval import reference
from fastdiff.eval.reference.data import load_split

NULL = 10  # num_embeds_ada_norm: DiT's null class id


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: bit-identity across loads is a single-thread property, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return reference.load("ref-digits")


@pytest.fixture(scope="module")
def clf():
    return reference.load_classifier("ref-digits")


def _seeds(n, start=0):
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


def test_registry():
    assert reference.names() == ["ref-digits"]
    with pytest.raises(KeyError, match="ref-digits"):
        reference.load("ref-nothing")


def test_denoiser_is_a_real_diffusers_dit(pipe):
    assert isinstance(pipe, DiffusionPipeline)
    assert type(pipe.transformer) is DiTTransformer2DModel
    assert pipe.transformer.config.num_embeds_ada_norm == NULL
    assert not pipe.transformer.training


def test_load_twice_same_seed_is_bit_identical(pipe):
    rng = torch.get_rng_state()
    other = reference.load("ref-digits")
    assert torch.equal(torch.get_rng_state(), rng)  # loading reads weights, it draws nothing
    a = pipe([3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    b = other([3, 7], num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)
    assert a.shape == (2, 1, 16, 16) and 0 <= a.min() and a.max() <= 1


def test_one_generator_per_sample_makes_samples_independent_of_the_batch(pipe):
    both = pipe([3, 7], num_inference_steps=4, generator=_seeds(2)).images
    alone = pipe([7], num_inference_steps=4, generator=_seeds(1, start=1)).images
    # Not bit-equal (matmuls over 4 vs 2 rows round differently, ~1e-4); another noise draw would differ by ~1.
    torch.testing.assert_close(both[1:], alone, atol=1e-3, rtol=0)


def test_cfg_batches_cond_first_then_null_class(pipe):
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


def test_classifier_recognises_held_out_real_digits(clf):
    x, y = load_split("held_out")
    assert clf.accuracy(x, y) >= 0.95
    assert clf.features(x[:4]).shape == (4, 128)


def test_generated_samples_are_recognised(pipe, clf):
    labels = torch.arange(10).repeat(2)
    images = pipe(labels.tolist(), num_inference_steps=10, guidance_scale=3.0, generator=_seeds(20, start=100)).images
    assert clf.accuracy(images, labels) >= 0.7


def test_fastdiff_sees_cond_and_uncond_branches(pipe):
    kw = dict(num_inference_steps=3, guidance_scale=3.0)
    base = pipe([1, 4], generator=_seeds(2), **kw).images
    session = fastdiff.apply(pipe, preset="none")  # telemetry only: must not change a bit
    try:
        out = pipe([1, 4], generator=_seeds(2), **kw).images
        summary = session.summary()
    finally:
        fastdiff.remove(pipe)
    assert torch.equal(out, base)
    assert summary.family == "dit" and summary.steps == 3
    assert {b for row in summary.per_step for b in row.branches} == {"cond/uncond"}
