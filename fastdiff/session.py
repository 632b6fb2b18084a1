"""Session: one application of fastdiff to one denoiser — the Handle users get back from apply()."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from .adapters.base import BlockAdapter
from .clock import CallRecord, StepClock
from .config import FastDiffConfig
from .context import RunState
from .cost.model import CostModel
from .hooks import HookSet
from .mechanisms.base import Mechanism
from .summary import Summary

ATTR = "_fastdiff_session"  # the only attribute fastdiff sets on a model; removed by remove()


class Session:
    """Owns the hooks, the step clock, the run state and the telemetry of one applied config.

    Returned by `fastdiff.apply`; `summary()` reports the last run, `remove()` restores the model.
    """

    def __init__(self, denoiser: torch.nn.Module, adapter: BlockAdapter, config: FastDiffConfig,
                 mechanisms: list[Mechanism], pipeline: Any = None, scheduler: Any = None):
        self.denoiser = denoiser
        self.adapter = adapter
        self.config = config
        self.mechanisms = mechanisms
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.scheduler = scheduler
        self.hooks = HookSet()
        self.clock = StepClock(scheduler)
        self.state = RunState()
        self.records: list[CallRecord] = []  # calls of the current (last) run
        self.current_record: CallRecord | None = None
        self._cost: CostModel | None = None

    @property
    def pipeline(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    @property
    def current(self):
        """StepContext of the denoiser call in progress (None outside a call)."""
        return self.current_record.ctx if self.current_record is not None else None

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self) -> None:
        attached = []
        try:
            for mechanism in self.mechanisms:  # innermost first
                attached.append(mechanism)
                mechanism.attach(self.adapter, self)
            if self.scheduler is not None:
                self.hooks.wrap(self.scheduler, "fastdiff.clock.set_timesteps", self._on_set_timesteps,
                                attr="set_timesteps")
                self.hooks.wrap(self.scheduler, "fastdiff.clock.step", self._on_scheduler_step, attr="step")
            # The clock is the outermost wrapper of the denoiser: every mechanism sees an open StepContext.
            self.hooks.wrap(self.denoiser, "fastdiff.clock", self._on_denoiser_call)
            self.denoiser.__dict__[ATTR] = self
        except BaseException:
            self.hooks.remove()
            for mechanism in attached:  # a mechanism may hold more than hooks (sparse attention routes SDPA)
                mechanism.detach()
            self.denoiser.__dict__.pop(ATTR, None)
            raise

    def remove(self) -> None:
        self.hooks.remove()
        for mechanism in self.mechanisms:
            mechanism.detach()
        self.denoiser.__dict__.pop(ATTR, None)
        self.state.reset()

    def reset(self) -> None:
        """Forget all per-run state now; the next call starts a new run."""
        self.state.reset()
        self.clock.reset()

    # -- hooks --------------------------------------------------------------------------------------
    def _on_set_timesteps(self, inner, args, kwargs):
        out = inner(*args, **kwargs)
        self.clock.on_set_timesteps()
        return out

    def _on_scheduler_step(self, inner, args, kwargs):
        out = inner(*args, **kwargs)
        self.clock.on_scheduler_step()
        return out

    def _on_denoiser_call(self, inner, args, kwargs):
        bound = self.adapter.bind(args, kwargs)
        hidden = self.adapter.hidden_input(bound)
        ctx, new_run = self.clock.tick(bound.get("timestep"), tuple(hidden.shape), self.adapter.layout(bound))
        ctx = dataclasses.replace(ctx, branches=self.adapter.branches(bound, self.pipeline, ctx.call))
        if new_run:
            self.state.reset()
            self.records = []
        record = CallRecord(ctx)
        self.records.append(record)
        self.current_record = record
        try:
            return inner(*args, **kwargs)
        finally:
            self.current_record = None

    # -- reporting ----------------------------------------------------------------------------------
    @property
    def cost_model(self) -> CostModel:
        if self._cost is None:
            self._cost = CostModel(self.adapter)
        return self._cost

    def summary(self) -> Summary:
        """What the last run did: per step and per block, with estimated FLOPs against dense."""
        return Summary.build(self)

    def strify(self) -> str:
        return self.config.strify()

    def __repr__(self) -> str:
        return f"<fastdiff.Session {self.adapter.name} {type(self.denoiser).__name__} config={self.strify()}>"
