"""fastdiff under diffusers' context parallelism (Ulysses, degree 2) on 2 gloo CPU processes launched with torchrun.

One launch of `cp_worker.py` runs every case on both ranks (tiny Flux, 8 steps, true CFG); each test reads what the
ranks wrote. Verified on CPU only (no multi-GPU machine is lent to this project).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .cp_worker import CASES, WAN_CASES

WORKER = Path(__file__).with_name("cp_worker.py")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a free rendezvous port: torchrun's fixed default collides with any other torchrun on the machine
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--master_port={_free_port()}", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=WORKER.parents[2])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_bare_context_parallel_matches_one_process(ranks):
    for r in ranks:
        assert r["bare_max_diff"] < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_decide_alike_and_match_one_process(ranks, case):
    a, b = (r["cases"][case] for r in ranks)
    assert a["two"] == b["two"], "the ranks took different decisions"
    assert a["two"] == a["one"], "2-rank decisions differ from the 1-process run"
    acted = {d.split("=")[1] for call in a["two"] for d in call.split(",") if d}
    assert acted & {"reuse", "forecast", "skip-uncond"} and (
        "compute" in acted or case.startswith("guidance")), f"{case} never acted: {acted}"  # the case can fail
    for r in (a, b):
        assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r["max_diff"]


@pytest.mark.parametrize("case", list(WAN_CASES))
def test_wan_two_ranks_decide_alike_and_match_one_process(ranks, case):
    a, b = (r["wan"][case] for r in ranks)
    assert a["two"] == b["two"] == a["one"]
    assert any(d.endswith(("reuse", "skip-uncond")) for call in a["two"] for d in call.split(","))
    for r in (a, b):
        assert r["max_diff"] <= 1e-5


def test_wan_cache_over_the_split_block_is_refused(ranks):
    for r in ranks:
        assert r["wan"]["bare_max_diff"] <= 1e-5
        err = r["wan"]["residual_error"]
        assert err[0] == "UnsupportedModelError" and "blocks.0" in err[1] and "context-parallel plan" in err[1]


def test_summary_reports_ranks_and_per_rank_flops(ranks):
    for r in ranks:
        s = r["cases"]["residual"]["summary"]
        assert s["ranks"] == 2 and s["image_tokens"] == 16  # the whole sequence, priced once
        assert s["flops_per_rank"] == s["flops"] / 2 and s["flops"] < s["dense_flops"]
        assert "context parallel over 2 ranks" in s["text"]
    assert ranks[0]["cases"]["residual"]["summary"]["flops"] == ranks[1]["cases"]["residual"]["summary"]["flops"]


def test_remove_leaves_the_parallel_model_exactly_parallel_only(ranks):
    for r in ranks:
        assert r["after_remove_equal"] is True


def test_per_token_mechanisms_are_refused_at_apply(ranks):
    for r in ranks:
        for name, err in r["refused_at_apply"].items():
            assert err is not None and err[0] == "UnsupportedModelError", name
            assert "context parallelism" in err[1] and ("merging" if name == "merge" else "sparse") in err[1]
        assert r["untouched_after_refusal"] is True


def test_parallelism_enabled_after_apply(ranks):
    for r in ranks:
        late = r["late"]
        assert late["two"] == late["one"] and late["max_diff"] <= 1e-5
        assert late["ranks"] == 2 and late["flops"] is None  # the clock saw a shard: not priced, not mispriced
        err = r["late_merge_error"]  # a per-token mechanism is refused at its first call, before it runs
        assert err[0] == "FastDiffError" and "token merging" in err[1] and "after fastdiff.apply" in err[1]
        assert r["late_merge_records"] == 0
    assert ranks[0]["late"]["two"] == ranks[1]["late"]["two"]


def test_remove_after_late_parallelism_is_parallel_only(ranks):
    for r in ranks:
        assert r["late"]["remove_error"] is None and r["late"]["after_remove_equal"] is True


def test_without_the_reduction_ranks_with_different_shards_diverge(ranks):
    a, b = (r["divergence"]["residual"] for r in ranks)
    assert a["reduced"] == b["reduced"]  # one statistic over both ranks' tokens: one decision
    assert a["local"] != b["local"]  # each rank's own tokens: the decisions differ (a deadlock under parallelism)
    for name in ("residual", "easycache"):
        a, b = (r["divergence"][name] for r in ranks)
        assert a["reduced"] == b["reduced"], name
