"""Resolution-bottleneck sampling in ComfyUI: a sampler function for a `comfy.samplers.KSAMPLER` (the SAMPLER that
SamplerCustom / SamplerCustomAdvanced take), for flow-matching models (Flux, SD3, Wan, ...).

The run's steps (the sigmas the sampler is given: their count; the run must start from pure noise) are split into
the stages (`bottleneck.schedule.split_steps`); each stage runs ComfyUI's own Euler sampler
(`comfy.k_diffusion.sampling.sample_euler`) on its latent size, from its strength down to a clean estimate, on its
own sigmas: the model's own `model_sampling` rule (its `sigma(timestep)`, evaluated with the stage's shift) on a
uniform time grid from the stage's strength to 0 — with the model's shift that is ComfyUI's "simple" schedule. The
shift of a stage: Flux' (an exponential time shift, mu) moves along the resolution rule ComfyUI's ModelSamplingFlux
node and diffusers' FLUX pipelines use (mu linear in the token count, 0.5 at 256 tokens to 1.15 at 4096) from the
model's own mu at full size; a model whose shift is one number whatever the size (SD3, Wan: ModelSamplingSD3)
keeps it in every stage, as fastdiff's `schedule.shift_factor` does for a scheduler without dynamic shifting; a
stage's `shift` fixes it. Between stages the clean estimate is resized (`bottleneck.resample.resize`) and re-noised
at the next stage's first sigma with fresh per-row noise (`resample.row_noise`) by the model's own
`noise_scaling`. The model derives positions from the latent shape (ComfyUI's Flux, SD3 and Wan do), so a stage
only hands it smaller latents. The output has the full size.

A single full-size stage from strength 1 is ComfyUI's Euler sampler on that stage's sigmas, bit for bit.

Caching and CFG skipping nodes on the same MODEL compose: the fastdiff run of the sampling call (the host's
`ComfyRun`) is told each stage's start and sigmas (`ComfyRun.begin_stage`), so steps count on across stages and
per-grid state is never reused on another size. Refused before the first step: non-flow models, a run that starts
part-way (denoise < 1: img2img), an inpainting mask, a latent size a stage's scale does not divide.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, FastDiffError, UnsupportedModelError
from ..mechanisms.bottleneck import resample
from ..mechanisms.bottleneck.schedule import DYNAMIC_RULE, STRENGTH_RULES, Stage, split_steps

RUN_KEY = "fastdiff_run"


def is_flow(model_sampling) -> bool:
    """A flow-matching model_sampling: x = sigma noise + (1 - sigma) x0, velocity output (ComfyUI's CONST)."""
    return any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


def parse_stages(stages) -> tuple[Stage, ...]:
    """Stages from [{"scale", "steps", "strength", "shift"?}, ...]; ConfigError when they cannot run."""
    if not stages:
        raise ConfigError("fastdiff bottleneck sampler: needs at least one stage")
    out = []
    for i, st in enumerate(stages):
        extra = set(st) - {"scale", "steps", "strength", "shift"}
        if extra:
            raise ConfigError(f"fastdiff bottleneck sampler: stage {i} has unknown keys {sorted(extra)}")
        stage = Stage(st.get("scale", 1), st.get("steps", 0.5), st.get("strength", 1.0), st.get("shift"))
        if isinstance(stage.scale, bool) or not isinstance(stage.scale, int) or stage.scale < 1:
            raise ConfigError(f"fastdiff bottleneck sampler: stage {i} scale must be an int >= 1, got {stage.scale!r}")
        if not 0 < stage.strength <= 1:
            raise ConfigError(f"fastdiff bottleneck sampler: stage {i} strength must be in (0, 1], got "
                              f"{stage.strength!r}")
        if i == 0 and stage.strength != 1:
            raise ConfigError("fastdiff bottleneck sampler: the first stage starts from pure noise (strength 1), got "
                              f"{stage.strength!r}")
        out.append(stage)
    if out[-1].scale != 1:
        raise ConfigError(f"fastdiff bottleneck sampler: the last stage must be full size (scale 1), got "
                          f"{out[-1].scale}")
    split_steps(max(len(out), 100), tuple(out))  # checks each stage's steps
    return tuple(out)


@dataclass
class StageRun:
    """What one stage ran: its scale, latent size, steps and sigmas (from the first to the terminal 0), shift."""

    scale: int
    size: tuple[int, ...]
    steps: int
    sigmas: list[float]
    shift: float


@dataclass
class BottleneckSampler:
    """The sampler function of a KSAMPLER (`__call__`, as ComfyUI calls it) and its last run's stages (`last`,
    `report`)."""

    stages: tuple[Stage, ...]
    resize: str = "bicubic"
    strength_is: str = "time"
    last: list[StageRun] = field(default_factory=list)
    report: str = ""
    speedup: float | None = None  # the last run's estimated FLOPs speedup over its steps at full size

    def __post_init__(self):
        if self.resize not in resample.METHODS:
            raise ConfigError(f"fastdiff bottleneck sampler: resize must be one of {resample.METHODS}, got "
                              f"{self.resize!r}")
        if self.strength_is not in STRENGTH_RULES:
            raise ConfigError(f"fastdiff bottleneck sampler: strength_is must be one of {STRENGTH_RULES}, got "
                              f"{self.strength_is!r}")

    # -- the stages' schedule -----------------------------------------------------------------------------
    def shift_of(self, model_sampling, stage: Stage, tokens: int, full_tokens: int) -> float:
        """The stage's shift, in the model's own units (Flux: mu; SD3 / Wan: the time-SNR shift factor)."""
        if stage.shift is not None:
            return float(stage.shift)
        shift = float(model_sampling.shift)
        if any(c.__name__ == "ModelSamplingFlux" for c in type(model_sampling).__mro__):  # ComfyUI subclasses it
            base, top, lo, hi = DYNAMIC_RULE  # Flux' resolution rule: mu linear in the image tokens
            return shift + (hi - lo) / (top - base) * (tokens - full_tokens)
        return shift

    def stage_sigmas(self, model_sampling, stage: Stage, steps: int, shift: float) -> torch.Tensor:
        """The stage's `steps` + 1 sigmas (the last 0): the model's own sigma(timestep) at `shift` on a uniform
        time grid from the stage's start (its strength as a time, or the time whose sigma is its strength)."""
        cls = type(model_sampling)
        stand_in = types.SimpleNamespace(shift=shift, multiplier=getattr(model_sampling, "multiplier", 1.0))

        def sigma(t: torch.Tensor) -> torch.Tensor:  # the model's rule at this shift, for times t in [0, 1]
            return cls.sigma(stand_in, cls.timestep(stand_in, t))

        w = float(stage.strength)
        start = w
        if self.strength_is == "sigma" and w < 1:
            lo, hi = 0.0, 1.0  # the rule is increasing in t: bisect for sigma(t) = w
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if float(sigma(torch.tensor(mid, dtype=torch.float64))) < w else (lo, mid)
            start = (lo + hi) / 2
        t = torch.linspace(start, 0.0, steps + 1)[:-1]
        return torch.cat([sigma(t).float(), torch.zeros(1)])

    def _speedup(self, guider, full: tuple[int, ...]) -> float | None:
        """Dense FLOPs of the run's steps at full size over those of the stages that ran, by the cost model of the
        ComfyUI adapters (None: a model they do not describe)."""
        from ..adapters import comfyui as comfy_adapters
        from ..context import TokenLayout
        from ..cost.model import CostModel
        from .comfyui import _text_tokens

        try:
            adapter = comfy_adapters.resolve(guider.inner_model.diffusion_model)
        except UnsupportedModelError:
            return None
        spec, cost = adapter.spec, CostModel(adapter)
        text = _text_tokens(guider) or spec.text_tokens
        text = text if spec.text_position != "none" else 0

        def flops(size):
            frames = size[0] if len(size) == 3 else 1
            grid = spec.latent_grid(None, frames, size[-2], size[-1])
            return cost.call_flops(TokenLayout(grid, text, spec.text_position))

        ran = sum(st.steps * flops(st.size) for st in self.last)
        return sum(st.steps for st in self.last) * flops(full) / ran

    # -- KSAMPLER's sampler function ----------------------------------------------------------------------
    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        from comfy.k_diffusion.sampling import sample_euler  # ComfyUI, only when a sampler runs

        extra_args = {} if extra_args is None else dict(extra_args)
        guider = model.inner_model
        ms = guider.inner_model.model_sampling
        name = type(guider.inner_model.diffusion_model).__name__
        if not is_flow(ms):
            raise UnsupportedModelError(
                f"{name} in ComfyUI: the fastdiff bottleneck sampler runs flow-matching models (Flux, SD3, Wan, ...: "
                f"model_sampling CONST); this one samples with {type(ms).__name__}")
        if extra_args.get("denoise_mask") is not None:
            raise UnsupportedModelError("fastdiff bottleneck sampler: an inpainting mask (noise_mask) cannot follow "
                                        "the latent through the stages' sizes; sample without a mask")
        n = len(sigmas) - 1
        if n < 1:
            return x
        if not math.isclose(float(sigmas[0]), float(ms.sigma_max), rel_tol=1e-4):
            raise ConfigError(
                f"fastdiff bottleneck sampler: the run starts part-way (sigma {float(sigmas[0]):.4g}, the model's "
                f"largest is {float(ms.sigma_max):.4g}: denoise < 1, img2img); its stages start from pure noise")
        if float(sigmas[-1]) != 0.0:
            raise ConfigError("fastdiff bottleneck sampler: the sigmas must end at 0 (each stage ends at a clean "
                              "estimate)")
        size = tuple(x.shape[-2:])
        for st in self.stages:
            if size[0] % st.scale or size[1] % st.scale:
                raise ConfigError(f"fastdiff bottleneck sampler: the latent's {size[0]}x{size[1]} is not divisible "
                                  f"by stage scale {st.scale}")
        counts = split_steps(n, self.stages)
        patch = getattr(guider.inner_model.diffusion_model, "patch_size", 1)
        patch = patch[-1] if isinstance(patch, (tuple, list)) else (patch or 1)
        frames = x.shape[2] if x.ndim == 5 else 1
        full_tokens = frames * math.ceil(size[0] / patch) * math.ceil(size[1] / patch)
        run = ((extra_args.get("model_options") or {}).get("transformer_options") or {}).get(RUN_KEY)
        first = x
        done, self.last = 0, []
        for k, (st, steps) in enumerate(zip(self.stages, counts)):
            hs, ws = size[0] // st.scale, size[1] // st.scale
            tokens = frames * math.ceil(hs / patch) * math.ceil(ws / patch)
            shift = self.shift_of(ms, st, tokens, full_tokens)
            stage_sigmas = self.stage_sigmas(ms, st, steps, shift).to(sigmas)
            if k == 0:
                x = resample.pick(x, st.scale)
            else:  # the previous stage's clean estimate, resized and re-noised at this stage's first sigma
                x0 = resample.resize(x, (hs, ws), self.resize)
                noise = resample.row_noise(first, x0.shape, k, x0.dtype, x0.device)
                x = ms.noise_scaling(stage_sigmas[0], noise, x0)
            if run is not None:
                run.begin_stage(k, done, stage_sigmas)
            offset = done
            stage_callback = None if callback is None else \
                (lambda info, offset=offset: callback({**info, "i": info["i"] + offset}))
            x = sample_euler(model, x, stage_sigmas, extra_args=extra_args, callback=stage_callback, disable=disable)
            self.last.append(StageRun(st.scale, tuple(x.shape[2:]), steps, [float(s) for s in stage_sigmas], shift))
            done += steps
        self.speedup = self._speedup(guider, tuple(first.shape[2:]))
        self.report = "fastdiff bottleneck: " + "; ".join(
            f"stage {i}: scale {s.scale} ({'x'.join(map(str, s.size))}), {s.steps} steps, sigma {s.sigmas[0]:.3f}->0, "
            f"shift {s.shift:.3f}" for i, s in enumerate(self.last))
        if self.speedup is not None:
            self.report += f"; estimated speedup {self.speedup:.2f}x FLOPs over the same steps at full size"
        if all(s.scale == 1 for s in self.last):
            note = ("fastdiff: the bottleneck sampler does nothing in this run: every stage runs at full size "
                    "(scale 1), so it is Euler sampling on the model's own schedule")
            logging.getLogger("fastdiff.comfyui").warning(note)
            self.report += "\n" + note
        print(self.report)
        if tuple(x.shape[-2:]) != size:
            raise FastDiffError(f"fastdiff bottleneck sampler: the last stage ended at {tuple(x.shape[-2:])}, not the "
                                f"full size {size}")
        return x
