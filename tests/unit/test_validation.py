"""Bad values are refused up front, as ConfigError, before any work (issue 17 item 10, repros r10 and r11):
config values that used to pass validation and then failed or misbehaved inside the pipeline call, and the
size/step/target arguments of fastdiff.estimate, plan and calibrate."""

import math

import pytest
import torch

import fastdiff
from fastdiff import ConfigError, load_config
from fastdiff.eval import tiny

from .toy import FakePipeline, ToyDenoiser

WINDOW = {"pattern": "window", "block": 16, "window": [1, 1, 1], "start": 0.0}
RESIDUAL = {"policy": "residual", "head": 1, "threshold": 0.05}

# config -> what the message must name. The list-item, stride, rescale and family cases passed apply() before and
# failed (IndexError, ValueError) or misbehaved (reuse every step) in the call; the rest keep their neighbours refused.
BAD_CONFIGS = {
    "dense_heads bools": ({"sparse": {**WINDOW, "dense_heads": [True, True, True]}},
                          r"sparse\.dense_heads must be a list of ints"),
    "dense_blocks bool": ({"sparse": {**WINDOW, "dense_blocks": [False]}}, r"sparse\.dense_blocks must be a list of ints"),
    "window bools": ({"sparse": {**WINDOW, "window": [True, True, True]}}, r"sparse\.window must be a list of ints"),
    "tile bools": ({"sparse": {**WINDOW, "tile": [1, True, 4]}}, r"sparse\.tile must be a list of ints"),
    "tile float": ({"sparse": {**WINDOW, "tile": [1, 4.0, 4]}}, r"sparse\.tile must be a list of ints"),
    "stride 3": ({"sparse": {"pattern": "topk", "method": "antidiag", "block": 16, "stride": 3}},
                 r"sparse\.stride must be a power of two <= sparse\.block \(16\), got 3"),
    "stride above block": ({"sparse": {"pattern": "topk", "method": "antidiag", "block": 16, "stride": 32}},
                           r"sparse\.stride must be a power of two"),
    "stride bool": ({"sparse": {"pattern": "topk", "stride": True}}, r"sparse\.stride must be an int"),
    "rescale nan": ({"cache": {**RESIDUAL, "rescale": [math.nan]}}, r"cache\.rescale must be a list of finite numbers"),
    "rescale inf": ({"cache": {**RESIDUAL, "rescale": [1.0, math.inf]}}, r"cache\.rescale must be a list of finite"),
    "rescale negative": ({"cache": {**RESIDUAL, "rescale": [-1.0]}}, r"cache\.rescale \[-1\.0\] predicts no positive"),
    "rescale zero": ({"cache": {**RESIDUAL, "rescale": [0.0, 0.0]}}, r"reuse every step"),
    "rescale falling": ({"cache": {**RESIDUAL, "rescale": [-2.0, 0.0]}}, r"reuse every step"),
    "rescale bool": ({"cache": {**RESIDUAL, "rescale": [True]}}, r"cache\.rescale must be a list of finite"),
    "threshold nan": ({"cache": {**RESIDUAL, "threshold": math.nan}}, r"cache\.threshold must be a finite number"),
    "interval bool": ({"cache": {"interval": True}}, r"cache\.interval must be an int, got True"),
    "interval huge": ({"cache": {"interval": 10**5000}}, r"cache\.interval must be an int \(at most 2\*\*63 in size\), "
                                                        r"got <a number too long to show>"),
    "dense_heads huge": ({"sparse": {**WINDOW, "dense_heads": [2**64]}}, r"at most 2\*\*63 in size"),
    "threshold huge": ({"cache": {**RESIDUAL, "threshold": -(10**400)}}, r"cache\.threshold must be a finite number"),
    "merge ratio nan": ({"merge": {"ratio": math.nan}}, r"merge\.ratio must be a finite number"),
    "guidance start inf": ({"guidance": {"start": -math.inf}}, r"guidance\.start must be a finite number"),
    "targets not strings": ({"merge": {"targets": [1]}}, r"merge\.targets must be a list of strings"),
    "family by class name": ({"cache": {"interval": 2}, "families": {"DiT": {"cache": {"interval": 9}}}},
                             r"'DiT' is not a family name; families \(adapter names\): \[.*'dit'"),
    "family typo": ({"families": {"pixrat": {}}}, r"'pixrat' is not a family name"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values_are_refused_by_load_config(case):
    config, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_bad_config_values_are_refused_at_apply_before_touching_the_model(snapshot):
    pipe = tiny.build_pipeline("pixart")
    before = snapshot(pipe.transformer, pipe.scheduler)
    for case, (config, message) in BAD_CONFIGS.items():
        with pytest.raises(ConfigError, match=message):
            fastdiff.apply(pipe, config)
        assert fastdiff.session_of(pipe) is None, case
    assert snapshot(pipe.transformer, pipe.scheduler) == before


def test_good_neighbours_of_the_refused_values_still_pass():
    # what the checks must not refuse: ints in float fields, real fitted polynomials (TeaCache's has negative
    # coefficients), strides that divide the block, known families (and the auto adapter's name)
    assert load_config(cache={**RESIDUAL, "threshold": 1}).cache.threshold == 1
    teacache = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    assert load_config(cache={**RESIDUAL, "rescale": teacache}).cache.rescale == teacache
    assert load_config(cache={**RESIDUAL, "rescale": [1.0, -0.5]}).cache.rescale == [1.0, -0.5]  # positive above 0.5
    for stride in (1, 2, 16):
        assert load_config(sparse={"pattern": "topk", "method": "antidiag", "block": 16, "stride": stride})
    cfg = load_config({"families": {"dit": {"cache": {"interval": 3}}, "auto": {}}})
    assert cfg.for_family("dit").cache.interval == 3
    assert load_config(sparse={**WINDOW, "dense_heads": [0, 1], "tile": [1, 4, 4]}).sparse.dense_heads == [0, 1]


def test_refused_rescale_would_have_reused_every_step():
    # why a non-positive polynomial is refused: the policy clamps its prediction at 0, so it never recomputes
    from fastdiff.config import _polyval

    assert all(max(0.0, _polyval([-1.0], x)) == 0.0 for x in (0.01, 0.5, 1.0, 5.0))


# -- fastdiff.estimate ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixart():
    return tiny.build_pipeline("pixart")


SIZE = dict(height=16, width=16, steps=4)
BAD_RUNS = {
    "steps 0": (dict(steps=0), r"steps must be in \[1, 10000\], got 0"),
    "steps negative": (dict(steps=-3), r"steps must be in"),
    "steps huge": (dict(steps=10**9), r"steps must be in \[1, 10000\]"),
    "steps float": (dict(steps=4.0), r"steps must be an int, got 4\.0"),
    "steps bool": (dict(steps=True), r"steps must be an int, got True"),
    "batch 0": (dict(batch=0), r"batch must be in \[1, 65536\], got 0"),
    "batch bool": (dict(batch=True), r"batch must be an int"),
    "batch huge": (dict(batch=10**5000), r"batch must be in \[1, 65536\], got <a number too long to show>"),
    "height huge": (dict(height=-(2**70)), r"height must be in \[1, 65536\], got -1180591620717411303424"),
    "height negative": (dict(height=-16), r"height must be in \[1, 65536\], got -16"),
    "height zero": (dict(height=0), r"height must be in"),
    "height nan": (dict(height=math.nan), r"height must be an int, got nan"),
    "height string": (dict(height="16"), r"height must be an int, got '16'"),
    "width float": (dict(width=16.0), r"width must be an int"),
    "width None": (dict(width=None), r"width must be an int, got None"),
    "num_frames 0": (dict(num_frames=0), r"num_frames must be in"),
    "cfg int": (dict(cfg=1), r"cfg must be a bool"),
    "text_tokens negative": (dict(text_tokens=-1), r"text_tokens must be in"),
    "text_tokens bool": (dict(text_tokens=False), r"text_tokens must be an int"),
    # vae x2, patch 2: 4 pixels per token
    "height no whole grid": (dict(height=18), r"height 18 makes no whole token grid: it must be a multiple of 4"),
    "width below one token": (dict(width=2), r"width 2 makes no whole token grid: it must be a multiple of 4"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_estimate_refuses_bad_sizes_before_any_work(pixart, case, monkeypatch):
    kwargs, message = BAD_RUNS[case]
    import fastdiff.cost.model as cost_model

    def no_work(*a, **k):
        raise AssertionError("estimate priced a run it should have refused")

    monkeypatch.setattr(cost_model.CostModel, "block_flops", no_work)
    with pytest.raises(ConfigError, match=message):
        fastdiff.estimate(pixart, "cache-safe", **{**SIZE, **kwargs})


def test_video_frames_must_make_whole_latent_frames():
    wan = tiny.build_pipeline("wan")  # temporal latent scale 4: 4k + 1 frames
    assert fastdiff.estimate(wan, height=64, width=64, num_frames=9, steps=2).layout.grid == (3, 4, 4)
    with pytest.raises(ConfigError, match=r"num_frames 8 makes no whole latent frames.*1 \+ a multiple of 4"):
        fastdiff.estimate(wan, height=64, width=64, num_frames=8, steps=2)
    with pytest.raises(ConfigError, match=r"height 60 .* multiple of 16"):  # vae x8, patch 2
        fastdiff.estimate(wan, height=60, width=64, num_frames=9, steps=2)


def test_scales_are_read_under_every_diffusers_name_and_images_take_no_frames(pixart):
    wan = tiny.build_pipeline("wan").transformer  # patch (1, 2, 2)

    class LTXStyle:  # LTX / EasyAnimate name their factors vae_{spatial,temporal}_compression_ratio
        vae_spatial_compression_ratio, vae_temporal_compression_ratio = 4, 2
        transformer, scheduler = wan, None

        @property
        def components(self):
            return {"transformer": self.transformer}

    assert fastdiff.estimate(LTXStyle(), height=32, width=16, num_frames=5, steps=2).layout.grid == (3, 4, 2)
    with pytest.raises(ConfigError, match=r"num_frames=5: PixArtAlphaPipeline declares no temporal latent scale"):
        fastdiff.estimate(pixart, num_frames=5, **SIZE)


def test_bare_denoiser_sizes_are_latent_sizes(pixart):
    # the pipeline turns 16 pixels into 8 latents (vae x2); its bare transformer is given the latent size itself
    assert fastdiff.estimate(pixart, **SIZE).layout.grid == (1, 4, 4)
    assert fastdiff.estimate(pixart.transformer, height=8, width=8, steps=4).layout.grid == (1, 4, 4)
    assert fastdiff.estimate(pixart.transformer, height=8, width=8, steps=4).flops == \
        fastdiff.estimate(pixart, **SIZE).flops
    with pytest.raises(ConfigError, match=r"height 9 makes no whole token grid: it must be a multiple of 2 "
                                          r"\(latent scale 1 of a bare denoiser"):
        fastdiff.estimate(pixart.transformer, height=9, width=8, steps=4)


def test_pipeline_with_an_unknown_vae_scale_is_refused(pixart):
    class NoScale:  # a VAE that declares nothing, in a pipeline that declares no vae_scale_factor
        config = None

    class Pipe:
        def __init__(self):
            self.transformer, self.scheduler, self.vae = pixart.transformer, pixart.scheduler, NoScale()

        @property
        def components(self):
            return {"transformer": self.transformer, "scheduler": self.scheduler, "vae": self.vae}

    with pytest.raises(fastdiff.UnsupportedModelError, match=r"Pipe declares no vae_scale_factor.*NoScale"):
        fastdiff.estimate(Pipe(), **SIZE)


# -- plan / calibrate ----------------------------------------------------------------------------------
STATIC = {"cache": {"policy": "static"}}
BAD_PLANS = {
    "target string": (dict(target="2"), r"target speedup must be a finite number, got '2'"),
    "target nan": (dict(target=math.nan), r"target speedup must be a finite number"),
    "target bool": (dict(target=True), r"target speedup must be a finite number"),
    "target below 1": (dict(target=0.5), r"target speedup must be in \[1, 100\]"),
    "tolerance negative": (dict(target=2.0, tolerance=-0.1), r"tolerance must be in"),
    "max_runs 0": (dict(target=2.0, max_runs=0), r"max_runs must be in \[1, 100\]"),
    "call not callable": (dict(target=2.0, call=3), r"call must be a function"),
    "unknown size key": (dict(target=2.0, heigth=16, width=16, steps=4), r"unknown size argument\(s\) \['heigth'\]"),
    "static without size": (dict(target=2.0), r"planned from the cost model.*missing \['height', 'width', 'steps'\]"),
    "static steps 0": (dict(target=2.0, height=16, width=16, steps=0), r"steps must be in"),
    "static height string": (dict(target=2.0, height="16", width=16, steps=4), r"height must be an int"),
    "static batch 0": (dict(target=2.0, height=16, width=16, steps=4, batch=0), r"batch must be in"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_plan_refuses_bad_arguments(pixart, case):
    kwargs, message = BAD_PLANS[case]
    with pytest.raises(ConfigError, match=message):
        fastdiff.plan(pixart, STATIC, **kwargs)


def test_adaptive_plan_refuses_sizes_it_would_ignore_and_runs_nothing():
    pipe = FakePipeline(ToyDenoiser())
    calls = []
    with pytest.raises(ConfigError, match=r"tuned on `call`.*drop the size argument\(s\) \['height'\]"):
        fastdiff.plan(pipe, {"cache": RESIDUAL}, target=2.0, call=lambda: calls.append(1), height=16)
    assert calls == [] and fastdiff.session_of(pipe) is None


def test_calibrate_refuses_bad_arguments():
    pipe = FakePipeline(ToyDenoiser())
    for kwargs, message in [(dict(call=None), "call must be a function"), (dict(head=0), r"head must be >= 1"),
                            (dict(degree=True), "degree must be an int"), (dict(degree=9), r"degree must be in")]:
        with pytest.raises(ConfigError, match=message):
            fastdiff.calibrate(pipe, **{"call": lambda: pipe(steps=4), **kwargs})
    assert fastdiff.session_of(pipe) is None


def test_estimate_of_a_refused_config_does_not_touch_the_model(pixart, snapshot):
    before = snapshot(pixart.transformer)
    with pytest.raises(ConfigError):
        fastdiff.estimate(pixart, {"sparse": {**WINDOW, "dense_heads": [True]}}, **SIZE)
    assert snapshot(pixart.transformer) == before
    with torch.no_grad():
        assert fastdiff.estimate(pixart, "cache-safe", **SIZE).speedup > 1
