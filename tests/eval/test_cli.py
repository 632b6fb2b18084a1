"""The evaluation tool: metric code against known values, the CLI end to end on a tiny model and on the trained
ref-unet, resumable sweeps, and a 2-process run (torchrun, gloo on CPU) that gathers exactly the single-process
numbers."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdiff.eval import cli, metrics


def test_psnr_of_a_known_noise_level_and_identity():
    ref = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = ref + 0.1 * torch.where(torch.rand_like(ref) < 0.5, -1.0, 1.0)  # |error| = 0.1 everywhere: MSE 0.01
    assert metrics.psnr(noisy, ref) == pytest.approx(20.0, abs=1e-5)
    assert metrics.psnr(ref, ref) == math.inf and metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim(noisy, ref) < 0.99


def test_frechet_distance_is_zero_on_itself_and_the_mean_shift_squared():
    a = torch.randn(400, 6, generator=torch.Generator().manual_seed(1))
    assert abs(metrics.frechet_distance(a, a)) < 1e-9
    assert metrics.frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-7)  # sqrtm by eigh: ~1e-9


def _run_cli(out, *extra, model="dit"):
    cli.main(["--model", model, "--preset", "cache-safe", "--samples", "4", "--batch-size", "2", "--steps", "4",
              "--threads", "1", "--out", str(out), *extra])


@pytest.mark.parametrize("model", ["dit", "ref-unet"])  # random-weight tiny DiT; the trained reference UNet
def test_cli_writes_results_and_resumes(tmp_path, model):
    _run_cli(tmp_path, model=model)
    for name in ("baseline.json", "cache-safe.json", "results.csv", "results.json", "pareto.png", "cache-safe.png"):
        assert (tmp_path / name).exists(), name
    row = json.loads((tmp_path / "cache-safe.json").read_text())
    base = json.loads((tmp_path / "baseline.json").read_text())
    assert row["samples"] == 4 and row["flops_speedup"] > 1 and row["psnr"] < math.inf
    assert base["psnr"] == math.inf
    if model == "dit":
        assert row["psnr"] > 30  # random weights: caching hardly changes anything
    else:  # a reference model: judged by its classifier, against held-out real digits and the baseline
        assert 0 <= row["class_accuracy"] <= 1 and row["fd_classifier_vs_baseline"] > 0
        # itself: zero up to the square root of a rank-3 covariance (4 samples, 128 features); real digits: far
        assert abs(base["fd_classifier_vs_baseline"]) < 1e-3 < base["fd_classifier_vs_real"]
    assert row["repeats"] == 3 and len(row["times_s"]) == 3 and row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    stamp = (tmp_path / "cache-safe.json").stat().st_mtime_ns
    _run_cli(tmp_path, model=model)  # resumed: the finished config is kept, not recomputed
    assert (tmp_path / "cache-safe.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["resumed"] is True


def test_two_processes_gather_the_single_process_numbers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run_cli(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--master_port={_free_port()}", "--nproc_per_node", "2",
           "-m", "fastdiff.eval.cli",
           "--model", "dit", "--preset", "cache-safe", "--samples", "4", "--batch-size", "2", "--steps", "4",
           "--threads", "1", "--out", str(two)]
    # a free rendezvous port: torchrun's fixed default collides with any other torchrun on the machine
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = (torch.load(d / "baseline.pt", weights_only=True) for d in (one, two))
    assert torch.equal(a, b)
    a, b = (json.loads((d / "cache-safe.json").read_text()) for d in (one, two))
    assert b["processes"] == 2 and a["processes"] == 1
    for key in ("psnr", "ssim", "flops_speedup", "samples"):
        assert a[key] == b[key], key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- hostile output folders (r12): links planted in --out, planted result files, formulas in CSV cells -------------


def _plant(out):
    out.mkdir()
    victim = out.parent / "victim.txt"
    victim.write_text("victim")
    return victim


@pytest.mark.parametrize("entry", ["results.csv", "baseline.pt", "cache-safe.json", "cache-safe.png", "pareto.png"])
def test_a_link_planted_in_out_is_refused_before_any_work(tmp_path, entry):
    out = tmp_path / "out"
    victim = _plant(out)
    (out / entry).symlink_to(victim)
    (out / "created.bin").symlink_to(tmp_path / "created-outside.bin")  # not an entry the CLI uses: left alone
    with pytest.raises(SystemExit, match="symbolic link"):
        _run_cli(out)
    assert victim.read_text() == "victim" and not (tmp_path / "created-outside.bin").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([entry, "created.bin"])  # nothing written


def test_out_itself_a_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with pytest.raises(SystemExit, match="symbolic link"):
        _run_cli(tmp_path / "out")
    assert list((tmp_path / "real").iterdir()) == []


def test_a_hard_link_is_replaced_not_written_through(tmp_path):
    out = tmp_path / "out"
    victim = _plant(out)
    os.link(victim, out / "baseline.pt")
    _run_cli(out)
    assert victim.read_text() == "victim"
    assert torch.load(out / "baseline.pt", weights_only=True).shape[0] == 4


PLANTED = {"name": "cache-safe", "time_s": 1.0, "denoiser_s": 1.0, "psnr": 99, "speedup": 50,
           '=HYPERLINK("http://x")': "y"}


def test_a_planted_result_file_is_refused_not_trusted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cache-safe.json").write_text(json.dumps(PLANTED))
    with pytest.raises(SystemExit, match="cache-safe.json is not a fastdiff-eval result.*unknown keys"):
        _run_cli(out)
    assert not (out / "results.csv").exists()
    _run_cli(out, "--force")  # --force recomputes it
    row = json.loads((out / "cache-safe.json").read_text())
    assert row["speedup"] != 50 and '=HYPERLINK("http://x")' not in row


def test_a_result_file_of_another_config_or_with_bad_types_is_refused(tmp_path):
    _run_cli(tmp_path)
    good = json.loads((tmp_path / "cache-safe.json").read_text())
    for bad, why in [({**good, "config": {**good["config"], "cache": None}}, "its config is not this config"),
                     ({**good, "speedup": "=1+1"}, "speedup: str"), ({**good, "samples": True}, "samples: bool"),
                     ({k: v for k, v in good.items() if k != "psnr"}, "missing keys"), ([good], "not a JSON object")]:
        (tmp_path / "cache-safe.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=why):
            _run_cli(tmp_path)


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(tmp_path):
    from types import SimpleNamespace

    from fastdiff.eval.outdir import OutDir, csv_cell

    assert [csv_cell(v) for v in ("=cmd|x", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "ok", -2.5, 3)] == [
        "'=cmd|x", "'+1", "'-2", "'@SUM(A1)", "'\tx", "'\rx", "ok", -2.5, 3]
    row = {"name": "=HYPERLINK(1)", "time_s": 1.0, "speedup": 1.0, "psnr": 30.0, "reliable": True,
           "timing_note": "-spread", "evil=1": "x"}
    cli.write_tables([row, row], OutDir(tmp_path), SimpleNamespace(describe="d", name="m", trained=True))
    text = (tmp_path / "results.csv").read_text()
    header, line = text.splitlines()[:2]
    assert header.split(",") == cli.COLUMNS  # fixed columns: a row's keys never become columns
    assert line.startswith("'=HYPERLINK(1),") and ",'-spread," in line and "evil" not in text


def test_the_table_flags_an_injected_time_above_the_flops_bound(tmp_path, monkeypatch):
    """A fake clock makes the baseline 10x slower than cache-safe (FLOPs bound ~1.6x): the row is flagged."""
    from fastdiff.eval import timing

    real = timing.interleaved

    def fake(arms, repeats, **kw):
        state = {"name": None, "start": True, "now": 0.0}

        def on_call(phase, name):
            state["name"] = name

        def clock():
            if not state["start"]:
                state["now"] += 10.0 if state["name"] == "baseline" else 1.0
            state["start"] = not state["start"]
            return state["now"]

        return real(arms, repeats, clock=clock, on_call=on_call, **kw)

    monkeypatch.setattr(timing, "interleaved", fake)
    _run_cli(tmp_path)
    row = json.loads((tmp_path / "cache-safe.json").read_text())
    assert row["speedup"] == pytest.approx(10.0) and row["flops_speedup"] < 10
    assert row["reliable"] is False and "above the FLOPs bound" in row["timing_note"]
    assert json.loads((tmp_path / "baseline.json").read_text())["reliable"] is True
    import csv

    with open(tmp_path / "results.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["cache-safe"]["reliable"] == "False" and "above the FLOPs bound" in rows["cache-safe"]["timing_note"]


def test_every_torch_load_in_the_project_is_weights_only():
    """r19: torch < 2.6 defaults to weights_only=False (pyproject allows torch >= 2.4): a planted .pt would run code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    calls = []
    # every Python file of the checkout, wherever the tree puts it (hidden folders such as .venv left out)
    files = [p for p in root.rglob("*.py") if not any(part.startswith(".") or part.endswith(".egg-info")
                                                       for part in p.relative_to(root).parts)]
    assert any(p.parts[-2:] == ("fastdiff", "__init__.py") for p in files)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), [c for c, ok in calls if not ok]
