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
    stamp = (tmp_path / "cache-safe.json").stat().st_mtime_ns
    _run_cli(tmp_path, model=model)  # resumed: the finished config is kept, not recomputed
    assert (tmp_path / "cache-safe.json").stat().st_mtime_ns == stamp


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
    assert torch.equal(torch.load(one / "baseline.pt"), torch.load(two / "baseline.pt"))
    a, b = (json.loads((d / "cache-safe.json").read_text()) for d in (one, two))
    assert b["processes"] == 2 and a["processes"] == 1
    for key in ("psnr", "ssim", "flops_speedup", "samples"):
        assert a[key] == b[key], key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
