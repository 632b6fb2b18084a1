"""Session: one application of fastdiff to a pipeline's denoisers (or to one bare denoiser) — the handle
users get back from apply().

Per-call state is per *caller*: each thread that calls the model has its own `Run` (step clock, records, run
state), so one accelerated denoiser shared by two pipelines in two threads gives each call exactly what it gives
alone. The hooks, the mechanisms and their configs are shared and hold no per-call state. (A `threading.local`,
not a ContextVar: dynamo traces reads of the former, so a whole-denoiser `torch.compile` keeps its graph.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from typing import Any

import torch

from . import parallel
from .adapters.base import BlockAdapter
from .clock import MAX_CALLS_PER_STEP, CallRecord, StepClock
from .config import FastDiffConfig
from .context import COND, UNCOND, UNKNOWN, RunState, StepContext
from .cost.model import CostModel
from .errors import FastDiffError
from .hooks import HookSet
from .host import Call, Hook, run_rows
from .mechanisms.base import Mechanism
from .summary import Summary

ATTR = "_fastdiff_session"  # the only attribute fastdiff sets on a model; removed by remove()


class Run:
    """What one caller (thread / context) is running through a session: its clock, the records of its
    current sampling run, and per denoiser the run state its mechanisms keep."""

    def __init__(self, scheduler: Any):
        self.clock = StepClock(scheduler)
        self.records: list[CallRecord] = []
        self.states: dict[str, RunState] = {}
        self.current: dict[str, Call | None] = {}  # denoiser name -> its call in progress
        self.pending: list[CallRecord] = []  # control-network calls waiting for the step's denoiser call
        self.signals: dict[str, str | None] = {}  # denoiser name -> the branch its pipeline's cache_context names

    def state(self, part: str) -> RunState:
        st = self.states.get(part)
        if st is None:
            st = self.states[part] = RunState()
        return st

    def drop_state(self) -> None:
        for st in self.states.values():
            st.reset()
        self.states.clear()


class Part:
    """One denoiser of a session, and the `Host` its mechanisms see (`fastdiff.host`): it wraps the denoiser's
    submodules, hands each hook the calling thread's call in progress, keeps their per-call state in the calling
    thread's run, and runs fewer batch rows when asked."""

    def __init__(self, session: "Session", name: str, denoiser: torch.nn.Module, adapter: BlockAdapter,
                 mechanisms: list[Mechanism]):
        self.session, self.name, self.denoiser, self.adapter, self.mechanisms = session, name, denoiser, adapter, \
            mechanisms
        self._cost: CostModel | None = None

    @property
    def control(self) -> bool:
        """A ControlNet: its calls are accounted, never accelerated."""
        return self.adapter.spec.control

    @property
    def call(self) -> Call | None:
        """This denoiser's call in progress in the calling thread (None outside one)."""
        run = getattr(self.session._local, "run", None)
        return None if run is None else run.current.get(self.name)

    @property
    def cost_model(self) -> CostModel:
        if self._cost is None:
            self._cost = CostModel(self.adapter)
        return self._cost

    # -- Host ---------------------------------------------------------------------------------------
    def wrap(self, module: Any, name: str, hook: Hook) -> None:
        local, part = self.session._local, self.name

        def handed(inner, args, kwargs):  # the one place that looks up the call in progress
            run = getattr(local, "run", None)
            return hook(None if run is None else run.current.get(part), inner, args, kwargs)

        self.session.hooks.wrap(module, name, handed)

    def state(self, call: Call, mechanism: Mechanism, slot: int | None = None) -> Any:
        store = self.session._local.run.state(self.name)  # the call's own run: it is in progress in this thread
        return store.get(mechanism.name, call.ctx.call if slot is None else slot, call.ctx.grid, mechanism.new_state)

    def states(self, mechanism: Mechanism) -> list[Any]:
        return self.session._reporting_run().state(self.name).of(mechanism.name)

    def run_rows(self, call: Call, rows) -> None:
        run_rows(call, rows)


class Session:
    """Owns the hooks, the step clock(s), the run state and the telemetry of one applied config.

    Returned by `fastdiff.apply`; `summary()` reports the last run, `remove()` restores the model.
    """

    def __init__(self, denoisers: list[tuple[str, torch.nn.Module, BlockAdapter, list[Mechanism]]],
                 config: FastDiffConfig, pipeline: Any = None, scheduler: Any = None):
        self.config = config
        self.parts = [Part(self, *d) for d in denoisers]
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.scheduler = scheduler
        self.hooks = HookSet()
        self._scheduler_hooks = HookSet()
        self._lock = threading.Lock()
        self._local = threading.local()  # .run: the calling thread's Run
        self._runs: weakref.WeakSet[Run] = weakref.WeakSet()  # every caller's Run, to drop state on remove()
        self._last: Run | None = None  # the Run that made the latest call, whichever thread it was
        self.removed = False

    # -- the primary denoiser (the only one for most pipelines) ----------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts[0].denoiser

    @property
    def adapter(self) -> BlockAdapter:
        return self.parts[0].adapter

    @property
    def accounted_fully(self) -> bool:
        """Every network the pipeline calls per step has a cost model (else summaries show no FLOPs)."""
        return all(p.adapter.spec.layout is not None for p in self.parts)

    @property
    def mechanisms(self) -> list[Mechanism]:
        return [m for p in self.parts for m in p.mechanisms]

    @property
    def pipeline(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    @property
    def current(self) -> StepContext | None:
        """StepContext of the primary denoiser's call in progress in this thread (None outside a call)."""
        call = self.parts[0].call
        return None if call is None else call.ctx

    @property
    def records(self) -> list[CallRecord]:
        """Calls of the latest run (of whichever thread called last)."""
        return self._last.records if self._last is not None else []

    @property
    def state(self) -> RunState:
        """The primary denoiser's run state (of the calling thread's call in progress, else of the latest run)."""
        return self._reporting_run().state(self.parts[0].name)

    @property
    def cost_model(self) -> CostModel:
        return self.parts[0].cost_model

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self) -> None:
        attached = []
        try:
            for part in self.parts:
                for mechanism in part.mechanisms:  # innermost first
                    if not mechanism.outer:
                        attached.append(mechanism)
                        mechanism.attach(part.adapter, part)  # the part is the mechanism's host
                # The clock wraps every mechanism of a denoiser: each sees an open call.
                self.hooks.wrap(part.denoiser, "fastdiff.clock", self._caller(part))
                if not part.control and callable(getattr(type(part.denoiser), "cache_context", None)):
                    self.hooks.wrap(part.denoiser, "fastdiff.clock.cache_context", self._branch_signal(part),
                                    attr="cache_context")
            if self.scheduler is not None:
                self._listen(self.scheduler)
            for part in self.parts:  # a driver (bottleneck) wraps outside the clock, so the clock sees its stages
                for driver in [m for m in part.mechanisms if m.outer]:
                    attached.append(driver)
                    driver.attach_driver(part.adapter, self.hooks, self.scheduler, self.pipeline, self)
            self.hooks.seal(*(p.denoiser for p in self.parts))  # a module replaced later is refused at call time
            for part in self.parts:
                part.denoiser.__dict__[ATTR] = self
        except BaseException:
            self.hooks.remove()
            self._scheduler_hooks.remove()
            for mechanism in attached:  # a mechanism may hold more than hooks (sparse attention routes SDPA)
                mechanism.detach()
            for part in self.parts:
                if part.denoiser.__dict__.get(ATTR) is self:
                    del part.denoiser.__dict__[ATTR]
            raise

    def _listen(self, scheduler: Any) -> None:
        self._scheduler_hooks.wrap(scheduler, "fastdiff.clock.set_timesteps", self._on_set_timesteps,
                                   attr="set_timesteps")
        self._scheduler_hooks.wrap(scheduler, "fastdiff.clock.step", self._on_scheduler_step, attr="step")

    def remove(self) -> None:
        """Restore every model and scheduler this session hooked. A handle that was already removed (a stale
        one, e.g. after remove + apply again) does nothing: it never touches a newer session."""
        if self.removed:
            return
        self.hooks.remove()  # refuses (and changes nothing) when someone wrapped over fastdiff
        self._scheduler_hooks.remove()
        for mechanism in self.mechanisms:
            mechanism.detach()
        for part in self.parts:
            if part.denoiser.__dict__.get(ATTR) is self:
                del part.denoiser.__dict__[ATTR]
        self.removed = True
        for run in list(self._runs):  # cached activations of every caller go now; records stay for summary()
            run.drop_state()

    def reset(self) -> None:
        """Forget all per-run state now, for every caller; each one's next call starts a new run."""
        for run in list(self._runs):
            run.drop_state()
            run.clock.reset()

    # -- stages -------------------------------------------------------------------------------------
    def begin_stage(self, num_steps: int | None = None, *, run_steps: int | None = None, new_run: bool = False) -> None:
        """A driver's signal: the calling thread's next denoiser call begins a stage of the run in progress — one run
        whose stages may change the latent size and the timestep schedule (resolution-bottleneck sampling).

        The stage's first call opens it whatever else it signals (a new latent shape, the pipeline's new
        `set_timesteps`, a timestep above the last): the run goes on, its records (and so `summary()`) keep every
        stage, and the global step continues (`StepContext.step`; `stage_step` counts within the stage). Per-call
        state follows the stage rule of `RunState` (a stage on another token grid starts afresh).

        Args:
            num_steps: the stage's steps; default: what the pipeline's scheduler sets for it (a bare denoiser: None).
            run_steps: the run's steps over all its stages. Step-fraction schedules (cache warm-up/cool-down, merge
                start/stop, sparse start, guidance start) read the global step against the run's steps: give it with
                the first stage so that every stage reads the same schedule. Default: the stages so far plus this one.
            new_run: this stage is the first of a new run (a driver starting a run, e.g. to give `run_steps`);
                without it, and with no run in progress, the next call opens a run as any call would.
        """
        for name, value in (("num_steps", num_steps), ("run_steps", run_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FastDiffError(f"begin_stage: {name} must be a positive int or None, got {value!r}")
        self._run_here().clock.begin_stage(num_steps, run_steps, bool(new_run))

    # -- per caller ---------------------------------------------------------------------------------
    def _run_here(self) -> Run:
        run = getattr(self._local, "run", None)
        if run is None:
            run = self._local.run = Run(self.scheduler)
            with self._lock:
                self._runs.add(run)
        return run

    def _reporting_run(self) -> Run:
        """Inside a call: the caller's own run; outside one (summary, reports): the latest run."""
        run = getattr(self._local, "run", None)
        if run is not None and any(r is not None for r in run.current.values()):
            return run
        return self._last if self._last is not None else self._run_here()

    # -- hooks --------------------------------------------------------------------------------------
    def _on_set_timesteps(self, inner, args, kwargs):
        out = inner(*args, **kwargs)
        self._run_here().clock.on_set_timesteps()
        return out

    def _on_scheduler_step(self, inner, args, kwargs):
        out = inner(*args, **kwargs)
        self._run_here().clock.on_scheduler_step()
        return out

    def _caller(self, part: Part):
        if part.control:
            def control(inner, args, kwargs):
                self._note_control(part, args, kwargs)
                return inner(*args, **kwargs)

            return control

        def call(inner, args, kwargs):
            run = self._open(part, args, kwargs)
            try:
                return inner(*args, **kwargs)
            finally:
                run.current[part.name] = None

        return call

    @torch.compiler.disable  # host-side bookkeeping: a compiled denoiser keeps one graph around its blocks
    def _open(self, part: Part, args: tuple, kwargs: dict) -> Run:
        self.hooks.check_intact()
        parallel.check_call(part.denoiser, part.mechanisms)  # enable_parallelism after apply: refuse per-token ones
        run = self._run_here()
        self._follow_scheduler(run)
        adapter = part.adapter
        bound = adapter.bind(args, kwargs)
        hidden = adapter.hidden_input(bound)
        ctx, new_run = run.clock.tick(bound.get(adapter.spec.timestep_arg), tuple(hidden.shape), adapter.layout(bound))
        signal = run.signals.get(part.name)
        ctx = dataclasses.replace(ctx, branches=adapter.branches(bound, self.pipeline, ctx.call, signal))
        if new_run:
            run.drop_state()
            run.records = []
        run.state(part.name).enter_stage(ctx.run, ctx.stage, ctx.grid)  # the stage rule: see RunState
        for rec in run.pending:  # the step's ControlNet calls came just before this one
            rec.ctx = dataclasses.replace(ctx, call=-1, layout=rec.ctx.layout, branches=rec.ctx.branches)
        run.records += run.pending
        run.pending = []
        record = CallRecord(ctx, part=part.name)
        for driver in part.mechanisms:  # a driver running the call at another size says what dense would run
            if driver.outer and ctx.layout is not None:
                record.dense_layout = driver.dense_layout(ctx.layout)
        run.records.append(record)
        run.current[part.name] = Call(record, bound)
        self._last = run
        return run

    def _branch_signal(self, part: Part):
        """diffusers' `denoiser.cache_context(name)`, which pipelines enter around each CFG branch's call (FluxPipeline
        true CFG, Qwen-Image, Wan, ...): while it is open, "cond" / "uncond" is the branch of the calling thread's
        calls of this denoiser — the pipeline's own word, stronger than the call order of its CFG layout. Other names
        ("cond_uncond": both halves in one call) say nothing of the rows: the layout decides there."""

        @contextlib.contextmanager
        def listening(inner, args, kwargs):
            name = args[0] if args else kwargs.get("name")
            run = self._run_here()
            before = run.signals.get(part.name)
            with inner(*args, **kwargs):
                run.signals[part.name] = name if name in (COND, UNCOND) else None
                try:
                    yield
                finally:
                    run.signals[part.name] = before

        return listening

    @torch.compiler.disable
    def _note_control(self, part: Part, args: tuple, kwargs: dict) -> None:
        bound = part.adapter.bind(args, kwargs)
        rows = part.adapter.hidden_input(bound).shape[0]
        ctx = StepContext(-1, -1, None, float("nan"), -1, (UNKNOWN,) * rows, part.adapter.layout(bound))
        run = self._run_here()
        # bounded: a ControlNet called without its denoiser (by hand) must not grow state
        run.pending = run.pending[-len(self.parts) * MAX_CALLS_PER_STEP:] + [CallRecord(ctx, part=part.name)]

    def _follow_scheduler(self, run: Run) -> None:
        """`pipe.scheduler = X.from_config(...)` after apply: listen to the pipeline's current scheduler."""
        pipeline = self.pipeline
        current = getattr(pipeline, "scheduler", None) if pipeline is not None else self.scheduler
        if current is None or current is run.clock.scheduler:
            return
        with self._lock:
            if current is not self.scheduler:
                self._scheduler_hooks.remove()
                self.scheduler = current
                self._listen(current)
        run.clock.begin_scheduler_run(current)

    # -- copies -------------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        raise FastDiffError(
            "copy.deepcopy of a model accelerated by fastdiff is not supported (the copy would run the original's "
            "hooks): call fastdiff.remove(pipe), copy, then fastdiff.apply to each copy")

    def __reduce_ex__(self, protocol):
        raise FastDiffError(
            "a model accelerated by fastdiff cannot be pickled (its forwards are fastdiff wrappers): "
            "call fastdiff.remove(pipe) first, then pickle")

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> Summary:
        """What the last run did (every stage of it): per step and per block, with estimated FLOPs against dense."""
        # Applied before enable_parallelism, fastdiff's clock sits under diffusers' split of the inputs and saw one
        # rank's shard, from which the whole model's FLOPs cannot be priced exactly (attention spans all tokens).
        shards = parallel.shards_of(self.denoiser)
        ranks = shards.degree if shards is not None else 1
        priced = self.accounted_fully and not (ranks > 1 and parallel.sees_shards(self.denoiser))
        tracked = self.config.telemetry is not None and self.config.telemetry.enabled
        return Summary.build(self.records, self.parts, config=self.strify(), tracked=tracked, ranks=ranks,
                             priced=priced)

    def strify(self) -> str:
        return self.config.strify()

    def __repr__(self) -> str:
        return f"<fastdiff.Session {self.adapter.name} {type(self.denoiser).__name__} config={self.strify()}>"

