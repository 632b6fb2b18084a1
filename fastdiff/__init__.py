"""fastdiff — training-free acceleration for diffusers pipelines.

    handle = fastdiff.apply(pipe, preset="none")
    image = pipe(...)
    print(handle.summary())
    fastdiff.remove(pipe)
"""

from __future__ import annotations

import contextlib
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from . import adapters
from .adapters.base import CfgLayout, register_pipeline
from .config import CacheConfig, FastDiffConfig, GuidanceConfig, MergeConfig, SparseConfig, TelemetryConfig
from .context import StepContext, TokenLayout
from .cost.estimate import Estimate, check_run, check_stages
from .errors import ConfigError, FastDiffError, UnsupportedModelError
from .integrations.diffusers import find_denoisers, find_parts
from .mechanisms import registry as _mechanisms
from .planner import Plan, Pricer, calibrate, calibrate_latency, plan
from .session import ATTR, Session

__version__ = "0.1.0"
__all__ = [
    "apply", "remove", "reset", "accelerated", "estimate", "plan", "calibrate", "calibrate_latency", "presets",
    "load_config", "supported",
    "session_of", "register_pipeline",
    "FastDiffConfig", "TelemetryConfig", "MergeConfig", "SparseConfig", "CacheConfig", "GuidanceConfig", "Session",
    "StepContext", "TokenLayout", "CfgLayout",
    "Estimate", "Plan", "FastDiffError", "ConfigError", "UnsupportedModelError",
]

def presets() -> list[str]:
    """Names of the presets shipped in configs/."""
    return sorted(p.name[:-5] for p in resources.files("fastdiff.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(config: Any = None, *, preset: str | None = None, **overrides) -> FastDiffConfig:
    """Build and validate a FastDiffConfig from a dataclass, dict, preset name, YAML path, plus overrides.

    Raises ConfigError on an unknown preset or key, or on a bad value.
    """
    if preset is not None and config is not None:
        raise ConfigError("give either config or preset, not both")
    if isinstance(config, str) and not config.endswith((".yaml", ".yml")):
        config, preset = None, config
    if preset is not None:
        if preset not in presets():
            raise ConfigError(f"unknown preset {preset!r}; available presets: {presets()}")
        cfg = FastDiffConfig.from_yaml(Path(str(resources.files("fastdiff.configs") / f"{preset}.yaml")))
    elif config is None:
        cfg = FastDiffConfig()
    elif isinstance(config, FastDiffConfig):
        cfg = config.merged({})  # a validated copy: later edits of the caller's object do not leak in
    elif isinstance(config, dict):
        cfg = FastDiffConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        cfg = FastDiffConfig.from_yaml(config)
    else:
        raise ConfigError(f"config must be a FastDiffConfig, dict, preset name or YAML path, got {type(config).__name__}")
    return cfg.merged(overrides) if overrides else cfg


def supported() -> dict[str, list[str]]:
    """Family name -> denoiser classes with adapters."""
    return adapters.supported()


def apply(pipe_or_denoiser: Any, config: Any = None, *, preset: str | None = None, speedup: float | None = None,
          latency: float | None = None, **overrides) -> Session:
    """Accelerate a diffusers pipeline (or its transformer/unet) in place; returns the Session handle.

    Everything is validated before the model is touched: on any error the model is exactly as before.

    `speedup=3.0` (over the bare model) or `latency=seconds` (the run's denoiser calls) plans the config first
    (`fastdiff.plan(pipe, speedup=..., height=..., width=..., steps=...)`): give the call's size as keyword
    arguments (height, width, steps; batch, cfg, num_frames, text_tokens). A merge or sparse section predicted not
    to pay at the denoiser's default size is applied with a warning naming the predicted times.
    """
    planned = speedup is not None or latency is not None
    if planned:
        from .planner import SHAPE_KEYS

        shape = {k: overrides.pop(k) for k in list(overrides) if k in SHAPE_KEYS}
        if overrides or preset is not None:
            raise ConfigError(f"apply(speedup=/latency=) plans the config: drop preset and the override(s) "
                              f"{sorted(overrides)}; the keyword arguments are the call's size {list(SHAPE_KEYS)}")
        config = plan(pipe_or_denoiser, config, speedup=speedup, latency=latency, **shape).config
    cfg = load_config(config, preset=preset, **overrides)
    pipeline, denoiser, scheduler = find_parts(pipe_or_denoiser)
    denoisers = [("denoiser", denoiser)] if pipeline is None else find_denoisers(pipeline)
    parts = []
    for name, module in denoisers:
        if module.__dict__.get(ATTR) is not None:
            raise FastDiffError(f"fastdiff is already applied to this {type(module).__name__}; "
                                "call fastdiff.remove(pipe) first")
        adapter = adapters.resolve(module)
        if adapter.spec.control:
            if not parts:
                raise UnsupportedModelError(
                    f"{type(module).__name__} is a control network, not a denoiser: apply fastdiff to the pipeline "
                    "that calls it (its calls are then accounted in summaries)")
            parts.append((name, module, adapter, []))  # accounted, never accelerated
            continue
        family_cfg = cfg.for_family(adapter.name)
        mechanisms = _mechanisms.build(family_cfg)
        for mechanism in mechanisms:
            mechanism.validate(adapter)
        parts.append((name, module, adapter, mechanisms))
    spec = parts[0][2].spec  # guidance needs each row's branch: from the pipeline's CFG layout, or the inputs
    if pipeline is not None and cfg.guidance is not None and spec.cfg_layout(pipeline) is None \
            and spec.row_branches is None:
        raise UnsupportedModelError(
            f"guidance skipping on {type(pipeline).__name__}: fastdiff does not know how this pipeline lays out its "
            f"CFG branches (the '{parts[0][2].name}' adapter knows {sorted(parts[0][2].spec.pipelines)}); "
            "drop the guidance section or register the pipeline's layout (fastdiff.register_pipeline)")
    drivers = [m for m in parts[0][3] if m.outer]
    if drivers:  # resolution-bottleneck sampling drives the pipeline's one denoiser and scheduler
        if len(parts) > 1:
            raise UnsupportedModelError(
                f"{type(pipeline).__name__}: resolution-bottleneck sampling changes the latent size the denoiser sees, "
                f"and this pipeline calls {[n for n, *_ in parts]}, whose inputs it would not resize; supported: "
                "pipelines with one denoiser and no control network")
        for driver in drivers:
            driver.check_call(parts[0][2], pipeline, scheduler, parts[0][3])
    from .planner import unpaid

    # a planned config only holds what pays at the call's own size; others are priced at the default size
    for message in [] if planned else unpaid(parts[0][1], cfg.for_family(parts[0][2].name)):
        warnings.warn(message, stacklevel=2)
    session = Session(parts, cfg.for_family(parts[0][2].name), pipeline=pipeline, scheduler=scheduler)
    session.attach()
    return session


def session_of(pipe_or_denoiser: Any) -> Session | None:
    """The active Session on a pipeline or denoiser, if any."""
    _, denoiser, _ = find_parts(pipe_or_denoiser)
    return denoiser.__dict__.get(ATTR)


def remove(pipe_or_denoiser: Any) -> bool:
    """Remove every fastdiff hook; the model computes exactly what it computed before apply.
    Returns False if fastdiff was not applied."""
    session = session_of(pipe_or_denoiser)
    if session is None:
        return False
    session.remove()
    return True


def reset(pipe_or_denoiser: Any) -> None:
    """Drop all per-run state now (it is also dropped automatically at every new pipeline call)."""
    session = session_of(pipe_or_denoiser)
    if session is None:
        raise FastDiffError("fastdiff is not applied to this pipeline")
    session.reset()


@contextlib.contextmanager
def accelerated(pipe_or_denoiser: Any, config: Any = None, *, preset: str | None = None,
                **overrides) -> Iterator[Session]:
    """`with fastdiff.accelerated(pipe, ...) as handle:` — applied inside, removed on exit (even on error)."""
    session = apply(pipe_or_denoiser, config, preset=preset, **overrides)
    try:
        yield session
    finally:
        session.remove()


def estimate(pipe_or_denoiser: Any, config: Any = None, *, height: int | None = None, width: int | None = None,
             steps: int | None = None, num_frames: int | None = None, batch: int = 1, cfg: bool = True,
             text_tokens: int | None = None, stages: list[dict] | None = None, preset: str | None = None,
             calibration: Any = None, **overrides) -> Estimate:
    """Predicted FLOPs and wall time of one sampling run with `config` against the dense baseline. Runs no model.

    Time (`Estimate.seconds`, `.time_speedup`) is priced by the latency calibration of this device and model
    (`fastdiff.calibrate_latency`; `calibration` = a Calibration or its JSON path), else the shipped default, which
    `Estimate.latency` names.

    `height`/`width` (and `num_frames`) are the output size a pipeline call would be given; they are turned into
    latents by the pipeline's own VAE scale (1 for a pipeline without a VAE, e.g. the pixel-space reference models).
    For a bare denoiser there is no VAE to know of: they are the latent sizes it is called on (before any packing,
    e.g. Flux's 2x2), and `num_frames` the latent frames. Sizes that make no whole token grid are refused (ConfigError
    naming the multiple needed), as are non-positive, non-int or bool sizes, steps and batch.

    `stages` prices a run of several stages (`Session.begin_stage`), e.g. resolution-bottleneck sampling:
    `[{"height": 256, "width": 256, "steps": 4}, {"height": 512, "width": 512, "steps": 4}]` (each may give
    `num_frames`), in place of height/width/steps; the global step counts on across them and step-fraction schedules
    read it against the run's steps, as in a run whose driver gave `run_steps`.
    """
    stages = check_stages(stages, height=height, width=width, steps=steps, num_frames=num_frames)
    for stage in stages:
        check_run(**stage, batch=batch, cfg=cfg, text_tokens=text_tokens)
    config = load_config(config, preset=preset, **overrides)
    return Pricer(pipe_or_denoiser, batch=batch, cfg=cfg, text_tokens=text_tokens,
                  calibration=calibration).estimate(config, stages)
