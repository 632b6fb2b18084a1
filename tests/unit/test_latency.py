"""The latency model: calibrations round-trip through their JSON file, the fit recovers known coefficients, predicted
time grows with tokens and attention density as its terms say, and pricing time leaves estimate's FLOPs alone."""

import dataclasses
import random

import pytest
import torch

import fastdiff
from fastdiff import planner
from fastdiff.context import TokenLayout
from fastdiff.cost import latency
from fastdiff.cost.model import CostModel, Reduction
from fastdiff.eval import tiny

COEF = latency.Coefficients(linear=1e-10, attention=2e-10, sparse=4e-10, sparse_pairs=1e-11, match=3e-10, merge=1e-8,
                            op=1e-5, hook=2e-5, site=3e-5, call=5e-5)


def test_a_calibration_round_trips_through_its_file_and_the_cache_dir_is_overridable(tmp_path, monkeypatch):
    denoiser = tiny.build_denoiser("dit")
    monkeypatch.setenv("FASTDIFF_CACHE_DIR", str(tmp_path))
    assert latency.load(denoiser).is_default  # nothing cached yet: the shipped default, and it says so
    cal = latency.Calibration(COEF, latency.device_key(), latency.model_key(denoiser), "measured by hand",
                              [["bare @ 16 tokens x1", 0.01, 0.011, [1.0] * len(latency.Coefficients.names())]])
    path = cal.save(latency.cache_path(denoiser))
    assert path.parent == tmp_path
    back = latency.load(denoiser)
    assert back == cal and back.points == cal.points and not back.is_default and back.path == str(path)
    assert latency.Calibration.read(path).to_dict() == cal.to_dict()
    other = tiny.build_denoiser("pixart")  # another model has its own file
    assert latency.cache_path(other) != path and latency.load(other).is_default


def test_a_corrupt_calibration_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 2, "device": "cpu", "model": "m", "source": "x", "coefficients": {"linear": -1}}')
    with pytest.raises(fastdiff.FastDiffError, match="bad coefficients"):
        latency.Calibration.read(path)
    path.write_text('{"version": 99}')
    with pytest.raises(fastdiff.FastDiffError, match="version"):
        latency.Calibration.read(path)


def test_the_fit_recovers_the_coefficients_that_made_the_times():
    names = latency.Coefficients.names()
    rng = random.Random(0)
    rows = [[rng.uniform(0.5, 2.0) * 10 ** rng.randint(0, 3) for _ in names] for _ in range(40)]
    truth = [getattr(COEF, n) for n in names]
    seconds = [sum(c * f for c, f in zip(truth, row)) for row in rows]
    got = latency.fit(rows, seconds)
    for n, c in zip(names, truth):
        assert getattr(got, n) == pytest.approx(c, rel=1e-6)


def _model():
    pipe = tiny.build_pipeline("pixart")
    return CostModel(fastdiff.adapters.resolve(pipe.transformer))


def _seconds(model, layout, reductions=None, batch=1):
    return batch * sum(latency.LatencyModel(model, COEF, batch=batch).block_flops(layout, reductions))


def test_predicted_time_grows_with_tokens_and_attention_density():
    model = _model()
    small, large = TokenLayout((1, 4, 4), 8, "none"), TokenLayout((1, 8, 8), 8, "none")
    assert _seconds(model, small) < _seconds(model, large)
    attn = next(t.path for t in model.terms if t.kind == "attention")
    n = 64
    times = [_seconds(model, large, {attn: Reduction(n, n, density=d)}) for d in (0.1, 0.25, 0.5, 1.0)]
    assert times == sorted(times) and len(set(times)) == 4
    # the sparse path's time is linear in the density: equal steps of density cost equal time
    d1, d2, d3 = (_seconds(model, large, {attn: Reduction(n, n, density=d)}) for d in (0.2, 0.4, 0.6))
    assert d2 - d1 == pytest.approx(d3 - d2, rel=1e-9)
    # per-call terms are paid once per call: doubling the batch doubles only the per-sample compute
    per_call = sum(latency.LatencyModel(model, latency.Coefficients(op=1.0), batch=1).block_flops(large))
    assert _seconds(model, large, batch=2) == pytest.approx(2 * _seconds(model, large) - per_call * COEF.op)


def test_merging_prices_its_matching_and_fewer_tokens():
    model = _model()
    layout = TokenLayout((1, 8, 8), 8, "none")
    attn = next(t.path for t in model.terms if t.kind == "attention")
    fewer = [_seconds(model, layout, {attn: Reduction(q, q, extra=0.0)}) for q in (16, 32, 48)]
    assert fewer == sorted(fewer)
    assert _seconds(model, layout, {attn: Reduction(32, 32, extra=1e6)}) == pytest.approx(
        _seconds(model, layout, {attn: Reduction(32, 32)}) + 1e6 * COEF.match)


def test_a_merge_moves_more_rows_the_more_tokens_it_merges():
    # merge: gathers of the kept rows, the sources and their destinations, a scatter-add; unmerge: a gather of all n
    assert [latency.moved(64, k) for k in (64, 48, 32, 16)] == [128, 160, 192, 224]
    model = _model()
    layout = TokenLayout((1, 8, 8), 8, "none")
    attn = next(t for t in model.terms if t.kind == "attention")
    only = latency.Coefficients(merge=1.0)
    rows = [sum(latency.LatencyModel(model, only).block_flops(layout, {attn.path: Reduction(q, q)})) / (attn.coef / 4)
            for q in (56, 32, 16)]
    assert rows == [latency.moved(64, q) for q in (56, 32, 16)]


def test_estimate_prices_time_without_changing_its_flops(tmp_path):
    pipe = tiny.build_pipeline("pixart")
    size = dict(height=32, width=32, steps=10)
    cfg = {"cache": {"policy": "static", "interval": 2}, "merge": {"ratio": 0.5}}
    cal = latency.Calibration(COEF, "cpu", "pixart", "measured by hand")
    slow = latency.Calibration(dataclasses.replace(COEF, linear=1e-8), "cpu", "pixart", "measured by hand")
    a = fastdiff.estimate(pipe, cfg, calibration=cal, **size)
    b = fastdiff.estimate(pipe, cfg, calibration=slow.save(tmp_path / "slow.json"), **size)
    assert (a.flops, a.dense_flops, a.layout, a.steps, a.stages) == (b.flops, b.dense_flops, b.layout, b.steps, b.stages)
    assert a.seconds < b.seconds and a.latency == "measured by hand"
    model = CostModel(fastdiff.adapters.resolve(pipe.transformer))
    assert a.dense_flops == pytest.approx(model.call_flops(a.layout) * 2 * 10)  # 10 steps of cond + uncond calls
    assert fastdiff.estimate(pipe, None, calibration=cal, **size).time_speedup < 1.0  # a bare session only adds hooks


def test_calibrate_measures_the_model_and_leaves_it_as_it_was(tmp_path):
    pipe = tiny.build_pipeline("dit")
    kw = lambda: tiny.pipeline_kwargs("dit", steps=2)  # noqa: E731
    with torch.no_grad():
        before = tiny.output_tensor(pipe(**kw()))
    cal = fastdiff.calibrate_latency(pipe, lambda: pipe(**kw()), scales=(1.0,), repeats=1, directory=tmp_path)
    with torch.no_grad():
        after = tiny.output_tensor(pipe(**kw()))
    assert torch.equal(before, after) and fastdiff.session_of(pipe) is None
    assert cal.source.startswith("measured") and len(cal.points) == 1 + len(planner.PROBES)
    assert latency.load(pipe.transformer, tmp_path) == cal


def test_packed_latents_are_replayed_at_other_token_counts_with_their_positions_rebuilt():
    pipe = tiny.build_pipeline("flux")
    denoiser = pipe.transformer
    args, kwargs = planner.record_call(denoiser, lambda: pipe(**tiny.pipeline_kwargs("flux", steps=1)))
    adapter = fastdiff.adapters.resolve(denoiser)
    f, h, w = adapter.layout(adapter.bind(args, kwargs)).grid
    a, kw = planner._resized(adapter, args, kwargs, 0.5)
    bound = adapter.bind(a, kw)
    assert adapter.layout(bound).grid == (1, round(h / 2), round(w / 2))  # the grid read back from the new img_ids
    with torch.no_grad():
        out = denoiser(*a, **kw)[0]
    assert out.shape[1] == round(h / 2) * round(w / 2)
