"""Static-interval step caching: compute blocks every `interval` steps, reuse them in between.

Transformer blocks are reused as residuals (output = this step's input + the delta cached at the last
computed step: FORA), UNet blocks as whole outputs with the outermost down/up blocks always computed
(DeepCache). The decision depends only on the step index, so it is the same for every row of a batch
and known in advance — which is also what makes `estimate_cost` exact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..base import Mechanism


@dataclass
class Entry:
    """What one block left at its last computed step, for one denoiser call slot."""

    shape: tuple
    hidden: torch.Tensor | None = None  # residual (residual mode)
    encoder: torch.Tensor | None = None  # residual of the encoder stream (dual-stream blocks)
    output: Any = None  # the whole output (output mode)
    n_outputs: int | None = None  # tuple length of the block's output; None for a tensor


class StepCache(Mechanism):
    name = "cache"

    # -- the policy -----------------------------------------------------------------------------------
    def computes(self, step: int, num_steps: int | None) -> bool:
        c = self.config
        if step < c.warmup or (num_steps is not None and step >= num_steps - c.cooldown):
            return True
        return (step - c.warmup) % c.interval == 0

    def cacheable(self, adapter) -> list:
        pinned = adapter.spec.always_compute(adapter.blocks) if adapter.spec.always_compute else set()
        return [b for b in adapter.blocks if b.index not in pinned]

    # -- Mechanism ------------------------------------------------------------------------------------
    def estimate_cost(self, table):
        steps = len(table.rows) // table.calls_per_step
        skip = [b.index for b in self.cacheable(table.model.adapter)]
        rows = []
        for i, row in enumerate(table.rows):
            row = list(row)
            if not self.computes(i // table.calls_per_step, steps):
                for b in skip:
                    row[b] = 0.0
            rows.append(row)
        return table.with_rows(rows)

    def attach(self, adapter, session):
        self.session = session
        for block in self.cacheable(adapter):
            session.hooks.wrap(block.module, f"fastdiff.cache.{block.path}", self._wrapper(block))

    def make_state(self) -> dict[int, Entry]:
        return {}

    # -- the hook -------------------------------------------------------------------------------------
    def _wrapper(self, block):
        io = block.io
        signature = inspect.signature(block.module.forward)

        def cached(inner, args, kwargs):
            ctx = self.session.current
            if ctx is None:  # called outside a denoiser call (e.g. by the user): nothing to decide
                return inner(*args, **kwargs)
            store = self.session.state.slot(self.name, ctx.call, self.make_state)
            bound = signature.bind(*args, **kwargs).arguments
            hidden = bound[io.hidden_arg]
            encoder = bound.get(io.encoder_arg) if io.encoder_arg else None
            entry = store.get(block.index)
            if entry is not None and entry.shape == tuple(hidden.shape) and not self.computes(ctx.step, ctx.num_steps):
                return self._reuse(block, entry, hidden, encoder)
            out = inner(*args, **kwargs)
            store[block.index] = self._store(block, out, hidden, encoder)
            return out

        return cached

    @staticmethod
    def _store(block, out, hidden, encoder) -> Entry:
        entry = Entry(tuple(hidden.shape), n_outputs=None if isinstance(out, torch.Tensor) else len(out))
        if block.reuse == "output":
            entry.output = out
            return entry
        io = block.io
        out_hidden = out if io.hidden_index is None else out[io.hidden_index]
        entry.hidden = out_hidden - hidden
        if io.encoder_index is not None and out[io.encoder_index] is not None and encoder is not None:
            entry.encoder = out[io.encoder_index] - encoder
        return entry

    @staticmethod
    def _reuse(block, entry: Entry, hidden, encoder):
        if block.reuse == "output":
            return entry.output
        io = block.io
        new_hidden = hidden + entry.hidden
        if io.hidden_index is None:
            return new_hidden
        out = [None] * entry.n_outputs
        out[io.hidden_index] = new_hidden
        if io.encoder_index is not None and entry.encoder is not None:
            out[io.encoder_index] = encoder + entry.encoder
        return tuple(out)
