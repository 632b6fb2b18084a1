"""Peer caching methods, applied to the pipeline the benchmark runs fastdiff on, side by side.

    >>> remove = apply_peer(pipe, "diffusers-fbc", "fast", call_kwargs=kw)
    >>> out = pipe(**kw)
    >>> remove()                     # the pipeline computes exactly what it computed before

Peers are switched on the way their documentation says (``denoiser.enable_cache(config)`` for diffusers,
``cache_dit.enable_cache(pipe, ...)`` for cache-dit); we only pick their settings, tell them what they cannot see
(the run's step count, whether CFG runs as separate calls) and undo everything they leave behind
(``peer_backends.py``).  The levels were chosen by measuring what they skip on the tiny models
(``peer_survey.py``, results in ``eval/PEERS.md``): several defaults skip nothing on short runs.

``call_kwargs`` are the keyword arguments the pipeline is about to be called with.  MagCache needs them (it
calibrates its magnitude ratios with one full run of that call; generators are cloned, the caller's are not
advanced), FasterCache and cache-dit read the CFG layout and step count from them.

Threshold peers skip as much as their threshold lets them on *this* model, so a fixed level skips 0 % on one
family and 50 % on another.  ``apply_peer(..., target_skip=0.4)`` (or ``LEVEL_TARGETS[level]``) instead searches
the level's threshold until the run skips that fraction of block computations -- quality compared at equal compute.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import peer_backends as B
from .peer_backends import PeerError

__all__ = ["LEVELS", "LEVEL_TARGETS", "PEERS", "Peer", "PeerError", "Unsupported", "apply_peer", "available", "counting"]

LEVELS = ("safe", "fast", "ultra")
# fractions of block computations for target_skip: fastdiff's static cache (interval 2, first and last step computed)
# skips 0.4 at 10 steps; a two-block model tops out at 0.5 under first-block caches (the first block always runs)
LEVEL_TARGETS = {"safe": 0.25, "fast": 0.4, "ultra": 0.55}


class Unsupported(str):
    """Why a peer cannot run on a pipeline: falsy, so ``if peer.supports(pipe):`` reads right, and prints as the reason."""

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Peer:
    name: str
    source: str  # "diffusers 0.42.1", "cache-dit 1.5.3"
    levels: dict[str, dict]  # LEVELS -> keyword arguments of the peer's own config
    knobs: str  # what the level keys mean
    install: Callable = field(repr=False)  # (pipe, kwargs, call_kwargs) -> the peer's disable function
    check: Callable = field(repr=False)  # pipe -> why it cannot run here, or None
    unavailable: str | None = None  # why the peer cannot be imported here
    needs_call_kwargs: bool = False
    threshold: str | None = None  # the knob target_skip searches; None: the levels are fixed schedules

    def supports(self, pipe) -> bool | Unsupported:
        if self.unavailable:
            return Unsupported(self.unavailable)
        reason = self.check(pipe)
        return Unsupported(reason) if reason else True


def _peers() -> dict[str, Peer]:
    diffusers = dict(source=B.DIFFUSERS, unavailable=B.DIFFUSERS_MISSING)
    cd_source, cd_missing = B.cache_dit_status()
    # Fn=1, Bn=0: the tiny models have 2-4 blocks; cache-dit's default Fn=8 refuses them (Fn must be < #blocks)
    db = dict(Fn_compute_blocks=1, Bn_compute_blocks=0)
    dbcache = {
        "safe": dict(db, residual_diff_threshold=0.3, max_warmup_steps=2, max_continuous_cached_steps=2),
        "fast": dict(db, residual_diff_threshold=0.4, max_warmup_steps=1, max_continuous_cached_steps=3),
        "ultra": dict(db, residual_diff_threshold=0.6, max_warmup_steps=1, max_continuous_cached_steps=-1),
    }
    dbcache_knobs = (
        "Fn/Bn_compute_blocks: first/last blocks always computed; residual_diff_threshold: relative L1 change of the "
        "Fn output residual below which the middle blocks are reused; max_warmup_steps: leading steps always "
        "computed; max_continuous_cached_steps: consecutive reuses (-1: unbounded)"
    )
    cache_dit = dict(
        unavailable=cd_missing, check=B.check_cache_dit, needs_call_kwargs=True, threshold="residual_diff_threshold"
    )
    peers = [
        Peer(
            "diffusers-fbc",
            levels={"safe": dict(threshold=0.3), "fast": dict(threshold=0.4), "ultra": dict(threshold=0.6)},
            knobs="threshold: all blocks after the first are reused while the first block's residual changed less "
            "than this (relative L1) since the last full step",
            install=B.install_fbc,
            check=B.check_registered_blocks,
            threshold="threshold",
            **diffusers,
        ),
        Peer(
            "diffusers-magcache",
            levels={
                "safe": dict(threshold=0.02, max_skip_steps=2, retention_ratio=0.2),
                "fast": dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2),  # diffusers' defaults
                "ultra": dict(threshold=0.15, max_skip_steps=4, retention_ratio=0.1),
            },
            knobs="threshold: budget for the accumulated |1 - magnitude ratio| while reusing the residual; "
            "max_skip_steps: consecutive reuses (K); retention_ratio: leading fraction of steps always computed; "
            "mag_ratios: calibrated on the same pipeline and call",
            install=B.install_magcache,
            check=B.check_registered_blocks,
            needs_call_kwargs=True,
            threshold="threshold",
            **diffusers,
        ),
        Peer(
            "diffusers-taylorseer",
            levels={
                "safe": dict(blocks=True, cache_interval=2, disable_cache_before_step=2, max_order=1),
                "fast": dict(blocks=True, cache_interval=3, disable_cache_before_step=2, max_order=1),
                "ultra": dict(blocks=True, cache_interval=4, disable_cache_before_step=2, max_order=1),
            },
            knobs="cache_interval: one full step in N, the others forecast; disable_cache_before_step: warmup "
            "steps; max_order: Taylor order; blocks (ours): cache_identifiers = every transformer block",
            install=B.install_taylorseer,
            check=B.check_cache_mixin,
            **diffusers,
        ),
        Peer(
            "diffusers-pab",
            levels={
                "safe": dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800)),
                "fast": dict(
                    spatial_attention_block_skip_range=2,
                    cross_attention_block_skip_range=4,
                    spatial_attention_timestep_skip_range=(0, 950),
                    cross_attention_timestep_skip_range=(0, 950),
                ),
                "ultra": dict(
                    spatial_attention_block_skip_range=3,
                    cross_attention_block_skip_range=6,
                    spatial_attention_timestep_skip_range=(0, 1000),
                    cross_attention_timestep_skip_range=(0, 1000),
                ),
            },
            knobs="*_block_skip_range N: an attention output is computed on one call in N and broadcast to the "
            "others; *_timestep_skip_range (lo, hi): timesteps where reuse is allowed",
            install=B.install_pab,
            check=B.check_timestep,
            **diffusers,
        ),
        Peer(
            "diffusers-fastercache",
            levels={
                "safe": dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681)),
                "fast": dict(
                    spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=(-1, 901),
                    unconditional_batch_skip_range=3,
                    unconditional_batch_timestep_skip_range=(-1, 901),
                ),
                "ultra": dict(
                    spatial_attention_block_skip_range=3,
                    spatial_attention_timestep_skip_range=(-1, 951),
                    unconditional_batch_skip_range=5,
                    unconditional_batch_timestep_skip_range=(-1, 951),
                ),
            },
            knobs="spatial_attention_block_skip_range N: self-attention extrapolated from its last two outputs on "
            "N-1 calls in N; unconditional_batch_skip_range N: the uncond half computed every N-th step, "
            "approximated from cond in frequency space otherwise (batched CFG only); *_timestep_skip_range: where",
            install=B.install_fastercache,
            check=B.check_timestep,
            needs_call_kwargs=True,
            **diffusers,
        ),
        Peer(
            "diffusers-seacache",
            levels={
                "safe": dict(threshold=0.25, max_consecutive_cached=2),
                "fast": dict(threshold=0.5, max_consecutive_cached=2),
                "ultra": dict(threshold=1.0, max_consecutive_cached=3),
            },
            knobs="threshold: budget for the accumulated relative L1 change of its spectral indicator; "
            "max_consecutive_cached: consecutive reuses; retention_steps / cache_end_steps: steps always computed",
            install=B.install_seacache,
            check=B.check_seacache,
            threshold="threshold",
            **diffusers,
        ),
        Peer(
            "cache-dit-dbcache",
            source=cd_source,
            levels=dbcache,
            knobs=dbcache_knobs,
            install=B.install_cache_dit,
            **cache_dit,
        ),
        Peer(
            "cache-dit-dbcache-taylorseer",
            source=cd_source,
            levels=dbcache,
            knobs=dbcache_knobs + "; TaylorSeer (order 1) forecasts the reused residual instead of repeating it",
            install=functools.partial(B.install_cache_dit, taylorseer=True),
            **cache_dit,
        ),
    ]
    return {p.name: p for p in peers}


PEERS: dict[str, Peer] = _peers()


def available() -> list[str]:
    """The peers importable here (whether one runs on a given pipeline: ``PEERS[name].supports(pipe)``)."""
    return [name for name, peer in PEERS.items() if not peer.unavailable]


def _install(pipe, peer: Peer, kwargs: dict, call_kwargs: dict | None) -> Callable[[], None]:
    snap = B.Snapshot(pipe)
    try:
        disable = peer.install(pipe, copy.deepcopy(kwargs), call_kwargs)
    except BaseException:
        snap.restore()
        raise
    done = []

    def remove() -> None:
        if done:
            return
        done.append(True)
        try:
            disable()
        finally:
            snap.restore()

    return remove


def apply_peer(pipe, name: str, level: str, *, call_kwargs: dict | None = None, target_skip: float | None = None):
    """Apply peer ``name`` at ``level`` ("safe" / "fast" / "ultra") to ``pipe``; returns the remover.

    ``target_skip``: search the level's threshold so that the call in ``call_kwargs`` skips this fraction of block
    computations (threshold peers only; a few full runs, cached per pipeline and call).  The remover carries
    ``.kwargs`` (the peer config used) and ``.skip`` (the fraction the search measured, else None).

    Raises ``PeerError`` with the reason when the peer is not installed here or cannot run on this pipeline, before
    anything is touched; any failure while applying leaves the pipeline as it was.  The remover calls the peer's own
    disable function, then puts back every attribute the peer added or replaced; a second call does nothing."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; expected one of {sorted(PEERS)}")
    peer = PEERS[name]
    if level not in peer.levels:
        raise KeyError(f"unknown level {level!r}; expected one of {LEVELS}")
    ok = peer.supports(pipe)
    if not ok:
        raise PeerError(f"{name}: {ok}")
    kwargs, skip = dict(peer.levels[level]), None
    if target_skip is not None:
        if peer.threshold is None:
            raise PeerError(f"{name} has no threshold to search: its levels are fixed schedules")
        B.need_call_kwargs(name, call_kwargs)
        kwargs[peer.threshold], skip = _search(pipe, peer, level, float(target_skip), call_kwargs)
    remove = _install(pipe, peer, kwargs, call_kwargs)
    remove.kwargs, remove.skip = kwargs, skip
    return remove


# --------------------------------------------------------------------------------------
# Measuring what a peer skips, and matching a target
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def counting(den: torch.nn.Module):
    """Count executions while inside: ``{"calls": denoiser calls, "blocks": repeated blocks, "attn": attention modules}``.

    Counting ``forward``s are put on the block and attention instances *before* a peer is applied, so the peer's
    hooks wrap them and only computations that really run are counted.  Denoiser calls are counted by a torch
    pre-hook instead: peers replace the denoiser's ``forward`` itself (cache-dit's DiT and Flux forwards)."""
    from diffusers.hooks._common import _ATTENTION_CLASSES

    counts = {"calls": 0, "blocks": 0, "attn": 0}
    targets = [(b, "blocks") for b in B.blocks(den)]
    targets += [(m, "attn") for m in den.modules() if isinstance(m, _ATTENTION_CLASSES)]
    saved = [(m, m.__dict__.get("forward", B._MISSING)) for m, _ in targets]
    for m, kind in targets:
        inner = m.forward

        @functools.wraps(inner)  # keeps the signature: cache-dit checks a block's forward parameters
        def count(*args, _inner=inner, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _inner(*args, **kwargs)

        m.forward = count
    handle = den.register_forward_pre_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))
    try:
        yield counts
    finally:
        handle.remove()
        for m, fwd in saved:
            if fwd is B._MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd


def skipped_fraction(pipe, peer: Peer, kwargs: dict, call_kwargs: dict) -> float:
    """Fraction of block computations the peer with ``kwargs`` skips on one run of ``call_kwargs``."""
    den = B.denoiser(pipe)
    with counting(den) as counts:
        remove = _install(pipe, peer, kwargs, call_kwargs)
        counts.update(calls=0, blocks=0, attn=0)  # MagCache calibrates with a full run while installing
        try:
            with torch.no_grad():
                pipe(**B.cloned(call_kwargs))
        finally:
            remove()
    total = counts["calls"] * len(B.blocks(den))
    return 1.0 - counts["blocks"] / total if total else 0.0


_SEARCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> {key: (threshold, skip)}


def _search(pipe, peer: Peer, level: str, target: float, call_kwargs: dict, tol: float = 0.03, runs: int = 12):
    """Threshold giving ``target`` skipped fraction: bracket by factors of 4 from the level's value, then bisect in
    log space.  Skipping grows with the threshold (monotone up to ties); returns the closest (threshold, skip)
    seen, the smaller threshold on ties.  A target beyond what the peer can skip gets its maximum."""
    den = B.denoiser(pipe)
    key = (peer.name, level, target, B.call_key(call_kwargs))
    if key in _SEARCHED.get(den, {}):
        return _SEARCHED[den][key]
    base = dict(peer.levels[level])
    seen: dict[float, float] = {}

    def f(x: float) -> float:
        if x not in seen:
            seen[x] = skipped_fraction(pipe, peer, {**base, peer.threshold: x}, call_kwargs)
        return seen[x]

    lo = hi = float(base[peer.threshold])
    while len(seen) < runs and f(hi) < target - tol and hi < 1e3:
        lo, hi = hi, hi * 4
    while len(seen) < runs and f(lo) > target + tol and lo > 1e-5:
        lo, hi = lo / 4, lo
    while len(seen) < runs and lo < hi and abs(f(lo) - target) > tol and abs(f(hi) - target) > tol:
        mid = math.sqrt(lo * hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min(seen, key=lambda x: (abs(seen[x] - target), x))
    _SEARCHED.setdefault(den, {})[key] = (best, seen[best])
    return best, seen[best]
