"""fastdiff under diffusers' context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(...))`).

Under context parallelism each rank's blocks see a shard of the token sequence (Ulysses or ring attention gathers
what attention needs). A decision computed from activations would then differ between ranks, and a rank that skips
a span while another computes it deadlocks the attention collectives (or mixes stale and fresh shards). So every
activation-derived decision sums its statistics over the context-parallel group first — one small all-reduce per
measurement (a few numbers per batch row; EasyCache measures twice on a computed step), never per block — and all
ranks decide on the same numbers, the ones a single process would see.
Static schedules (step-indexed) need no communication. Per-token mechanisms (merging, sparse attention) are
refused: their matchings and patterns are computed per shard and were never made consistent with the gathered
attention.

Detection reads what diffusers records on the model (`_parallel_config.context_parallel_config`, set by
`enable_parallelism` / `_resolve_parallel_config`), at apply and again at every call, since parallelism may be
enabled after apply. Tensor parallelism is not context parallelism: activations stay whole on every rank, so it
needs none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import FastDiffError, UnsupportedModelError

_SPLIT = "cp_input---{}"  # diffusers' name of the hook splitting a module's inputs (hooks/context_parallel.py)


@dataclass(frozen=True)
class Shards:
    """The context-parallel group a denoiser's tokens are sharded over."""

    group: Any  # torch.distributed ProcessGroup of the flattened (ring x ulysses) mesh
    degree: int  # ranks the sequence is split over (ring_degree x ulysses_degree)
    rank: int  # this process's global rank


def shards_of(denoiser: torch.nn.Module) -> Shards | None:
    """The denoiser's context-parallel group, or None when it runs whole (no parallelism, or tensor parallelism)."""
    config = getattr(denoiser, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        return None
    return Shards(mesh.get_group(), int(cp.ring_degree) * int(cp.ulysses_degree), int(cp._rank))


def sees_shards(denoiser: torch.nn.Module) -> bool:
    """Whether fastdiff's wrapper of the denoiser sits under diffusers' context-parallel split of its inputs (as
    when `enable_parallelism` came after `fastdiff.apply`): its step clock then sees one rank's shard of the tokens.
    Reads diffusers' HookRegistry (0.42): the split hook's forward chain, innermost first."""
    registry = denoiser.__dict__.get("_diffusers_hook")
    order = getattr(registry, "_hook_order", [])
    split = _SPLIT.format("")
    if split not in order:
        return False
    refs = registry._fn_refs[: order.index(split) + 1]
    return any(hasattr(f, "__fastdiff_hook__") for r in refs for f in (r.forward, r.original_forward))


def plan_conflicts(denoiser: torch.nn.Module, paths: list[str]) -> list[str]:
    """The module paths among `paths` where the denoiser's context-parallel plan splits or gathers tensors."""
    if shards_of(denoiser) is None:
        return []
    plan = getattr(denoiser, "_cp_plan", None) or {}
    return [p for p in paths if p in plan]


def reduce_sum(stats: torch.Tensor, shards: Shards | None) -> torch.Tensor:
    """`stats` summed over the ranks of `shards` (one all-reduce); `stats` itself when there is no group."""
    if shards is None:
        return stats
    total = stats.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=shards.group)
    return total


def agree(flag: bool, shards: Shards | None, *, device: Any = "cpu") -> bool:
    """True only if `flag` is True on every rank of `shards` (one all-reduce of one number)."""
    if shards is None:
        return flag
    votes = reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device), shards)
    return bool(votes[0] == shards.degree)  # the sum of 0/1 votes is the degree exactly when all are 1


def refuse(denoiser: torch.nn.Module, mechanism: str, *, at_call: bool = False) -> None:
    """Raise if `denoiser` runs under context parallelism: `mechanism` computes per token, on a shard."""
    shards = shards_of(denoiser)
    if shards is None:
        return
    model = type(denoiser).__name__
    what = (f"{model} runs under diffusers' context parallelism ({shards.degree} ranks each hold a shard of the "
            f"tokens), and fastdiff's {mechanism} decides per token on the local shard, which no longer matches "
            "the gathered attention: it is not supported under context parallelism. Supported there: the cache "
            "(every policy; decisions are reduced over the ranks) and guidance skipping.")
    if at_call:
        raise FastDiffError(what + " enable_parallelism was called after fastdiff.apply: call fastdiff.remove(pipe) "
                                   "and apply a config without it.")
    raise UnsupportedModelError(what + " Drop that section of the config.")


PER_TOKEN = {"merge": "token merging (the 'merge' section)", "sparse": "sparse attention (the 'sparse' section)"}


def check_call(denoiser: torch.nn.Module, mechanisms: list) -> None:
    """At each call, before anything runs: refuse what apply would have refused, if parallelism came after it."""
    if shards_of(denoiser) is None:  # the common case: a few attribute reads per call
        return
    for mechanism in mechanisms:
        if mechanism.name in PER_TOKEN:
            refuse(denoiser, PER_TOKEN[mechanism.name], at_call=True)
        if mechanism.name == "cache":
            refuse_plan(denoiser, mechanism.hooked_paths(), at_call=True)


def refuse_plan(denoiser: torch.nn.Module, paths: list[str], *, at_call: bool = False) -> None:
    """Raise if the context-parallel plan splits or gathers at a block the cache wraps (e.g. Wan's `blocks.0`):
    the cache's wrapper and the block would see different tokens (the whole sequence and a shard)."""
    conflicts = plan_conflicts(denoiser, paths)
    if not conflicts:
        return
    what = (f"{type(denoiser).__name__}: its context-parallel plan splits or gathers tensors at {conflicts}, blocks "
            "the cache wraps, so the cache would compare whole and sharded activations: the cache is not supported "
            "on this model under context parallelism (supported: models whose plan splits at the model's inputs, "
            "e.g. FluxTransformer2DModel).")
    if at_call:
        raise FastDiffError(what + " enable_parallelism was called after fastdiff.apply: call fastdiff.remove(pipe).")
    raise UnsupportedModelError(what)
