"""When a cached span is reused: the decision of one denoiser call, made once per call at the span's start.

A policy sees the call's StepContext, its own per-call state and a signal tensor (the span's input,
or the first blocks' residual) and answers compute or reuse. Gates every policy shares — warm-up,
cool-down, `max_skip`, nothing cached yet — are applied by the mechanism before a policy is asked.

Batch rule (documented, never mixes samples): a decision holds for the whole call. Signals are measured
per batch row and the most-changed row decides, so a call reuses only when every row would.
Each decision costs one host sync per call (never per block).

Under context parallelism (`fastdiff.parallel`) the signal is a shard of the tokens on each rank: its statistics
are summed over the ranks before the ratio is taken (`shards` in PolicyState, set per call), so every rank measures
what one process would and takes the same decision — one small all-reduce per measurement, never per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...parallel import Shards, reduce_sum


def row_rel_change(new: torch.Tensor, old: torch.Tensor, shards: Shards | None = None) -> float:
    """max over batch rows of mean|new - old| / mean|old| (relative L1 change), over all shards' tokens."""
    new, old = new.flatten(1).float(), old.flatten(1).float()
    num = (new - old).abs().mean(dim=1)
    den = old.abs().mean(dim=1)
    if shards is not None:  # the means' sums over the ranks, weighted by their (possibly uneven) sizes
        num, den = reduce_sum(torch.stack([num, den]) * new.shape[1], shards)
    return float((num / den.clamp_min(1e-12)).max())


def row_norm_ratio(num: torch.Tensor, den: torch.Tensor, shards: Shards | None = None) -> torch.Tensor:
    """per-row ||num|| / ||den|| as a tensor (no host sync without shards), over all shards' tokens."""
    if shards is None:
        return num.flatten(1).float().norm(dim=1) / den.flatten(1).float().norm(dim=1).clamp_min(1e-12)
    sq = reduce_sum(torch.stack([num.flatten(1).float().square().sum(1), den.flatten(1).float().square().sum(1)]),
                    shards)
    return sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-12)


@dataclass
class PolicyState:
    """What a policy remembers between the calls of one call slot."""

    acc: float = 0.0  # accumulated (estimated) change since the last computed step
    signal: torch.Tensor | None = None  # residual policy: last step's first-blocks residual
    x_step: torch.Tensor | None = None  # easycache: last step's span input
    x_comp: torch.Tensor | None = None  # easycache: span input at the last computed step
    v_comp: torch.Tensor | None = None  # easycache: span output at the last computed step
    rate: torch.Tensor | None = None  # easycache: per-row transformation rate
    shards: Shards | None = None  # the context-parallel group of this call's denoiser (None: it runs whole)
    extra: dict = field(default_factory=dict)

    def tensors(self):
        return [t for t in (self.signal, self.x_step, self.x_comp, self.v_comp) if t is not None]


class Policy:
    adaptive = False  # decides from signals measured during the run (else from the step index alone)
    needs_head_input = False  # whether the signal needs the input of block 0

    def __init__(self, config):
        self.config = config

    def span(self, step: int, num_steps: int | None, lo: int, hi: int) -> tuple[int, int]:
        """The cacheable span [start, end) this step, inside the blocks [lo, hi) that may be cached."""
        return lo, hi

    def decide(self, st: PolicyState, step: int, since: int, signal: torch.Tensor) -> bool:
        """True to reuse. `since`: steps since the span was last computed."""
        raise NotImplementedError

    def observe(self, st: PolicyState, step: int, signal: torch.Tensor) -> None:
        """Called every step, before decide, whatever the gates said."""

    def computed(self, st: PolicyState, span_in: torch.Tensor, span_out: torch.Tensor) -> None:
        """Called after the span was computed."""


class Static(Policy):
    """FORA / DeepCache: compute every `interval`-th step after warm-up."""

    def decide(self, st, step, since, signal):
        return (step - self.config.warmup) % self.config.interval != 0


class Delta(Policy):
    """Δ-DiT: the rear blocks are cached in the early stage (they hold detail, which is not decided yet),
    the front blocks in the late stage (they hold the layout, which is settled)."""

    def span(self, step, num_steps, lo, hi):
        n = max(1, round((hi - lo) * self.config.stage_blocks))
        early = num_steps is None or step < round(self.config.boundary * num_steps)
        return (hi - n, hi) if early else (lo, lo + n)

    def decide(self, st, step, since, signal):
        return since < self.config.interval


class Residual(Policy):
    """First-block cache with TeaCache-style accumulation: the signal is the residual of the always-computed
    first blocks; its relative change between consecutive steps (optionally rescaled by a fitted polynomial)
    is accumulated since the last computed step, and the span is reused while the sum stays below threshold."""

    adaptive = True
    needs_head_input = True

    def observe(self, st, step, signal):
        if st.signal is not None and st.signal.shape == signal.shape:
            rel = row_rel_change(signal, st.signal, st.shards)
            if self.config.rescale:
                rel = max(0.0, _polyval(self.config.rescale, rel))
            st.extra["rel"] = rel
        else:
            st.extra["rel"] = None
        st.signal = signal

    def decide(self, st, step, since, signal):
        rel = st.extra.get("rel")
        if rel is None:
            return False
        st.acc += rel
        return st.acc < self.config.threshold

    def computed(self, st, span_in, span_out):
        st.acc = 0.0


class EasyCache(Policy):
    """EasyCache: the transformation rate k = ||Δv|| / ||Δx|| between the last two computed steps (output
    change per input change of the span) is stable over a run, so the output change of a skipped step is
    predicted as k ||x_t - x_{t-1}|| / ||v||, accumulated since the last computed step; reuse while the
    prediction stays below threshold. No offline profiling; the first steps measure k."""

    adaptive = True

    def observe(self, st, step, signal):
        if st.rate is not None and st.x_step is not None and st.x_step.shape == signal.shape:
            eps = st.rate * row_norm_ratio(signal - st.x_step, st.v_comp, st.shards)
            st.extra["eps"] = eps
        else:
            st.extra["eps"] = None
        st.x_step = signal

    def decide(self, st, step, since, signal):
        eps = st.extra.get("eps")
        if eps is None:
            return False
        st.acc += float(eps.max())
        return st.acc < self.config.threshold

    def computed(self, st, span_in, span_out):
        st.acc = 0.0
        if st.x_comp is not None and st.x_comp.shape == span_in.shape:
            st.rate = row_norm_ratio(span_out - st.v_comp, span_in - st.x_comp, st.shards)
        st.x_comp, st.v_comp = span_in, span_out


def _polyval(coeffs, x: float) -> float:
    out = 0.0
    for c in coeffs:
        out = out * x + c
    return out


POLICIES = {"static": Static, "delta": Delta, "residual": Residual, "easycache": EasyCache}
