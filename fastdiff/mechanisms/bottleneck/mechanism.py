"""Resolution-bottleneck sampling as a mechanism: the config section `bottleneck` on a pipeline's call.

It is the one mechanism that drives the run rather than a block: its wrapper sits outside the step clock's (the
clock, and every other mechanism, see each call at its stage's latent size), it hooks the pipeline's scheduler,
and it tells the session where each stage begins (`begin_stage`), so a run of several stages stays one run whose
records, summary and step-fraction schedules cover all of them.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ...errors import FastDiffError, UnsupportedModelError
from ..base import Mechanism
from . import regions as _regions
from .driver import Driver
from .schedule import Stage, split_steps


def stages_of(config) -> tuple[Stage, ...]:
    return tuple(Stage(scale=st.get("scale", 1), steps=st["steps"], strength=st.get("strength", 1.0),
                       shift=st.get("shift")) for st in config.stages)


def make_driver(config, resample, hidden_arg: str = "hidden_states", denoiser_config=None) -> Driver:
    multiple = resample.multiple(denoiser_config) if resample.multiple and denoiser_config is not None else 1
    kind, extra = Driver, {}
    region = region_of(config)
    if region is not None:  # region-adaptive upsampling: one stage runs a mixed-resolution token set
        from ...clock import MAX_CALLS_PER_STEP

        kind = _regions.RegionDriver
        extra = dict(region=region, fraction=config.stages[region]["regions"], max_calls=MAX_CALLS_PER_STEP)
    return kind(stages_of(config), resize=config.resize, strength_is=config.strength_is, packing=resample.packing,
                positions=resample.positions, multiple=multiple, hidden_arg=hidden_arg, **extra)


def region_of(config) -> int | None:
    """The index of the section's region stage (a stage with `regions`), or None."""
    return next((i for i, st in enumerate(config.stages) if "regions" in st), None)


def stage_sizes(config, *, height: int, width: int, steps: int, num_frames: int | None = None) -> list[dict]:
    """The stages a call of this size runs, as `fastdiff.estimate` prices them: each stage's output size (the call's
    divided by the stage's scale: the pipeline's VAE scale then applies as for any call) and its steps."""
    stages = stages_of(config)
    counts = split_steps(steps, stages)
    out = [dict(height=height // st.scale, width=width // st.scale, steps=n, num_frames=num_frames)
           for st, n in zip(stages, counts)]
    region = region_of(config)
    if region is not None:
        r = config.stages[region]["regions"]
        if r >= 1:  # only fine tokens: the full grid
            out[region].update(height=height, width=width)
        elif r > 0:  # a stand-in twice the half grid's width, which `Bottleneck.estimate_cost` prices as the mixed set
            out[region].update(width=width)
    return out


class Bottleneck(Mechanism):
    name = "bottleneck"
    outer = True  # wraps the denoiser outside the step clock

    def validate(self, adapter) -> None:
        from ...adapters.base import specs

        if adapter.spec.resample is None:
            known = sorted(s.name for s in specs() if s.resample is not None)
            raise UnsupportedModelError(
                f"{type(adapter.denoiser).__name__}: resolution-bottleneck sampling needs to know how the "
                f"'{adapter.name}' family's latents change size (FamilySpec.resample); supported families: {known}")
        if region_of(self.config) is not None:
            _regions.check_family(adapter)
        make_driver(self.config, adapter.spec.resample)  # stage values checked before anything is touched

    def check_call(self, adapter, pipeline: Any, scheduler: Any, mechanisms) -> Driver:
        """Refuse, before anything is attached, what the driver cannot run on this pipeline (apply and estimate both
        ask): no pipeline, a sampler it cannot stage, stages that sampler cannot schedule, a region stage beside
        merging or sparse attention. Returns the driver for these stages."""
        owner = type(adapter.denoiser).__name__
        if pipeline is None or scheduler is None:
            raise UnsupportedModelError(
                f"{owner}: resolution-bottleneck sampling drives a pipeline's call (its scheduler and latents): "
                "apply fastdiff to the pipeline, not to its denoiser")
        Driver.check_scheduler(scheduler, owner, type(pipeline).__name__)
        spec = adapter.spec
        driver = make_driver(self.config, spec.resample, spec.hidden_arg, adapter.denoiser.config)
        driver.check_stages(scheduler, owner)
        if isinstance(driver, _regions.RegionDriver):
            driver.check_composition(scheduler, mechanisms, owner)
        return driver

    def attach_driver(self, adapter, hooks, scheduler, pipeline, session) -> None:
        self.scheduler, self.pipeline = scheduler, pipeline
        driver = self.check_call(adapter, pipeline, scheduler, session.mechanisms)  # before any hook of the driver's
        self.driver = driver
        step_sig = inspect.signature(scheduler.step)

        def begin(k: int) -> None:
            run = driver.run
            session.begin_stage(run.counts[k], run_steps=sum(run.counts))

        driver.on_stage = begin

        def set_timesteps(inner, args, kwargs):
            out = driver.set_timesteps(scheduler, inner, args, kwargs)
            run = driver.run
            session.begin_stage(run.counts[0], run_steps=sum(run.counts), new_run=True)
            return out

        def step(inner, args, kwargs):
            return driver.step(step_sig, inner, args, kwargs)

        def bind(args, kwargs):  # the adapter's one binder, without the bound `self`
            return {k: v for k, v in adapter.bind(args, kwargs).items() if k != "self"}

        def forward(inner, args, kwargs):
            if pipeline.scheduler is not scheduler:
                raise FastDiffError(
                    f"{type(pipeline).__name__}.scheduler was replaced after fastdiff.apply with a bottleneck section: "
                    "its stages are set by the scheduler it was applied with. Call fastdiff.remove(pipe), then apply "
                    "again")
            return driver.forward(bind, inner, args, kwargs)

        hooks.wrap(scheduler, "fastdiff.bottleneck.set_timesteps", set_timesteps, attr="set_timesteps")
        hooks.wrap(scheduler, "fastdiff.bottleneck.step", step, attr="step")
        hooks.wrap(adapter.denoiser, "fastdiff.bottleneck", forward)

    def attach(self, adapter, host) -> None:  # the session calls attach_driver instead (see `outer`)
        raise FastDiffError("bottleneck attaches as a driver (Session.attach calls attach_driver)")

    def detach(self) -> None:
        self.scheduler = self.pipeline = self.driver = None

    def dense_layout(self, layout):
        """The layout of this call at full size: the stage's token grid times its scale (height and width)."""
        if isinstance(self.driver, _regions.RegionDriver) and self.driver.in_region():
            return self.driver.dense_layout(layout)
        s = self.driver._scale(self.driver.run)
        f, h, w = layout.grid
        return layout if s == 1 else dataclasses.replace(layout, grid=(f, h * s, w * s))

    def estimate_cost(self, table):
        # Priced by the table's rows themselves: `fastdiff.estimate` builds them at each stage's size
        # (`stage_sizes`), and records of a run carry the layout each call had; a region stage's rows are re-priced
        # from their stand-in grid as the mixed set (`regions.price`).
        region = region_of(self.config)
        if region is None or not 0 < self.config.stages[region]["regions"] < 1:
            return table
        return _regions.price(table, region, self.config.stages[region]["regions"])

    def report(self, records) -> dict:
        run = getattr(self, "driver", None) and self.driver.run
        stages = [dict(scale=s.scale, strength=s.strength) for s in stages_of(self.config)]
        region = region_of(self.config)
        if region is not None:
            stages[region]["regions"] = self.config.stages[region]["regions"]
            driver = getattr(self, "driver", None)
            if isinstance(driver, _regions.RegionDriver) and driver.tokens_seen() is not None:
                stages[region]["tokens"] = driver.tokens_seen()  # image tokens of the region stage's calls
        return dict(stages=stages, steps=list(run.counts) if run else None)


__all__ = ["Bottleneck", "Stage", "split_steps"]
