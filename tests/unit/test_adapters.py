"""Adapter resolution: by class, the auto fallback (repeated-block lists, I/O from a probe of the first call),
and a clear refusal otherwise."""

import pytest
import torch

import fastdiff
from fastdiff import adapters
from fastdiff.eval import tiny

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
    assert type(adapter) is adapters.BlockAdapter and adapter.spec is tiny.spec(family)  # its own, not auto
    assert len(adapter.blocks) >= 2
    assert [b.index for b in adapter.blocks] == list(range(len(adapter.blocks)))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_record_agrees_with_its_adapter(family):
    """What the tests read as family facts (tests/adapters/facts.py) holds together: the record's pipeline is a class
    the adapter lays out CFG for, a video record's latent frames are frames of the adapter's token grid (and its
    pipeline has a temporal VAE scale), and a self-attention given a key/value input (ToDo) attends over the image
    tokens alone, unrotated — joint attention and RoPE are why the other families refuse ToDo."""
    rec, spec = tiny.record(family), tiny.spec(family)
    pipe = tiny.build_pipeline(family)
    assert type(pipe).__name__ == rec.pipeline and spec.cfg_layout(pipe) is spec.pipelines[rec.pipeline]
    denoiser = pipe.unet if "unet" in pipe.components else pipe.transformer
    frames = spec.latent_grid(denoiser.config, rec.latent_frames or 1, rec.latent, rec.latent)[0]
    assert (frames > 1) == rec.video == hasattr(pipe, "vae_scale_factor_temporal")
    for site in spec.attention:
        for m in site.modules:
            if m.role == "self_attention" and m.kv_arg:
                assert m.text == "none" and m.rope is None, (family, m)


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


# -- the auto adapter on analytic models (issue 17 item 15) ----------------------------------------------------
class AddT(torch.nn.Module):
    """x -> x + t: a residual block whose change is the call's timestep (set by its denoiser)."""

    t = 0.0

    def forward(self, hidden_states):
        return hidden_states + self.t


class Stack(torch.nn.Module):
    """An unregistered denoiser whose blocks sit in a list named `layers` one level down (`body.layers`), or in
    `transformer_blocks` (the one name the old auto adapter looked for besides UNet ones)."""

    def __init__(self, block=AddT, n=3, nested=True):
        super().__init__()
        blocks = torch.nn.ModuleList(block() for _ in range(n))
        if nested:
            self.body = torch.nn.Module()
            self.body.layers = blocks
        else:
            self.transformer_blocks = blocks
        self.proj = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))  # bare torch layers: not blocks

    def forward(self, hidden_states, timestep=None):
        for block in self.body.layers if hasattr(self, "body") else self.transformer_blocks:
            block.t = float(timestep) / 1000
            hidden_states = block(hidden_states)
        return hidden_states


def _three_steps(model, xs):
    return [model(x, timestep=t) for x, t in zip(xs, (900.0, 800.0, 700.0))]


@pytest.mark.parametrize("nested", [True, False])
def test_auto_reuses_input_plus_cached_change_not_the_stale_output(nested):
    """Static interval 2: step 2 is reused. Its output is its own input + the blocks' change at step 1
    (3 blocks x 0.8), where the old auto adapter replayed step 1's output (x1 + 2.4) for unregistered blocks."""
    model = Stack(nested=nested)
    adapter = adapters.resolve(model)
    where = "body.layers" if nested else "transformer_blocks"
    assert [b.path for b in adapter.blocks] == [f"{where}.{i}" for i in range(3)]
    xs = [torch.full((1, 2, 2), v) for v in (1.0, 2.0, 5.0)]
    with fastdiff.accelerated(model, cache={"policy": "static", "interval": 2}) as handle:
        out = _three_steps(model, xs)
        assert [r.decisions["cache"] for r in handle.records] == ["compute", "compute", "reuse"]
    assert torch.allclose(out[0], xs[0] + 3 * 0.9, atol=1e-6, rtol=0)
    assert torch.allclose(out[1], xs[1] + 3 * 0.8, atol=1e-6, rtol=0)
    assert torch.allclose(out[2], xs[2] + 3 * 0.8, atol=1e-6, rtol=0)


def test_auto_takes_a_tensor_from_a_block_the_diffusers_registry_indexes():
    """diffusers' registry gives index 0 even for blocks that return a tensor (BasicTransformerBlock): the probe
    reads the tensor itself. Indexing it took batch row 0 for every row."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    class RegisteredAddT(AddT):
        pass

    TransformerBlockRegistry.register(RegisteredAddT, TransformerBlockMetadata(return_hidden_states_index=0))
    try:
        model = Stack(RegisteredAddT, nested=False)
        xs = [torch.arange(8.0).reshape(2, 2, 2) * v for v in (1.0, 2.0, 5.0)]  # two different batch rows
        with fastdiff.accelerated(model, cache={"policy": "static", "interval": 2}) as handle:
            out = _three_steps(model, xs)
            assert handle.records[-1].decisions["cache"] == "reuse"
        assert torch.allclose(out[2], xs[2] + 3 * 0.8, atol=1e-5, rtol=0)
        assert [b.io.hidden_index for b in handle.adapter.blocks] == [None] * 3  # settled by the probe
    finally:
        del TransformerBlockRegistry._registry[RegisteredAddT]


class Dual(torch.nn.Module):
    """A dual-stream block: takes and returns (text, image) states, as diffusers' MMDiT blocks do."""

    def __init__(self, width=4):
        super().__init__()
        self.attn = torch.nn.Linear(width, width)

    def forward(self, hidden_states, encoder_hidden_states, temb=None):
        encoder_hidden_states = encoder_hidden_states + 1
        hidden_states = hidden_states + self.attn(hidden_states)
        return encoder_hidden_states, hidden_states


class Single(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.attn = torch.nn.Linear(width, width)

    def forward(self, hidden_states, temb=None):
        return hidden_states + self.attn(hidden_states)


class Streams(torch.nn.Module):
    """pairs (dual) -> more_pairs (dual) -> [concatenate text and image] -> singles: the first two lists form one
    chain, the single blocks another (their input is shaped differently)."""

    def __init__(self, n_double=2, n_single=3):
        super().__init__()
        self.pairs = torch.nn.ModuleList(Dual() for _ in range(n_double))
        self.more_pairs = torch.nn.ModuleList(Dual() for _ in range(n_double))
        self.singles = torch.nn.ModuleList(Single() for _ in range(n_single))

    def forward(self, hidden_states, encoder_hidden_states, timestep=None):
        for block in [*self.pairs, *self.more_pairs]:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in self.singles:
            joint = block(joint)
        return joint[:, encoder_hidden_states.shape[1]:]


def test_auto_joins_dual_stream_lists_and_keeps_a_concatenation_boundary():
    assert [bl.path for bl in adapters.resolve(Streams(2, 1)).spec.block_lists] == ["pairs", "more_pairs"]
    # a single list with more parameters than the dual chain is the one served
    assert [bl.path for bl in adapters.resolve(Streams(1, 3)).spec.block_lists] == ["singles"]
    model = Streams(2, 1)
    x, text = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    with fastdiff.accelerated(model, cache={"policy": "static", "interval": 2}) as handle:
        for t in (900.0, 800.0, 700.0):
            model(x, text, timestep=t)
        adapter = handle.adapter
        assert [(b.io.hidden_index, b.io.encoder_index) for b in adapter.blocks] == [(1, 0)] * 4
        assert handle.records[-1].decisions["cache"] == "reuse"


class Shrink(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states[:, :-1]


def test_auto_refuses_blocks_a_cache_cannot_stand_in_for_at_the_first_call():
    model = Stack(Shrink)  # each block returns fewer tokens than it took: no residual to reuse
    x = torch.randn(1, 5, 2)
    bare = model(x, timestep=1.0)
    with fastdiff.accelerated(model, cache={"policy": "static", "interval": 2}):
        with pytest.raises(fastdiff.UnsupportedModelError, match=r"Stack: block body\.layers\.0 \(Shrink\).*not a "
                                                                   r"residual block"):
            model(x, timestep=1.0)
    assert torch.equal(model(x, timestep=1.0), bare)


class TinyUNet(torch.nn.Module):
    """down_blocks / up_blocks of one block each: both are the outer blocks a UNet cache must compute."""

    def __init__(self):
        super().__init__()
        self.down_blocks = torch.nn.ModuleList([torch.nn.Conv2d(2, 2, 1)])
        self.up_blocks = torch.nn.ModuleList([torch.nn.Conv2d(2, 2, 1)])

    def forward(self, sample, timestep=None):
        return self.up_blocks[0](self.down_blocks[0](sample))


def test_auto_unet_keeps_its_outer_blocks_and_refuses_when_nothing_is_left():
    adapter = adapters.resolve(TinyUNet())
    assert [b.reuse for b in adapter.blocks] == ["output", "output"]
    assert adapter.spec.always_compute(adapter.blocks) == {0, 1}
    with pytest.raises(fastdiff.UnsupportedModelError, match="TinyUNet.*leave none of its 2 blocks"):
        fastdiff.apply(TinyUNet(), cache={"policy": "static", "interval": 2})
