"""What a reference model is, as data: its parts (diffusers models built from a config), how training calls them,
the pipeline that samples with them, its data set — and the one loader and writer all reference models share.

Files in `weights/`, per model `NAME`: `NAME.json` (one config per part, `_class_name` included, and the
scheduler's) and `NAME.safetensors` (float16; a model with one part stores its keys as they are, a model with
several prefixes each key with its part's name: `unet.conv_in.weight`, `class_embedding.embedding.weight`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .data import read_weights

# The noise schedule training uses and the sampler every reference model ships with. The cosine schedule suits
# small images (a linear one destroys a 16x16 image's content within the first few hundred of its 1000 steps).
# Two sampler settings it needs:
# - lambda_min_clipped: the cosine schedule ends at alpha_bar ~ 2e-9, where DPM-Solver++'s x0 = (x - sigma eps) / alpha
#   multiplies the tiny epsilon error ~2e4-fold; without the clip every sample saturates (measured on ref-digits:
#   77% class accuracy at guidance 3 instead of 100%). -5.1 is the value diffusers documents for this schedule.
# - clip_sample=False is for DDIM (other schedulers keep it in their config, so `DDIMScheduler.from_config(
#   pipe.scheduler.config)` inherits it): clipping x0 to [-1, 1] at every step distorts guided samples.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        lambda_min_clipped=-5.1, clip_sample=False)
# ref-unet and ref-textures: the same, with timesteps spaced as SD pipelines space them ("leading", steps_offset 1;
# DPM-Solver++ built with `from_config(sd_pipe.scheduler.config)` inherits them), so 20 steps start at t=941 instead
# of t=995. At t=995 the cosine schedule leaves alpha ~0.006, and x0 = (x - sigma eps) / alpha multiplies the epsilon
# error ~160-fold: on these two models a large part of the samples blow up (measured at 20 steps, guidance 3: ref-unet
# 47% class accuracy instead of 97%, ref-textures 38% instead of 82%; DDIM, whose default spacing is leading, is
# fine on both). ref-digits predicts epsilon there precisely enough and keeps linspace.
LEADING_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "timestep_spacing": "leading", "steps_offset": 1}
LINSPACE_ABLATION = (" with linspace timesteps", {"timestep_spacing": "linspace", "steps_offset": 0})


def build_scheduler(config: dict | None = None):
    """The sampler of a config (its `_class_name`; DPM-Solver++ when it names none)."""
    import diffusers

    config = dict(config or SCHEDULER_CONFIG)
    return getattr(diffusers, config.get("_class_name", "DPMSolverMultistepScheduler")).from_config(config)


@dataclass(frozen=True)
class Recipe:
    """One reference model.

    Args:
        name: registry name ("ref-unet").
        dataset: the data it is trained on and judged by ("digits", "textures"; see `data.py`).
        size: image side in pixels (the model works in pixel space): the full size it samples at.
        parts: part name -> config of the diffusers model built for it (in build order).
        build: {part: config} -> {part: freshly initialised module}.
        predict: ({part: module}, noisy images, timesteps, class ids) -> the prediction: the training forward,
            with the null class id (= number of classes) for unconditional rows. "epsilon" objective: integer
            timesteps, predicts the noise; "flow": sigmas in [0, 1], predicts the velocity noise - image.
        pipeline: ({part: module}, scheduler) -> the pipeline that samples with them.
        describe: ({part: module}) -> the model card's paragraph on the denoiser (markdown list items).
        scheduler: the sampler's config (training uses its noise schedule).
        ablation: (note, overrides) of the scheduler config: a sampler setting the model card shows the model
            without, to say why the config has it.
        objective: "epsilon" (DDPM noise prediction on the scheduler's alphas) or "flow" (rectified flow:
            x_t = (1 - sigma) x + sigma noise, sigma uniform in [0, 1], target noise - x).
        sizes: the resolutions training draws each batch at (default: `size` only).
        scheduler_class: the diffusers class of the sampler.
        other_sampler: a second sampler class the card evaluates (None: none).
        probe_sizes: sizes below the trained ones the card evaluates, to show where the model stops working.
        variant: (width, sizes, name) -> the same recipe at another size (None: fixed), for `train.py --width`.
    """

    name: str
    dataset: str
    size: int
    parts: dict
    build: Callable[[dict], dict]
    predict: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    pipeline: Callable[[dict, object], object]
    describe: Callable[[dict], str]
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    ablation: tuple = (" without lambda_min_clipped", {"lambda_min_clipped": -float("inf")})
    objective: str = "epsilon"
    sizes: tuple = ()
    scheduler_class: str = "DPMSolverMultistepScheduler"
    other_sampler: str | None = "DDIMScheduler"
    probe_sizes: tuple = ()
    variant: Callable | None = None

    @property
    def train_sizes(self) -> tuple:
        return tuple(self.sizes) or (self.size,)

    def scheduler_config(self) -> dict:
        return {**self.scheduler, "_class_name": self.scheduler_class}

    def config(self, parts: dict) -> dict:
        """The JSON written beside the weights."""
        out = {k: {**self.parts[k], "_class_name": type(m).__name__} for k, m in parts.items()}
        out["scheduler"] = self.scheduler_config()
        return out

    def save(self, parts: dict, out: Path, training: dict | None = None) -> None:
        """Weights and config into `out`; `training`: the run's settings and statistics, kept in the JSON."""
        from safetensors.torch import save_file

        single = len(parts) == 1
        state = {(k if single else f"{name}.{k}"): v.half().contiguous()
                 for name, m in parts.items() for k, v in m.state_dict().items()}
        save_file(state, str(out / f"{self.name}.safetensors"))
        config = self.config(parts)
        if training is not None:
            config["training"] = training
        (out / f"{self.name}.json").write_text(json.dumps(config, indent=2) + "\n")

    def load(self, device="cpu", dtype: torch.dtype = torch.float32, weights: str | Path | None = None):
        """The committed pipeline (eval mode, progress bar off); `weights` reads another directory.

        Deterministic: the weights are read, never initialised, and the caller's RNG state is left as it was.
        """
        from safetensors.torch import load as load_bytes

        config = json.loads(read_weights(f"{self.name}.json", weights))
        with torch.random.fork_rng(devices=[]):  # from_config initialises weights we then overwrite
            parts = self.build({k: config[k] for k in self.parts})
        state = load_bytes(read_weights(f"{self.name}.safetensors", weights))
        for name, module in parts.items():
            prefix = "" if len(parts) == 1 else f"{name}."
            # stored as float16 to stay small; loaded as float32
            module.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})
            module = module.eval().to(device)
            if dtype != torch.float32:  # .to(dtype) warns even when it is a no-op
                module = module.to(dtype)
            parts[name] = module
        pipe = self.pipeline(parts, build_scheduler(config["scheduler"]))
        pipe.set_progress_bar_config(disable=True)
        return pipe
