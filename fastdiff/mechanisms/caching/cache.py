"""Step caching: a span of blocks is computed at some steps and stood in for at the others.

One mechanism, pluggable policies (when: `policies.py`) and estimators (what: `estimators.py`).
Per denoiser call slot (a separate CFG call has its own) and token grid the host keeps one `CacheState`:

- blocks before the span (`head`, Fn) and after it (`tail`, Bn) always run;
- at the span's first block the policy decides for this call (one host sync at most);
- transformer blocks ("residual" reuse) are stood in for as one span residual, output = span input +
  estimated (out − in) of the span, for the hidden and the encoder stream (DBCache/FORA/TaylorSeer);
- UNet blocks ("output" reuse) replay their own estimated outputs (DeepCache); the shallow blocks the
  family pins always run.

Decision and bookkeeping code is wrapped in `torch.compiler.disable`, so blocks compiled with
`torch.compile` (e.g. `transformer.compile_repeated_blocks()`) keep one graph and never guard on the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ... import parallel
from ...context import RunState
from ...errors import UnsupportedModelError
from ...hooks import Args
from ...parallel import shards_of
from ..base import Mechanism
from . import estimators
from .policies import POLICIES, PolicyState, row_rel_change

COMPUTE, REUSE, FORECAST = "compute", "reuse", "forecast"


@dataclass
class _Schedule:
    """What `estimate_cost` follows per call slot: the step each span was last computed, reuses since."""

    last: dict[tuple[int, int], int] = field(default_factory=dict)
    since: int = 0


@dataclass
class CacheState:
    """Cache state of one denoiser call slot (and token grid) for one run."""

    record: Any = None  # the CallRecord the per-call scratch below belongs to
    span: tuple[int, int] = (0, 0)
    mode: str = "residual"  # span_mode of `span`
    reuse: bool = False
    head_in: torch.Tensor | None = None
    span_in: torch.Tensor | None = None
    enc_in: torch.Tensor | None = None
    last_computed: dict[tuple[int, int], int] = field(default_factory=dict)  # span -> step
    consecutive: int = 0
    estimators: dict[tuple[int, int, int], estimators.Estimator] = field(default_factory=dict)
    shapes: dict[tuple[int, int, int], tuple] = field(default_factory=dict)
    n_outputs: dict[int, int | None] = field(default_factory=dict)  # block -> tuple length (None: tensor)
    encoder_none: dict[int, bool] = field(default_factory=dict)  # block -> returned None as encoder
    treespec: dict[int, Any] = field(default_factory=dict)  # block -> structure of its output (output reuse)
    policy: PolicyState = field(default_factory=PolicyState)

    def nbytes(self) -> int:
        held = sum(e.nbytes() for e in self.estimators.values())
        return held + sum(t.numel() * t.element_size() for t in self.policy.tensors())


class StepCache(Mechanism):
    name = "cache"

    def __init__(self, config):
        super().__init__(config)
        self.policy = POLICIES[config.policy](config)
        self.peak_bytes = 0
        self._run = None
        self.trace: list[tuple[float, float]] | None = None  # set by fastdiff.calibrate: (signal, output) changes

    # -- which blocks -------------------------------------------------------------------------------
    def cacheable_range(self, adapter) -> tuple[int, int]:
        """[lo, hi): the blocks a span may cover — not the `head`/`tail` ones, not the family's pinned ones."""
        n = len(adapter.blocks)
        pinned = adapter.spec.always_compute(adapter.blocks) if adapter.spec.always_compute else set()
        lo, hi = self.config.head, n - self.config.tail
        while lo < hi and lo in pinned:
            lo += 1
        while hi > lo and hi - 1 in pinned:
            hi -= 1
        return lo, hi

    def span_mode(self, adapter, span) -> str:
        blocks = adapter.blocks[span[0]: span[1]]
        return "residual" if all(b.reuse == "residual" for b in blocks) else "output"

    # -- Mechanism ----------------------------------------------------------------------------------
    def validate(self, adapter) -> None:
        c, model = self.config, type(adapter.denoiser).__name__
        lo, hi = self.cacheable_range(adapter)
        if hi <= lo:
            raise UnsupportedModelError(
                f"{model}: cache head={c.head} + tail={c.tail} (plus the blocks the '{adapter.name}' family always "
                f"computes) leave none of its {len(adapter.blocks)} blocks to cache")
        pinned = adapter.spec.always_compute(adapter.blocks) if adapter.spec.always_compute else set()
        if any(i in pinned for i in range(lo, hi)):
            raise UnsupportedModelError(f"{model}: the cached span would contain blocks the family always computes")
        if c.policy in ("delta", "easycache") and self.span_mode(adapter, (lo, hi)) != "residual":
            raise UnsupportedModelError(
                f"{model}: cache policy '{c.policy}' needs transformer blocks whose residual can be reused; "
                f"the '{adapter.name}' family's blocks are replayed as outputs (UNet). "
                "Use policy 'static' (DeepCache) or 'residual' for it.")
        first = 0 if self.policy.needs_head_input else lo
        parallel.refuse_plan(adapter.denoiser, [b.path for b in adapter.blocks[first: hi]])

    def hooked_paths(self) -> list[str]:
        """The paths of the blocks this cache wraps (attached)."""
        first = 0 if self.policy.needs_head_input else self.lo
        return [b.path for b in self.adapter.blocks[first: self.hi]]

    def estimate_cost(self, table):
        """Static and Δ-DiT schedules are known in advance: exact. Dynamic policies are bounded by their
        gates: this assumes a reuse wherever warm-up, cool-down and max_skip allow one (an upper bound on
        the speedup); `summary()` reports what a run actually did. Each row is decided from its own context, with
        the run's per-call state rule (`RunState`: one per call slot and grid; a stage on another grid starts
        afresh, so its first step computes)."""
        lo, hi = self.cacheable_range(table.model.adapter)
        c = self.config
        states = RunState()
        flops = []
        for row in table.rows:
            ctx = row.ctx
            states.enter_stage(ctx.run, ctx.stage, ctx.grid)
            st = states.get(self.name, ctx.call, ctx.grid, _Schedule)
            span = self.policy.span(ctx.step, ctx.num_steps, lo, hi)
            gate = ctx.step < c.warmup or (ctx.num_steps is not None and ctx.step >= ctx.num_steps - c.cooldown) \
                or span not in st.last or (c.max_skip and st.since >= c.max_skip)
            if self.policy.adaptive:
                reuse = not gate
            else:
                reuse = not gate and self.policy.decide(None, ctx.step, ctx.step - st.last.get(span, ctx.step), None)
            if reuse:
                st.since += 1
            else:
                st.last[span], st.since = ctx.step, 0
            flops.append([0.0 if reuse and span[0] <= b < span[1] else v for b, v in enumerate(row.flops)])
        return table.with_flops(flops)

    def attach(self, adapter, host):
        self.host = host
        self.adapter = adapter
        self.lo, self.hi = self.cacheable_range(adapter)
        first = 0 if self.policy.needs_head_input else self.lo
        for block in adapter.blocks[first: self.hi]:
            host.wrap(block.module, f"fastdiff.cache.{block.path}", self._wrapper(block))

    def new_state(self) -> CacheState:
        return CacheState()

    def detach(self) -> None:
        # summary() after remove() reports what was held at the end of the last run; the state itself (span
        # inputs, cached residuals) is per call in the host, which remove() drops: none stays on the handle.
        self._final = self.report([])
        super().detach()

    def report(self, records) -> dict:
        if self.host is None:  # detached
            return getattr(self, "_final", {})
        held = sum(s.nbytes() for s in self.host.states(self))
        return {"cache_bytes": held, "cache_peak_bytes": self.peak_bytes, "offload": self.config.offload}

    # -- the hook -----------------------------------------------------------------------------------
    def _wrapper(self, block):
        args_of = Args(block.module)

        def cached(call, inner, args, kwargs):
            replaced, out = self._before(call, block, args_of, args, kwargs)
            if replaced:
                return out
            out = inner(*args, **kwargs)
            self._after(call, block, out)
            return out

        return cached

    @torch.compiler.disable
    def _before(self, call, block, args_of, args, kwargs) -> tuple[bool, Any]:
        """Per-call bookkeeping; (True, stand-in output) when this block is not to run."""
        if call is None:  # called outside a denoiser call (e.g. by the user): nothing to decide
            return False, None
        rec, ctx = call.record, call.ctx
        st: CacheState = self.host.state(call, self)
        if st.record is not rec:  # first cached-or-head block of this call
            st.record, st.reuse, st.head_in, st.span_in, st.enc_in = rec, False, None, None, None
            st.span = self.policy.span(ctx.step, ctx.num_steps, self.lo, self.hi)
            st.mode = self.span_mode(self.adapter, st.span)
            if ctx.run != self._run:
                self._run, self.peak_bytes = ctx.run, 0
        s, e = st.span
        i = block.index
        if not s <= i < e:
            if i == 0 and s > 0:
                st.head_in = self._inputs(block, args_of, args, kwargs)[0]
            return False, None
        if i == s:
            st.span_in, st.enc_in = self._inputs(block, args_of, args, kwargs)
            st.reuse = self._decide(st, ctx, block)
            rec.decisions[self.name] = (FORECAST if self.config.estimator != "reuse" else REUSE) if st.reuse else COMPUTE
        if not st.reuse:
            return False, None
        if st.mode == "output":
            leaves = st.estimators[(s, e, i)].predict(ctx.step)
            return True, tree_unflatten(leaves, st.treespec[i])
        if i < e - 1:  # the span's inner blocks pass their input through
            return True, self._pack(block, st, *self._inputs(block, args_of, args, kwargs))
        dh, de = st.estimators[(s, e, -1)].predict(ctx.step)
        hidden = st.span_in + dh
        encoder = None if st.enc_in is None or de is None else st.enc_in + de
        return True, self._pack(block, st, hidden, encoder, last=True)

    @torch.compiler.disable
    def _after(self, call, block, out) -> None:
        # the calling thread's own call and state (never an attribute of this shared mechanism)
        if call is None:
            return
        ctx = call.ctx
        st: CacheState = self.host.state(call, self)
        s, e = st.span
        i = block.index
        if not s <= i < e:
            return
        io = block.io
        st.n_outputs[i] = None if isinstance(out, torch.Tensor) else len(out)
        if st.mode == "output":
            leaves, st.treespec[i] = tree_flatten(out)
            self._push(st, (s, e, i), ctx.step, leaves, st.span_in.shape)
        else:
            enc_out = None if io.encoder_index is None or isinstance(out, torch.Tensor) else out[io.encoder_index]
            st.encoder_none[i] = enc_out is None
            if i == e - 1:
                hidden_out = out if io.hidden_index is None else out[io.hidden_index]
                de = None
                if enc_out is not None and st.enc_in is not None and enc_out.shape == st.enc_in.shape:
                    de = enc_out - st.enc_in
                dh = hidden_out - st.span_in
                if self.trace is not None:
                    self._trace(st, ctx.step, dh)
                self._push(st, (s, e, -1), ctx.step, [dh, de], st.span_in.shape)
                self.policy.computed(st.policy, st.span_in, hidden_out)
        if i == e - 1:
            st.last_computed[(s, e)], st.consecutive = ctx.step, 0
            held = sum(x.nbytes() for x in self.host.states(self))
            self.peak_bytes = max(self.peak_bytes, held)

    # -- pieces -------------------------------------------------------------------------------------
    def _decide(self, st: CacheState, ctx, block) -> bool:
        c = self.config
        s, e = st.span
        if self.policy.adaptive:
            st.policy.shards = shards_of(self.adapter.denoiser)  # read per call: parallelism may come after apply
            signal = st.span_in
            if st.head_in is not None and st.head_in.shape == st.span_in.shape:
                signal = st.span_in - st.head_in  # the first blocks' residual
            self.policy.observe(st.policy, ctx.step, signal)
        key = (s, e, s if st.mode == "output" else -1)
        est = st.estimators.get(key)
        if est is None or not est.ready or st.shapes.get(key) != tuple(st.span_in.shape):
            return False
        if ctx.step < c.warmup or (ctx.num_steps is not None and ctx.step >= ctx.num_steps - c.cooldown):
            return False
        if c.max_skip and st.consecutive >= c.max_skip:
            return False
        last = st.last_computed.get((s, e))
        if last is None:
            return False
        reuse = self.policy.decide(st.policy, ctx.step, ctx.step - last, st.span_in)
        if reuse:
            st.consecutive += 1
        return reuse

    def _push(self, st, key, step, leaves, shape) -> None:
        est = st.estimators.get(key)
        if est is None or st.shapes.get(key) != tuple(shape):
            # a new span (Δ-DiT stage) or batch shape: what was cached for the old one is never used again
            for k in [k for k in st.estimators if k[:2] != key[:2] or k == key]:
                del st.estimators[k], st.shapes[k]
            est = st.estimators[key] = estimators.make(self.config.estimator, self.config.order, self.config.offload)
            st.shapes[key] = tuple(shape)
        est.push(step, leaves)

    def _trace(self, st: CacheState, step: int, dh: torch.Tensor) -> None:
        """Calibration: pair the policy's signal change with the span residual's own change, step to step."""
        est = st.estimators.get((*st.span, -1))
        rel = st.policy.extra.get("rel")
        if est is not None and est.history and est.history[-1][0] == step - 1 and rel is not None:
            self.trace.append((rel, row_rel_change(dh, est.history[-1][1][0], st.policy.shards)))

    def _pack(self, block, st, hidden, encoder, last: bool = False):
        """The block's return value with `hidden` (and `encoder`) in place."""
        n = st.n_outputs.get(block.index)
        if n is None:
            return hidden
        out = [None] * n
        io = block.io
        out[io.hidden_index] = hidden
        if io.encoder_index is not None and not (last and st.encoder_none.get(block.index)):
            out[io.encoder_index] = encoder
        return tuple(out)

    @staticmethod
    def _inputs(block, args_of, args, kwargs):
        """(hidden, encoder) inputs of a block call; encoder None where the block takes none."""
        io = block.io
        encoder = args_of.get(args, kwargs, io.encoder_arg) if io.encoder_arg else None
        return args_of.get(args, kwargs, io.hidden_arg), encoder
