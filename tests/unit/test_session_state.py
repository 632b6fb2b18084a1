"""Run state under the ways users really drive a pipeline: swapped schedulers, stale handles, threads, loops at
one timestep, schedulers that count from 1.0 (regressions of the hardening issue, items 2, 4, 5, 6, 13)."""

import threading

import diffusers
import pytest
import torch

import fastdiff
from fastdiff.eval import tiny

from .toy import FakePipeline, ToyDenoiser


def _call(pipe, family="sd3", steps=6):
    with torch.no_grad():
        return tiny.output_tensor(pipe(**tiny.pipeline_kwargs(family, steps=steps)))


def test_scheduler_swapped_after_apply_is_followed():
    swap = diffusers.FlowMatchEulerDiscreteScheduler
    p = tiny.build_pipeline("sd3")
    h = fastdiff.apply(p, preset="cache-ultra")
    _call(p)
    p.scheduler = swap.from_config(p.scheduler.config)
    got = _call(p)
    ref = tiny.build_pipeline("sd3")
    ref.scheduler = swap.from_config(ref.scheduler.config)
    fastdiff.apply(ref, preset="cache-ultra")
    assert torch.equal(got, _call(ref))  # as if applied after the swap
    assert [(r.ctx.run, r.ctx.step, r.ctx.num_steps) for r in h.records] == [(1, i, 6) for i in range(6)]
    for _ in range(5):  # state stays one run's worth
        _call(p, steps=4)
    assert len(h.records) == 4 and len(h.state.states) <= 2
    fastdiff.remove(p)
    assert "step" not in p.scheduler.__dict__ and "set_timesteps" not in p.scheduler.__dict__


def test_stale_handle_remove_leaves_the_newer_session():
    p = tiny.build_pipeline("dit")
    bare = _call(p, "dit")
    h1 = fastdiff.apply(p, preset="cache-safe")
    h1.remove()
    h2 = fastdiff.apply(p, preset="cache-fast")
    h1.remove()  # stale: a no-op
    assert fastdiff.session_of(p) is h2
    with pytest.raises(fastdiff.FastDiffError, match="already applied"):
        fastdiff.apply(p, preset="cache-safe")
    assert fastdiff.remove(p) is True
    assert torch.equal(_call(p, "dit"), bare)
    assert fastdiff.session_of(p) is None and not h2.hooks.names()


def test_with_block_does_not_remove_a_session_applied_inside_it():
    q = tiny.build_pipeline("dit")
    with fastdiff.accelerated(q, preset="cache-safe"):
        fastdiff.remove(q)
        inner = fastdiff.apply(q, preset="cache-fast")
    assert fastdiff.session_of(q) is inner
    fastdiff.remove(q)


def _fresh_scheduler_pipeline(shared):
    q = type(shared)(**{**shared.components, "scheduler": type(shared.scheduler).from_config(shared.scheduler.config)})
    q.set_progress_bar_config(disable=True)
    return q


def test_two_threads_sharing_one_accelerated_denoiser_equal_sequential_calls():
    p = tiny.build_pipeline("sd3")
    fastdiff.apply(p, preset="cache-fast")
    q = _fresh_scheduler_pipeline(p)  # from_pipe-style: same transformer, a scheduler of its own
    solo = {id(x): _call(x, steps=8) for x in (p, q)}
    errors, wrong = [], []

    def work(pipe):
        for _ in range(3):
            try:
                wrong.append(not torch.equal(_call(pipe, steps=8), solo[id(pipe)]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(x,)) for x in (p, q)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and wrong == [False] * 6
    # interleaving in one thread: q's run (its scheduler unseen) starts fresh, not inside p's run
    assert torch.equal(_call(q, steps=8), solo[id(q)]) and torch.equal(_call(p, steps=8), solo[id(p)])


def test_repeated_timestep_on_a_bare_denoiser_keeps_state_bounded():
    den = tiny.build_denoiser("dit")
    h = fastdiff.apply(den, preset="cache-safe")
    x = tiny.denoiser_inputs("dit")
    with torch.no_grad():
        first = den(**x)
        for _ in range(40):
            den(**x)
        last = den(**x)
    assert len(h.records) <= fastdiff.clock.MAX_CALLS_PER_STEP
    assert len(h.state.states) <= fastdiff.clock.MAX_CALLS_PER_STEP
    assert torch.equal(first.sample, last.sample)


class _Shift1Pipeline(FakePipeline):
    """AuraFlow's loop: FlowMatchEuler with shift 1 (first timestep 1000) and the denoiser given t / 1000."""

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)

    def __call__(self, steps=4, x=None, heun=False):
        x = torch.ones(1, 1, 4, 4) if x is None else x
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            out = self.transformer(x, timestep=t / 1000)
            x = self.scheduler.step(out, t, x).prev_sample
        return x


def test_steps_counted_from_the_scheduler_not_an_ambiguous_timestep_match():
    pipe = _Shift1Pipeline(ToyDenoiser())
    with fastdiff.accelerated(pipe) as h:
        pipe(steps=5)
        assert [(r.ctx.step, r.ctx.num_steps) for r in h.records] == [(i, 5) for i in range(5)]
        pipe.scheduler.set_timesteps(5)
        pipe.scheduler.set_begin_index(2)  # img2img: the run starts part-way and says so
        x = torch.ones(1, 1, 4, 4)
        for t in pipe.scheduler.timesteps[2:]:
            x = pipe.scheduler.step(pipe.transformer(x, timestep=t / 1000), t, x).prev_sample
        assert [r.ctx.num_steps for r in h.records] == [3, 3, 3]


def test_auraflow_cache_is_not_a_silent_no_op():
    """AuraFlow passes t / 1000 with a shift-1 schedule (first timestep 1000): the clock once matched 1.0 to the
    schedule's last timestep, saw one step left, and computed every step as cool-down."""
    torch.manual_seed(0)
    m = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=64).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    p = diffusers.AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=m,
                                   scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), prompt_attention_mask=torch.ones(1, 8),
              negative_prompt_embeds=torch.randn(1, 8, 16, generator=g), height=16, width=16,
              negative_prompt_attention_mask=torch.ones(1, 8), num_inference_steps=8, output_type="latent")
    with torch.no_grad():
        bare = p(**kw, generator=torch.Generator().manual_seed(1)).images
        h = fastdiff.apply(p, preset="cache-fast")
        acc = p(**kw, generator=torch.Generator().manual_seed(1)).images
    assert [r.ctx.num_steps for r in h.records] == [8] * 8
    assert "forecast" in [r.decisions["cache"] for r in h.records]
    assert torch.isfinite(acc).all() and not torch.equal(acc, bare)


@pytest.mark.parametrize("preset", ["cache-safe", "cache-ultra", "merge-tome", "merge-todo"])
def test_summary_after_the_with_block(preset):
    p = tiny.build_pipeline("pixart")
    kw = tiny.pipeline_kwargs("pixart", steps=6)
    kw["height"] *= 4
    kw["width"] *= 4
    with fastdiff.accelerated(p, preset=preset) as h:
        with torch.no_grad():
            p(**kw)
        inside = h.summary().to_dict()
    after = h.summary().to_dict()
    assert after == inside and after["estimated_speedup"] > 1.0
