"""The auto adapter on the diffusers denoisers fastdiff has no family file for (issue 17 item 15).

Each model is the real diffusers class built tiny from a config. Bare, then with static caching over a manual
loop of decreasing timesteps: caching must really skip block work (counted inside the blocks), keep the output
finite and near the bare one, never replay the whole previous prediction, and `remove()` must give the bare
outputs bit for bit. The classes the auto adapter cannot serve safely are refused with UnsupportedModelError.
"""

import inspect
import math

import diffusers
import pytest
import torch

import fastdiff
from fastdiff import adapters

from ..conftest import module_snapshot

T = 8  # text tokens
STEPS = (999.0, 998.0, 997.0)  # static interval 2, warm-up 1: steps 0 and 1 computed, step 2 reused
CACHE = {"cache": {"policy": "static", "interval": 2}}


def g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(seed=1):
    return g(1, T, 16, seed=seed)


def grid_ids(h, w):
    return torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"),
                       -1).reshape(h * w, 3)


# name -> (build: () -> (model, inputs(t) -> kwargs), the block lists the adapter serves)
def aura():
    m = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4, pos_embed_max_size=64)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), encoder_hidden_states=text(), timestep=t)


def lumina_next():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    m = diffusers.LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=3,
                                       num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=16,
                                       learn_sigma=False)
    rope = get_2d_rotary_pos_embed_lumina(8, 16, 16)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), timestep=t, encoder_hidden_states=text(),
                             encoder_mask=torch.ones(1, T, dtype=torch.bool), image_rotary_emb=rope,
                             cross_attention_kwargs={})


def lumina2():
    m = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=3,
                                            num_refiner_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                            axes_dim_rope=(4, 4, 4), axes_lens=(32, 32, 32), cap_feat_dim=16)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), timestep=t, encoder_hidden_states=text(),
                             encoder_attention_mask=torch.ones(1, T, dtype=torch.bool))


def sana():
    m = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), encoder_hidden_states=text(), timestep=t)


def ltx():
    m = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                             cross_attention_dim=16, num_layers=3, caption_channels=16)
    return m, lambda t: dict(hidden_states=g(1, 2 * 4 * 4, 8), encoder_hidden_states=text(), timestep=t,
                             encoder_attention_mask=torch.ones(1, T), num_frames=2, height=4, width=4)


def mochi():
    m = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                                          pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                          max_sequence_length=T)
    return m, lambda t: dict(hidden_states=g(1, 4, 2, 8, 8), encoder_hidden_states=text(), timestep=t,
                             encoder_attention_mask=torch.ones(1, T, dtype=torch.bool))


def allegro():
    m = diffusers.AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, num_layers=3, cross_attention_dim=16,
                                            sample_height=8, sample_width=8, sample_frames=2, caption_channels=16)
    return m, lambda t: dict(hidden_states=g(1, 4, 2, 8, 8), encoder_hidden_states=text(), timestep=t)


def qwen():
    m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    return m, lambda t: dict(hidden_states=g(1, 16, 16), encoder_hidden_states=text(),
                             encoder_hidden_states_mask=torch.ones(1, T), timestep=t / 1000, img_shapes=[(1, 4, 4)])


def chroma():
    m = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                           axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    return m, lambda t: dict(hidden_states=g(1, 16, 16), encoder_hidden_states=text(), timestep=t / 1000,
                             img_ids=grid_ids(4, 4), txt_ids=torch.zeros(T, 3))


def bria():
    m = diffusers.BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         axes_dims_rope=[0, 4, 4])
    return m, lambda t: dict(hidden_states=g(1, 16, 16), encoder_hidden_states=text(), timestep=t,
                             img_ids=grid_ids(4, 4), txt_ids=torch.zeros(T, 3))


def hidream():
    m = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 6, 6), max_resolution=(8, 8), llama_layers=[0, 1, 2, 3, 4])
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), timesteps=t, encoder_hidden_states_t5=text(),
                             encoder_hidden_states_llama3=g(5, 1, T, 16, seed=2), pooled_embeds=g(1, 16, seed=3))


def cogview3():
    m = diffusers.CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                                 num_attention_heads=2, out_channels=4, text_embed_dim=16,
                                                 time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=8)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), encoder_hidden_states=text(), timestep=t,
                             original_size=torch.tensor([[16.0, 16.0]]), target_size=torch.tensor([[16.0, 16.0]]),
                             crop_coords=torch.tensor([[0.0, 0.0]]))


def cogview4():
    m = diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                             attention_head_dim=8, num_attention_heads=2, text_embed_dim=16,
                                             time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=8,
                                             rope_axes_dim=(4, 4))
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), encoder_hidden_states=text(), timestep=t,
                             original_size=torch.tensor([[16.0, 16.0]]), target_size=torch.tensor([[16.0, 16.0]]),
                             crop_coords=torch.tensor([[0.0, 0.0]]))


def stable_audio():
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    m = diffusers.StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=3, attention_head_dim=8,
                                      num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4,
                                      cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=16,
                                      cross_attention_input_dim=16)
    rope = get_1d_rotary_pos_embed(4, 16 + 1, use_real=True, repeat_interleave_real=False)
    return m, lambda t: dict(hidden_states=g(1, 4, 16), timestep=t, encoder_hidden_states=text(),
                             global_hidden_states=g(1, 1, 16, seed=2), rotary_embedding=rope)


def hunyuan_dit():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    m = diffusers.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=16, num_layers=4, cross_attention_dim=16,
                                    cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=T, text_len_t5=T,
                                    use_style_cond_and_image_meta_size=False, learn_sigma=False)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), use_real=True)
    return m, lambda t: dict(hidden_states=g(1, 4, 8, 8), timestep=t, encoder_hidden_states=text(),
                             text_embedding_mask=torch.ones(1, T), encoder_hidden_states_t5=text(2),
                             text_embedding_mask_t5=torch.ones(1, T), image_rotary_emb=rope)


def uvit():
    m = diffusers.UVit2DModel(hidden_size=16, cond_embed_dim=16, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                              encoder_hidden_size=16, vocab_size=33, codebook_size=32, in_channels=8,
                              block_out_channels=16, num_res_blocks=1, block_num_heads=2, num_hidden_layers=3,
                              num_attention_heads=2, intermediate_size=32)
    ids = torch.randint(0, 32, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    return m, lambda t: dict(input_ids=ids, encoder_hidden_states=text(), pooled_text_emb=g(1, 16, seed=2),
                             micro_conds=torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]) + t / 1000)


def zimage():
    # latents and captions come as lists, one tensor per batch row
    m = diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    return m, lambda t: dict(x=[g(4, 1, 8, 8)], t=t / 1000, cap_feats=[text()[0]])


def flux2():
    # double-stream blocks, then [text; image] concatenated for the single-stream ones: two chains
    m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=8, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    ids = torch.cat([torch.zeros(16, 1), grid_ids(4, 4)], -1)[None]
    return m, lambda t: dict(hidden_states=g(1, 16, 16), encoder_hidden_states=text(), timestep=t / 1000,
                             img_ids=ids, txt_ids=torch.zeros(1, T, 4))


def unet2d():
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 16, 16),
                              layers_per_block=1, norm_num_groups=4, attention_head_dim=8)
    return m, lambda t: dict(sample=g(1, 3, 8, 8), timestep=t)


def unet3d():
    m = diffusers.UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                       down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                       up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(8, 16),
                                       layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
                                       attention_head_dim=4)
    return m, lambda t: dict(sample=g(1, 4, 2, 8, 8), timestep=t, encoder_hidden_states=text())


def svd():
    m = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, down_block_types=("CrossAttnDownBlockSpatioTemporal",
                                                                       "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), block_out_channels=(32, 32),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
        cross_attention_dim=16, num_attention_heads=(2, 2), num_frames=2)
    return m, lambda t: dict(sample=g(1, 2, 8, 8, 8), timestep=t, encoder_hidden_states=g(1, 1, 16, seed=1),
                             added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]))


def latte():
    m = diffusers.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                          caption_channels=16, video_length=2, norm_type="ada_norm_single",
                                          num_embeds_ada_norm=1000)
    return m, lambda t: dict(hidden_states=g(1, 4, 2, 8, 8), timestep=t, encoder_hidden_states=text())


def cascade():
    layer = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
    m = diffusers.StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=8, patch_size=1, conditioning_dim=16,
        block_out_channels=(16, 16), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(layer, layer), clip_text_in_channels=16, clip_text_pooled_in_channels=16,
        clip_image_in_channels=None, effnet_in_channels=None, pixel_mapper_in_channels=None, self_attn=True,
        timestep_conditioning_type=("sca",), switch_level=None)
    return m, lambda t: dict(sample=g(1, 4, 8, 8), timestep_ratio=t / 1000, clip_text_pooled=g(1, 1, 16, seed=1),
                             clip_text=text(2), sca=torch.zeros(1))


# the block lists each served class is cached over (the design: the chain that attends with the most parameters;
# dual-stream lists that hand their text states on join one chain; UNets: down, mid, up)
SERVED = {
    "AuraFlowTransformer2DModel": (aura, ("joint_transformer_blocks",)),
    "LuminaNextDiT2DModel": (lumina_next, ("layers",)),
    "Lumina2Transformer2DModel": (lumina2, ("layers",)),
    "SanaTransformer2DModel": (sana, ("transformer_blocks",)),
    "LTXVideoTransformer3DModel": (ltx, ("transformer_blocks",)),
    "MochiTransformer3DModel": (mochi, ("transformer_blocks",)),
    "AllegroTransformer3DModel": (allegro, ("transformer_blocks",)),
    "QwenImageTransformer2DModel": (qwen, ("transformer_blocks",)),
    "ChromaTransformer2DModel": (chroma, ("transformer_blocks",)),
    "BriaTransformer2DModel": (bria, ("transformer_blocks", "single_transformer_blocks")),
    "HiDreamImageTransformer2DModel": (hidream, ("single_stream_blocks",)),
    "CogView3PlusTransformer2DModel": (cogview3, ("transformer_blocks",)),
    "CogView4Transformer2DModel": (cogview4, ("transformer_blocks",)),
    "StableAudioDiTModel": (stable_audio, ("transformer_blocks",)),
    "HunyuanDiT2DModel": (hunyuan_dit, ("blocks",)),
    "UVit2DModel": (uvit, ("transformer_layers",)),
    "ZImageTransformer2DModel": (zimage, ("layers",)),
    "UNet2DModel": (unet2d, ("down_blocks", "mid_block", "up_blocks")),
    "UNet3DConditionModel": (unet3d, ("down_blocks", "mid_block", "up_blocks")),
    "UNetSpatioTemporalConditionModel": (svd, ("down_blocks", "mid_block", "up_blocks")),
    "Flux2Transformer2DModel": (flux2, ("transformer_blocks",)),
}
# refused: (build, where, message)
REFUSED = {
    # spatial and temporal blocks alternate, with reshapes between: no span of consecutive blocks
    "LatteTransformer3DModel": (latte, "first call", "do not run one after another"),
    # each level is a list of mixed blocks that the UNet runs itself
    "StableCascadeUNet": (cascade, "apply", "found no `down_blocks`/`up_blocks` of callable blocks"),
}


def call(model, kwargs):
    with torch.no_grad():
        if "return_dict" in inspect.signature(type(model).forward).parameters:
            out = model(**kwargs, return_dict=False)[0]
        else:
            out = model(**kwargs)
    return torch.stack(out) if isinstance(out, list) else out


def loop(model, inputs):
    """A manual sampling loop: decreasing timesteps, the latent nudged by each prediction."""
    outs, latent = [], None
    for t in STEPS:
        kwargs = inputs(torch.tensor([t]))
        first = next(iter(kwargs))
        if latent is not None:
            kwargs[first] = latent
        out = call(model, kwargs)
        outs.append(out)
        x = kwargs[first]
        latent = x - 0.01 * out if isinstance(x, torch.Tensor) and out.shape == x.shape and x.is_floating_point() else x
    return outs


def block_work(adapter):
    """A counter of blocks that really ran: a pre-hook on each block's first parameterised submodule (a cache
    stand-in returns before any of them runs, while the block's own __call__ still fires)."""
    count = [0]
    handles = []
    for block in adapter.blocks:
        inner = next(m for m in block.module.modules()
                     if m is not block.module and next(m.parameters(recurse=False), None) is not None)
        handles.append(inner.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)))
    return count, handles


def test_every_denoiser_without_a_family_file_is_covered():
    """The classes here have no registered adapter: they exercise the auto path, not a family file."""
    registered = {cls for classes in fastdiff.supported().values() for cls in classes}
    assert not registered & (set(SERVED) | set(REFUSED))


@pytest.mark.parametrize("name", sorted(SERVED))
def test_auto_adapter_caches_and_removes_bit_identical(name):
    build, lists = SERVED[name]
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    assert type(model).__name__ == name
    bare = loop(model, inputs)
    before = module_snapshot(model)

    adapter = adapters.resolve(model)
    assert adapter.name == "auto"
    assert tuple(bl.path for bl in adapter.spec.block_lists) == lists
    handle = fastdiff.apply(model, CACHE)
    count, hooks = block_work(adapter)  # the same block modules as the session's own adapter
    try:
        cached = loop(model, inputs)
        decisions = [r.decisions.get("cache") for r in handle.records]
        # the clock read each call's timestep, whatever the forward names it (HiDream `timesteps`, ZImage `t`)
        if adapter.spec.timestep_arg in inspect.signature(type(model).forward).parameters:  # UVit2D has none
            assert not any(math.isnan(r.ctx.timestep) for r in handle.records)
    finally:
        for h in hooks:
            h.remove()
    fastdiff.remove(model)

    n = len(adapter.blocks)
    assert decisions == ["compute", "compute", "reuse"]
    # the reused step skipped work: dense is n blocks per step plus one probe forward on the first call
    skipped = (len(STEPS) + 1) * n - count[0]
    cacheable = n - 2 if lists[0] == "down_blocks" else n  # a UNet's outermost down and up blocks always run
    assert skipped == cacheable > 0
    for out, ref in zip(cached, bare):
        assert torch.isfinite(out).all()
    # near the bare output: the cache's error stays within the model's own change between two steps
    change = ((bare[2] - bare[1]).abs().max() / bare[2].abs().max()).item()
    err = ((cached[2] - bare[2]).abs().max() / bare[2].abs().max()).item()
    assert err <= 1.5 * change + 0.02, (err, change)
    # never the previous prediction replayed whole (what the old auto adapter did on UNet2DModel)
    assert not torch.equal(cached[2], cached[1])
    assert module_snapshot(model) == before
    assert all(torch.equal(a, b) for a, b in zip(loop(model, inputs), bare))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_auto_adapter_refuses_what_it_cannot_cache_safely(name):
    build, where, message = REFUSED[name]
    model, inputs = build()
    model.eval()
    bare = loop(model, inputs)
    before = module_snapshot(model)
    if where == "apply":
        with pytest.raises(fastdiff.UnsupportedModelError, match=message) as err:
            fastdiff.apply(model, CACHE)
        assert name in str(err.value) and "FluxTransformer2DModel" in str(err.value)  # the supported list
    else:
        fastdiff.apply(model, CACHE)
        with pytest.raises(fastdiff.UnsupportedModelError, match=message) as err:
            loop(model, inputs)
        assert name in str(err.value)
        fastdiff.remove(model)
        with fastdiff.accelerated(model):  # telemetry alone stands in for nothing: it runs, unchanged
            assert all(torch.equal(a, b) for a, b in zip(loop(model, inputs), bare))
    assert module_snapshot(model) == before
    assert all(torch.equal(a, b) for a, b in zip(loop(model, inputs), bare))
