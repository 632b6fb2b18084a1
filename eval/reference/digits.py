"""`ref-digits`: a class-conditional DiT trained by this project on the bundled 16x16 digits.

Random-weight models make fidelity numbers meaningless; this one is small enough to train on a CPU in
minutes (`train_digits.py`) and real enough to judge: its samples are recognised by the reference
classifier, so an acceleration that breaks them shows up as lost class accuracy, not just lost PSNR.

The denoiser is a stock diffusers `DiTTransformer2DModel` in pixel space (no VAE) and the pipeline does
classifier-free guidance exactly as diffusers' `DiTPipeline` does (one batched call, cond half first,
unconditional rows carry the null class id), so the fastdiff DiT adapter sees what it sees on real DiTs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .data import NUM_CLASSES, SIZE, read_weights

NAME = "ref-digits"

# 6 blocks x 4 heads x 32 dims over 8x8 = 64 tokens: trains in ~23 min on one CPU thread; head dim 32
# keeps it friendly to attention kernels. out_channels=1: epsilon only, no learned variance.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
    sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
)
# Training uses the same noise schedule; the cosine schedule suits small images (a linear one destroys
# a 16x16 image's content within the first few hundred of its 1000 steps). Two sampler settings it needs:
# - lambda_min_clipped: the cosine schedule ends at alpha_bar ~ 2e-9, where DPM-Solver++'s x0 = (x - sigma eps) / alpha
#   multiplies the tiny epsilon error ~2e4-fold; without the clip every sample saturates (measured: 77% class
#   accuracy at guidance 3 instead of 100%). -5.1 is the value diffusers documents for this schedule.
# - clip_sample=False is for DDIM (other schedulers keep it in their config, so `DDIMScheduler.from_config(
#   pipe.scheduler.config)` inherits it): clipping x0 to [-1, 1] at every step distorts guided samples.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        lambda_min_clipped=-5.1, clip_sample=False)


def build_transformer(config: dict | None = None) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_config(dict(config or TRANSFORMER_CONFIG))


def build_scheduler(config: dict | None = None) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler.from_config(dict(config or SCHEDULER_CONFIG))


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional pixel-space sampling with a `DiTTransformer2DModel` and any diffusers scheduler.

    Swap samplers the diffusers way: `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Sample one 16x16 digit per entry of `class_labels` (ints 0..9).

        Args:
            class_labels: an int, a list of ints or a tensor of class ids.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance scale; <= 1 runs the conditional branch only.
            generator: one generator, or one per sample (then each sample is independent of the batch).
            output_type: "pt" -> (N, 1, 16, 16) tensor in [0, 1]; "np" -> (N, 16, 16, 1) array; "pil".
        """
        device = self._execution_device
        model = self.transformer
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= model.config.num_embeds_ada_norm:
            raise ValueError(f"class_labels must be ids in 0..{model.config.num_embeds_ada_norm - 1}, got {class_labels}")
        n, size, channels = labels.numel(), model.config.sample_size, model.config.in_channels

        latents = randn_tensor((n, channels, size, size), generator=generator, device=device, dtype=model.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        cfg = guidance_scale > 1
        # DiTPipeline's layout: cond rows first, then the same latents with the null class id (= num classes).
        null = torch.full_like(labels, model.config.num_embeds_ada_norm)
        model_labels = torch.cat([labels, null]) if cfg else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = model(x, timestep=t.expand(x.shape[0]), class_labels=model_labels).sample
            if cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "np" or output_type == "pil":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def load(device="cpu", dtype: torch.dtype = torch.float32, weights: str | Path | None = None) -> DigitsPipeline:
    """The committed `ref-digits` pipeline (eval mode, progress bar off); `weights` reads another directory.

    Deterministic: the weights are read, never initialised, and the caller's RNG state is left as it was.
    """
    from safetensors.torch import load as load_bytes

    config = json.loads(read_weights(f"{NAME}.json", weights))
    with torch.random.fork_rng(devices=[]):  # from_config initialises weights we then overwrite
        transformer = build_transformer(config["transformer"])
    state = load_bytes(read_weights(f"{NAME}.safetensors", weights))
    transformer.load_state_dict({k: v.float() for k, v in state.items()})  # stored as float16 to stay small
    transformer = transformer.eval().to(device)
    if dtype != torch.float32:  # .to(dtype) warns even when it is a no-op
        transformer = transformer.to(dtype)
    pipe = DigitsPipeline(transformer, build_scheduler(config["scheduler"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe
