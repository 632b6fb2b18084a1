"""The planner turns a target speedup into a config: from the cost model for fixed schedules, by tuning the
threshold on the user's own call for adaptive policies."""

import warnings

import pytest
import torch

import fastdiff
from fastdiff.eval import tiny

from ..unit.toy import FakePipeline, ToyDenoiser


def test_static_plan_comes_from_the_cost_model_without_running_the_model():
    pipe = tiny.build_pipeline("pixart")
    p = fastdiff.plan(pipe, {"cache": {"policy": "static", "warmup": 1, "cooldown": 1}}, target=2.0, height=32, width=32,
                      steps=20)
    assert p.runs == 0 and p.knob == "cache.interval" and p.config.cache.interval == p.value
    est = fastdiff.estimate(pipe, p.config, height=32, width=32, steps=20)
    assert est.speedup == pytest.approx(p.speedup) and abs(p.speedup - 2.0) < 0.35


def test_adaptive_plan_tunes_the_threshold_on_the_call_and_reaches_the_target():
    pipe = tiny.build_pipeline("wan")
    kw = lambda: tiny.pipeline_kwargs("wan", steps=12)  # noqa: E731
    base = {"cache": {"policy": "residual", "head": 1, "max_skip": 3}}
    with torch.no_grad():
        p = fastdiff.plan(pipe, base, target=1.4, call=lambda: pipe(**kw()))
        with fastdiff.accelerated(pipe, p.config) as h:
            pipe(**kw())
            measured = h.summary().estimated_speedup
    assert p.knob == "cache.threshold" and 1 <= p.runs <= 10
    assert measured == pytest.approx(p.speedup) and abs(measured - 1.4) <= 0.1 * 1.4
    assert fastdiff.session_of(pipe) is None  # tuning runs leave nothing applied


def test_plan_refuses_what_it_cannot_plan():
    pipe = FakePipeline(ToyDenoiser())
    with pytest.raises(fastdiff.ConfigError, match="call"):
        fastdiff.plan(pipe, {"cache": {"policy": "easycache"}}, target=2.0)
    with pytest.raises(fastdiff.ConfigError, match="target"):
        fastdiff.plan(pipe, {"cache": {}}, target=0.5)
    with pytest.raises(fastdiff.ConfigError, match="cache"):
        fastdiff.plan(pipe, {}, target=2.0)


def test_calibrate_fits_the_signal_to_output_change_map():
    # Shift blocks add t/1000: the first block's residual and the span's residual change by the same
    # relative amount each step, so the fitted map is the identity.
    from ..unit.toy import ShiftDenoiser

    pipe = FakePipeline(ShiftDenoiser(n_blocks=3))
    coeffs = fastdiff.calibrate(pipe, lambda: pipe(steps=10), degree=1)
    assert coeffs == pytest.approx([1.0, 0.0], abs=1e-5)
    with fastdiff.accelerated(pipe, cache={"policy": "residual", "head": 1, "threshold": 0.5, "rescale": coeffs}) as h:
        pipe(steps=10)
        assert any("cache=reuse" in r.decisions for r in h.summary().per_step)
    with pytest.raises(fastdiff.ConfigError, match="too few"):
        fastdiff.calibrate(pipe, lambda: pipe(steps=2), degree=2)


# -- the whole space: speedup= / latency= ---------------------------------------------------------------------------

from fastdiff.cost import latency  # noqa: E402
from fastdiff.planner import Option, compose_psnr, search  # noqa: E402

COEF = latency.Coefficients(linear=1e-10, attention=2e-10, sparse=4e-10, sparse_pairs=1e-11, match=3e-10, merge=1e-8,
                            op=1e-6, hook=2e-6, site=3e-6, call=5e-6)


@pytest.fixture
def pixart(tmp_path, monkeypatch):
    """A tiny PixArt pipeline with a calibration of known coefficients in a private cache dir (the tests do not
    depend on the shipped default or on this machine's timings)."""
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe = tiny.build_pipeline("pixart")
    latency.Calibration(COEF, latency.device_key(), latency.model_key(pipe.transformer), "measured for the test").save(
        latency.cache_path(pipe.transformer))
    return pipe


def _table():
    """Hand-built: dense 1 s, the session 0.9 s; each option saves a fixed time alone, savings add when composed."""
    options = {
        "cache": [Option("cache", "a", {"interval": 2}, psnr=40.0), Option("cache", "b", {"interval": 4}, psnr=30.0)],
        "merge": [Option("merge", "m", {"ratio": 0.5}, psnr=35.0)],
        "sparse": [Option("sparse", "slow", {"pattern": "window"}, psnr=60.0)],  # the best fidelity, but no faster
    }
    saves = {("cache", 2): 0.45, ("cache", 4): 0.6, ("merge", 0.5): 0.2, ("sparse", "window"): -0.05}

    def price(sections):
        return 0.9 - sum(saves[(m, next(iter(s.values())))] for m, s in sections.items())

    return options, price


def test_the_planner_returns_the_most_fidelity_that_meets_the_budget_on_a_hand_built_table():
    options, price = _table()
    best, notes = search(options, price, dense_seconds=1.0, budget=0.5)  # 2x
    assert [o.label for o in best.options] == ["cache: a"] and best.seconds == pytest.approx(0.45)
    # 3x: cache b alone (0.30 s, 30 dB) and cache a + merge (0.25 s, 33.8 dB) both fit; the composition keeps more
    best, _ = search(options, price, dense_seconds=1.0, budget=1 / 3)
    assert [o.label for o in best.options] == ["cache: a", "merge: m"]
    assert best.psnr == pytest.approx(compose_psnr([40.0, 35.0])) and best.psnr > 30.0
    # the option that does not pay is never picked, whatever its fidelity, and the notes say why
    assert any("sparse: slow: does not pay" in n and "0.95 s" in n for n in notes)
    assert compose_psnr([]) == float("inf") and compose_psnr([30.0, 30.0]) == pytest.approx(30 - 3.0103, abs=1e-3)


def test_an_unreachable_target_is_refused_naming_the_reachable_range():
    options, price = _table()
    with pytest.raises(fastdiff.ConfigError, match=r"reachable range 1\.00x-10\.00x"):
        search(options, price, dense_seconds=1.0, budget=0.01)  # fastest: cache b + merge, 0.1 s


def test_planning_the_whole_space_prices_time_and_gives_a_reusable_config(pixart, tmp_path):
    pipe = pixart
    size = dict(height=32, width=32, steps=20)
    p = fastdiff.plan(pipe, speedup=2.0, **size)
    est = fastdiff.estimate(pipe, p.config, **size)
    assert p.knob == "space" and p.runs == 0 and p.choices and p.latency == "measured for the test"
    assert est.time_speedup == pytest.approx(p.speedup) and p.speedup >= 2.0 * 0.95
    assert p.seconds == pytest.approx(est.seconds) and p.dense_seconds == pytest.approx(est.dense_seconds)
    path = tmp_path / "plan.yaml"
    p.config.to_yaml(path)
    assert fastdiff.load_config(str(path)) == p.config and p.config.strify()
    budget = fastdiff.plan(pipe, latency=est.dense_seconds / 3, **size)  # a time budget in seconds
    assert budget.seconds <= est.dense_seconds / 3 * 1.05
    only_cache = fastdiff.plan(pipe, speedup=1.5, mechanisms=("cache",), **size)
    assert all(c.startswith("cache:") for c in only_cache.choices)


def test_apply_with_a_speedup_applies_the_plan(pixart):
    pipe = pixart
    kw = lambda: tiny.pipeline_kwargs("pixart", steps=8)  # noqa: E731
    size = dict(height=32, width=32, steps=8)
    p = fastdiff.plan(pipe, speedup=2.0, **size)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # applied by hand, the plan is priced at the default size (a warning)
            with fastdiff.accelerated(pipe, p.config):
                planned = tiny.output_tensor(pipe(**kw()))
        fastdiff.apply(pipe, speedup=2.0, **size)
        try:
            got = tiny.output_tensor(pipe(**kw()))
        finally:
            fastdiff.remove(pipe)
    assert torch.equal(planned, got)


def test_a_refused_plan_never_touches_the_model(pixart):
    pipe = pixart
    kw = lambda: tiny.pipeline_kwargs("pixart", steps=4)  # noqa: E731
    with torch.no_grad():
        before = tiny.output_tensor(pipe(**kw()))
    with pytest.raises(fastdiff.ConfigError, match="reachable range"):
        fastdiff.apply(pipe, speedup=100.0, height=32, width=32, steps=4)
    with pytest.raises(fastdiff.ConfigError, match="missing"):
        fastdiff.plan(pipe, speedup=2.0, height=32)
    with pytest.raises(fastdiff.ConfigError, match="only hold|may hold only"):
        fastdiff.plan(pipe, {"cache": {}}, speedup=2.0, height=32, width=32, steps=4)
    with pytest.raises(fastdiff.ConfigError, match="either speedup"):
        fastdiff.plan(pipe, speedup=2.0, latency=1.0, height=32, width=32, steps=4)
    assert fastdiff.session_of(pipe) is None
    with torch.no_grad():
        assert torch.equal(before, tiny.output_tensor(pipe(**kw())))


def test_apply_warns_when_a_mechanism_is_predicted_not_to_pay(pixart):
    pipe = pixart  # 16 tokens: a 3x3-tile window covers them all, no attention is skipped
    with pytest.warns(UserWarning, match=r"sparse .* predicted not to pay .* s per 20-step run against .* s without"):
        fastdiff.apply(pipe, preset="sparse-window")
    fastdiff.remove(pipe)


def test_the_eval_cli_plans_its_speedup_and_latency_configs_for_its_call():
    from argparse import Namespace

    from fastdiff.eval import cli

    args = Namespace(model="ref-digits", preset=None, config=None, speedup=[2.0], latency=None, steps=10, seed=0,
                     samples=4, batch_size=2)
    (name, cfg), = cli.configs(args)[1:]
    p = fastdiff.plan(cli.workloads.load("ref-digits", samples=1, steps=10).pipe, speedup=2.0, height=16, width=16,
                      steps=10, batch=2)
    assert name == "plan-2x" and cfg == p.config
    with pytest.raises(SystemExit, match="--speedup 100: .*reachable range"):
        cli.configs(Namespace(**{**vars(args), "speedup": [100.0]}))


def test_the_ranking_gives_the_best_compositions_in_order_of_expected_fidelity():
    from fastdiff.planner import ranked

    options, price = _table()
    found, _ = ranked(options, price, dense_seconds=1.0, budget=0.5, top=3)
    assert [[o.label for o in c.options] for c in found] == [["cache: a"], ["cache: a", "merge: m"], ["cache: b"]]
    assert [c.psnr for c in found] == sorted((c.psnr for c in found), reverse=True)


def test_probe_runs_refine_the_plan_on_the_users_call(pixart):
    pipe = pixart
    kw = lambda: tiny.pipeline_kwargs("pixart", steps=8)  # noqa: E731
    size = dict(height=32, width=32, steps=8)
    with torch.no_grad():
        dense = tiny.output_tensor(pipe(**kw()))
    p = fastdiff.plan(pipe, speedup=1.5, call=lambda: pipe(**kw()), probes=2, **size)
    assert p.runs == 3 and len(p.trace) == 2 and fastdiff.session_of(pipe) is None
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fastdiff.accelerated(pipe, p.config):
                out = tiny.output_tensor(pipe(**kw()))
    measured = 10 * torch.log10((dense.max() - dense.min()) ** 2 / ((out - dense) ** 2).mean()).item()
    assert measured == pytest.approx(max(t[1] for t in p.trace), rel=1e-5)  # the chosen one is the best measured


def test_the_planner_chooses_a_bottleneck_stage_split_for_a_speedup(tmp_path, monkeypatch):
    """Asked for a speedup with the bottleneck alone, the plan is a stage split measured on the FLUX reference whose
    predicted time meets the target, and `estimate` prices that config to the plan's figure; a speedup no stage split
    reaches is refused naming the reachable range."""
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe = tiny.build_pipeline("flux")
    latency.Calibration(COEF, latency.device_key(), latency.model_key(pipe.transformer), "measured for the test").save(
        latency.cache_path(pipe.transformer))
    size = dict(height=64, width=64, steps=20)
    p = fastdiff.plan(pipe, speedup=1.5, mechanisms=("bottleneck",), **size)
    assert p.config.bottleneck is not None and [c.split(":")[0] for c in p.choices] == ["bottleneck"]
    assert len(p.config.bottleneck.stages) >= 2 and any(st.get("scale", 1) > 1 for st in p.config.bottleneck.stages)
    est = fastdiff.estimate(pipe, p.config, **size)
    assert est.time_speedup == pytest.approx(p.speedup) and p.speedup >= 1.5 * 0.95 and len(est.stages) >= 2
    with pytest.raises(fastdiff.ConfigError, match="reachable range"):
        fastdiff.plan(pipe, speedup=50.0, mechanisms=("bottleneck",), **size)
