"""fastdiff.register_pipeline: code outside the adapters tells fastdiff a pipeline class's CFG layout."""

import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import adapters
from fastdiff.adapters.base import specs

from .toy import FakePipeline, ToyDenoiser


class BatchedCfgPipeline(FakePipeline):
    """Batched CFG as StableDiffusionPipeline lays it out: unconditional half first, a flag says CFG is on."""

    do_classifier_free_guidance = True


class SeparateCfgPipeline(FakePipeline):
    pass


class SubPipeline(BatchedCfgPipeline):
    pass


def _toy():
    return next(s for s in specs() if s.name == "toy")


@pytest.fixture
def unregister():
    """Registrations are process-wide: take this test's pipelines off the toy family again."""
    yield
    for name in ("BatchedCfgPipeline", "SeparateCfgPipeline"):
        _toy().pipelines.pop(name, None)


def test_a_registered_layout_gives_the_branches(unregister):
    den = ToyDenoiser()
    adapter = adapters.resolve(den)
    bound = {"hidden_states": torch.zeros(2, 1, 4, 4)}
    batched, separate = BatchedCfgPipeline(den), SeparateCfgPipeline(den)
    assert adapter.branches(bound, batched, 0) == ("?", "?")
    assert adapter.branches(bound, separate, 1) == ("?", "?")

    fastdiff.register_pipeline(BatchedCfgPipeline, fastdiff.CfgLayout("batched", "uncond"), family="toy")
    fastdiff.register_pipeline("SeparateCfgPipeline", fastdiff.CfgLayout("separate", "cond", flag=None), family="toy")
    assert adapter.branches(bound, batched, 0) == ("uncond", "cond")
    assert adapter.branches(bound, SubPipeline(den), 0) == ("uncond", "cond")  # a subclass lays CFG out as its base
    assert adapter.branches(bound, separate, 0) == ("cond", "cond")
    assert adapter.branches(bound, separate, 1) == ("uncond", "uncond")
    # the same layout again changes nothing
    fastdiff.register_pipeline(BatchedCfgPipeline, fastdiff.CfgLayout("batched", "uncond"), family="toy")


def test_guidance_applies_once_the_pipeline_is_registered(unregister):
    pipe = BatchedCfgPipeline(ToyDenoiser())
    # the family knows some pipeline's layout (else guidance refuses the family itself), not this one's
    fastdiff.register_pipeline(SeparateCfgPipeline, fastdiff.CfgLayout("separate", "cond", flag=None), family="toy")
    with pytest.raises(fastdiff.UnsupportedModelError, match="BatchedCfgPipeline.*fastdiff.register_pipeline"):
        fastdiff.apply(pipe, guidance={"mode": "step"})
    assert fastdiff.session_of(pipe) is None
    fastdiff.register_pipeline(BatchedCfgPipeline, fastdiff.CfgLayout("batched", "uncond"), family="toy")
    with fastdiff.accelerated(pipe, guidance={"mode": "step"}) as handle:
        assert "guidance" in [m.name for m in handle.mechanisms]


@pytest.mark.parametrize("args, kwargs, accepted", [
    (("P", fastdiff.CfgLayout("batched", "uncond")), {"family": "nope"}, r"families: \[.*'toy'.*'unet'"),
    (("P", fastdiff.CfgLayout("batched", "uncond")), {"family": "controlnet"}, r"families: \["),
    ((object(), fastdiff.CfgLayout("batched", "uncond")), {"family": "toy"}, "a pipeline class or its class name"),
    (("not a name", fastdiff.CfgLayout("batched", "uncond")), {"family": "toy"}, "a pipeline class or its class name"),
    (("P", ("batched", "uncond")), {"family": "toy"}, r"must be a CfgLayout\(mode, first, flag\), got tuple"),
    (("P", fastdiff.CfgLayout("interleaved", "uncond")), {"family": "toy"}, r"mode must be one of \(.batched.,"),
    (("P", fastdiff.CfgLayout("batched", "?")), {"family": "toy"}, r"first one of \('cond', 'uncond'\)"),
    (("P", fastdiff.CfgLayout("batched", "cond", flag=3)), {"family": "toy"}, "flag None or a pipeline attribute name"),
])
def test_bad_input_is_refused_naming_what_is_accepted(args, kwargs, accepted):
    before = {s.name: dict(s.pipelines) for s in specs()}
    with pytest.raises(fastdiff.ConfigError, match=accepted):
        fastdiff.register_pipeline(*args, **kwargs)
    assert {s.name: dict(s.pipelines) for s in specs()} == before


def test_another_layout_for_a_registered_pipeline_is_refused():
    with pytest.raises(fastdiff.ConfigError, match="StableDiffusionPipeline is already registered for 'unet'"):
        fastdiff.register_pipeline("StableDiffusionPipeline", fastdiff.CfgLayout("separate", "cond"), family="unet")
    assert adapters.unet.SPEC.pipelines["StableDiffusionPipeline"] == fastdiff.CfgLayout("batched", "uncond")


def test_the_reference_unet_pipeline_registers_itself():
    """The UNet adapter lists no eval pipeline: importing eval's pipelines module is what registers it."""
    code = ("import fastdiff\nfrom fastdiff.adapters import unet\n"
            "assert 'ClassUNetPipeline' not in unet.SPEC.pipelines\n"
            "from fastdiff.eval.reference.pipelines import ClassUNetPipeline\n"
            "print(unet.SPEC.pipelines['ClassUNetPipeline'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == repr(fastdiff.CfgLayout("batched", "uncond"))
