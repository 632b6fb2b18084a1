"""One rank of the context-parallel test (tests/parallel/test_context_parallel.py launches 2 with torchrun, gloo).

Every rank runs every case and writes what it saw to `<out>/rank<r>.json`; the test compares the ranks with each
other and with the single-process run each rank also makes (the tiny model is cheap: one launch for all cases).
"""

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

import fastdiff
from fastdiff import parallel
from fastdiff.eval import tiny
from fastdiff.mechanisms.caching import cache as cache_module
from fastdiff.mechanisms.caching import policies

STEPS = 8
CASES = {  # every cache policy and guidance skipping; thresholds where the tiny Flux takes both decisions
    "static": {"cache": {"policy": "static", "interval": 2}},
    "delta": {"cache": {"policy": "delta", "interval": 2}},
    "residual": {"cache": {"policy": "residual", "head": 1, "threshold": 0.3}},
    "residual-taylor": {"cache": {"policy": "residual", "head": 1, "threshold": 0.3, "estimator": "taylor"}},
    "easycache": {"cache": {"policy": "easycache", "threshold": 0.1}},
    "guidance-step": {"guidance": {"mode": "step", "start": 0.5}},
    "guidance-converged": {"guidance": {"mode": "converged", "start": 0.25, "threshold": 0.9}},
    "cache+guidance": {"cache": {"policy": "residual", "head": 1, "threshold": 0.3},
                       "guidance": {"mode": "converged", "start": 0.25, "threshold": 0.9}},
}
WAN_CASES = {  # Wan's plan splits the hidden states at blocks.0: the cache starts after it (head=1)
    "static": {"cache": {"policy": "static", "head": 1}},
    "easycache": {"cache": {"policy": "easycache", "head": 1, "threshold": 0.1}},
    "guidance-converged": {"guidance": {"mode": "converged", "start": 0.25, "threshold": 0.9}},
}
CP = dict(ulysses_degree=2)


def kwargs(seed=0, family="flux"):
    return tiny.pipeline_kwargs(family, cfg=True, steps=STEPS, seed=seed)


def run(pipe, config=None, seed=0, family="flux"):
    """(output, per-call decisions, summary dict) of one sampling run, with `config` applied (None: bare)."""
    if config is None:
        return tiny.output_tensor(pipe(**kwargs(seed, family))), [], {}
    with fastdiff.accelerated(pipe, config) as handle:
        out = tiny.output_tensor(pipe(**kwargs(seed, family)))
        s = handle.summary()
    decisions = [d for row in s.per_step for d in row.decisions]
    info = {"ranks": s.ranks, "flops": s.flops, "dense_flops": s.dense_flops, "flops_per_rank": s.flops_per_rank,
            "image_tokens": s.per_step[0].image_tokens, "text": str(s)}
    return out, decisions, info


def error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and the message
        return [type(e).__name__, str(e)]
    return None


def main(out_dir: Path) -> None:
    # Test-only shim (in the worker processes only): diffusers' `_resolve_parallel_config` picks the device as
    # `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only machine; with 1 every rank runs on "cpu".
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a deadlock (divergent skips) fails, not hangs
    rank = dist.get_rank()
    torch.set_num_threads(1)
    res: dict = {"rank": rank, "cases": {}}

    single = tiny.build_pipeline("flux")  # never parallel: the 1-rank reference
    par = tiny.build_pipeline("flux")
    bare_single = run(single)[0]
    par.transformer.enable_parallelism(config=ContextParallelConfig(**CP))  # order 1: parallelism, then apply
    bare_par = run(par)[0]
    res["bare_max_diff"] = (bare_par - bare_single).abs().max().item()
    for name, config in CASES.items():
        one, one_dec, _ = run(single, config)
        two, two_dec, info = run(par, config)
        res["cases"][name] = {"max_diff": (two - one).abs().max().item(), "scale": one.abs().max().item(),
                              "one": one_dec, "two": two_dec, "summary": info}
    # remove() leaves the parallel model exactly as parallel-only
    res["after_remove_equal"] = torch.equal(run(par)[0], bare_par)
    res["refused_at_apply"] = {
        name: error_of(lambda c=c: fastdiff.apply(par, c))
        for name, c in {"merge": {"merge": {"ratio": 0.5}}, "sparse-window": {"sparse": {"pattern": "window"}},
                        "sparse-topk": {"sparse": {"pattern": "topk"}}}.items()}
    res["untouched_after_refusal"] = fastdiff.session_of(par) is None and torch.equal(run(par)[0], bare_par)

    # order 2: apply, then parallelism (on a fresh model: diffusers enables parallelism once per model)
    late = tiny.build_pipeline("flux")
    config = CASES["cache+guidance"]
    one, one_dec, _ = run(single, config)
    handle = fastdiff.apply(late, config)
    late.transformer.enable_parallelism(config=ContextParallelConfig(**CP))
    two = tiny.output_tensor(late(**kwargs()))
    s = handle.summary()
    res["late"] = {"max_diff": (two - one).abs().max().item(), "one": one_dec,
                   "two": [d for row in s.per_step for d in row.decisions],
                   "ranks": s.ranks, "flops_per_rank": s.flops_per_rank, "flops": s.flops}
    res["late"]["remove_error"] = error_of(handle.remove)
    if res["late"]["remove_error"] is None:
        res["late"]["after_remove_equal"] = torch.equal(run(late)[0], bare_par)

    # a per-token mechanism applied before parallelism is refused at its first call, before anything runs
    late_merge = tiny.build_pipeline("flux")
    merge = fastdiff.apply(late_merge, {"merge": {"ratio": 0.5}})
    late_merge.transformer.enable_parallelism(config=ContextParallelConfig(**CP))
    res["late_merge_error"] = error_of(lambda: late_merge(**kwargs()))
    res["late_merge_records"] = len(merge.records)

    # Wan: its plan splits at blocks.0, inside the chain; a cache that would wrap that block is refused
    single, par = tiny.build_pipeline("wan"), tiny.build_pipeline("wan")
    par.transformer.enable_parallelism(config=ContextParallelConfig(**CP))
    res["wan"] = {"bare_max_diff": (run(par, family="wan")[0] - run(single, family="wan")[0]).abs().max().item()}
    for name, config in WAN_CASES.items():
        one, one_dec, _ = run(single, config, family="wan")
        two, two_dec, _ = run(par, config, family="wan")
        res["wan"][name] = {"max_diff": (two - one).abs().max().item(), "one": one_dec, "two": two_dec}
    res["wan"]["residual_error"] = error_of(lambda: fastdiff.apply(par, {"cache": {"policy": "residual", "head": 1}}))

    # Without the reduction, ranks whose shards differ decide differently (the reason for the reduction). Shown on
    # models that run whole, each rank on its own content, with the cache told that the world is its group — a
    # divergent skip on the real parallel model would deadlock its attention collectives instead.
    world = parallel.Shards(dist.group.WORLD, dist.get_world_size(), rank)
    cache_module.shards_of = lambda denoiser: world
    single = tiny.build_pipeline("flux")
    for name in ("residual", "easycache"):
        _, reduced, _ = run(single, CASES[name], seed=rank)
        policies.reduce_sum = lambda stats, shards: stats  # the reduction disabled
        _, local, _ = run(single, CASES[name], seed=rank)
        policies.reduce_sum = parallel.reduce_sum
        res.setdefault("divergence", {})[name] = {"reduced": reduced, "local": local}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        raise
