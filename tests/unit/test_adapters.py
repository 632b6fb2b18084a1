"""Adapter resolution: by class, the auto fallback by block-list names, and a clear refusal otherwise."""

import pytest
import torch

import fastdiff
from fastdiff import adapters, tiny

from .toy import Double


class Unregistered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Double() for _ in range(2))

    def forward(self, hidden_states, timestep=None):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class NoBlocks(torch.nn.Module):
    def forward(self, hidden_states, timestep=None):
        return hidden_states


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_resolves_by_class(family):
    adapter = adapters.resolve(tiny.build_denoiser(family))
    assert adapter.name == {"sd15": "unet", "sdxl": "unet"}.get(family, family)
    assert len(adapter.blocks) >= 2
    assert [b.index for b in adapter.blocks] == list(range(len(adapter.blocks)))


def test_auto_fallback_finds_blocks_and_runs_bit_identical():
    model = Unregistered()
    adapter = adapters.resolve(model)
    assert adapter.name == "auto" and [b.path for b in adapter.blocks] == ["transformer_blocks.0",
                                                                          "transformer_blocks.1"]
    x = torch.randn(1, 3, 5)
    with fastdiff.accelerated(model) as handle:
        assert torch.equal(model(x, timestep=5), x * 4)
        s = handle.summary()
    assert s.calls == 1 and s.flops is None  # no layout: no cost claims
    with pytest.raises(fastdiff.UnsupportedModelError, match="Unregistered.*token layout"):
        fastdiff.estimate(model, height=8, width=8, steps=2)


def test_unsupported_denoiser_is_refused_by_name_with_the_supported_list():
    with pytest.raises(fastdiff.UnsupportedModelError, match=r"NoBlocks.*FluxTransformer2DModel"):
        fastdiff.apply(NoBlocks())
    with pytest.raises(fastdiff.UnsupportedModelError, match="expects a diffusers pipeline"):
        fastdiff.apply(object())

    class NotAPipeline:
        components = {"text_encoder": None}

    with pytest.raises(fastdiff.UnsupportedModelError, match="NotAPipeline has no denoiser"):
        fastdiff.apply(NotAPipeline())
