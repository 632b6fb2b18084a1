"""The thin pipelines the reference models sample through: class-conditional, pixel space, any diffusers scheduler.

Both lay out classifier-free guidance exactly as the production pipeline of their denoiser does, so fastdiff's
adapters see what they see on real models:

- `ClassDiTPipeline` (a `DiTTransformer2DModel`): as diffusers' `DiTPipeline` — one batched call, cond half first,
  the unconditional rows carry the null class id (= number of classes); the DiT adapter reads each row's branch
  from those ids.
- `ClassUNetPipeline` (a `UNet2DConditionModel`): as `StableDiffusionPipeline` — the class is a learned sequence of
  embeddings passed as `encoder_hidden_states` (where SD passes CLIP text states) into the cross-attentions; one
  batched call, unconditional half first (the null class's embeddings), `do_classifier_free_guidance` says
  whether CFG is on. This module registers that layout (`fastdiff.register_pipeline`, below): the UNet adapter
  lists only diffusers' own pipelines.

Swap samplers the diffusers way: `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.
"""

from __future__ import annotations

import torch
from diffusers import (
    ConfigMixin,
    DiffusionPipeline,
    DiTTransformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    ModelMixin,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

import fastdiff


class ClassEmbedding(ModelMixin, ConfigMixin):
    """Class id -> `tokens` learned embeddings of width `dim`: the `encoder_hidden_states` of a class-conditional
    UNet (its 'prompt'). Id `num_classes` is the null class, the unconditional branch of CFG."""

    @register_to_config
    def __init__(self, num_classes: int = 10, tokens: int = 4, dim: int = 64):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, tokens * dim)
        torch.nn.init.normal_(self.embedding.weight, std=1.0)  # unit scale, as normalised text states are

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) class ids -> (N, tokens, dim)."""
        return self.embedding(labels).view(len(labels), self.config.tokens, self.config.dim)


class _ClassPipeline(DiffusionPipeline):
    """Shared sampling loop: noise -> `scheduler` steps of guided epsilon -> images in [0, 1]."""

    denoiser_name: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    def _eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Guided epsilon for latents `x` (N, C, H, W) of classes `labels` at timestep `t`."""
        raise NotImplementedError

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
        """Sample one image per entry of `class_labels`.

        Args:
            class_labels: an int, a list of ints or a tensor of class ids (0 .. num_classes - 1).
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance scale; <= 1 runs the conditional branch only.
            generator: one generator, or one per sample (then each sample is independent of the batch).
            output_type: "pt" -> (N, C, H, W) tensor in [0, 1]; "np" -> (N, H, W, C) array; "pil".
        """
        device = self._execution_device
        model = self.denoiser
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be ids in 0..{self.num_classes - 1}, got {class_labels}")
        n, size, channels = labels.numel(), model.config.sample_size, model.config.in_channels

        latents = randn_tensor((n, channels, size, size), generator=generator, device=device, dtype=model.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self._guidance_scale = guidance_scale
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self._eps(latents, t, labels)
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


class ClassDiTPipeline(_ClassPipeline):
    """Class-conditional pixel-space sampling with a `DiTTransformer2DModel`, CFG batched as in `DiTPipeline`."""

    model_cpu_offload_seq = "transformer"
    denoiser_name = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def _eps(self, x, t, labels):
        cfg = self.do_classifier_free_guidance
        # DiTPipeline's layout: cond rows first, then the same latents with the null class id (= num classes).
        model_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if cfg else labels
        x = torch.cat([x, x]) if cfg else x
        x = self.scheduler.scale_model_input(x, t)
        eps = self.transformer(x, timestep=t.expand(x.shape[0]), class_labels=model_labels).sample
        if cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + self._guidance_scale * (cond - uncond)
        return eps


class ClassUNetPipeline(_ClassPipeline):
    """Class-conditional pixel-space sampling with a `UNet2DConditionModel` whose cross-attentions read the
    class embeddings (`class_embedding`), CFG batched as in `StableDiffusionPipeline` (uncond half first)."""

    model_cpu_offload_seq = "class_embedding->unet"
    denoiser_name = "unet"

    def __init__(self, unet: UNet2DConditionModel, class_embedding: ClassEmbedding, scheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedding=class_embedding, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.class_embedding.config.num_classes

    def _eps(self, x, t, labels):
        cfg = self.do_classifier_free_guidance
        states = self.class_embedding(labels).to(self.unet.dtype)
        if cfg:  # StableDiffusionPipeline: torch.cat([negative_prompt_embeds, prompt_embeds])
            null = self.class_embedding(torch.full_like(labels, self.num_classes)).to(self.unet.dtype)
            states = torch.cat([null, states])
        x = torch.cat([x, x]) if cfg else x
        x = self.scheduler.scale_model_input(x, t)
        eps = self.unet(x, t, encoder_hidden_states=states).sample
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + self._guidance_scale * (cond - uncond)
        return eps


# StableDiffusionPipeline's CFG layout (one batched call, unconditional half first, do_classifier_free_guidance),
# registered here because the UNet adapter lists the diffusers pipelines only.
fastdiff.register_pipeline(ClassUNetPipeline, fastdiff.CfgLayout("batched", "uncond"), family="unet")


class ClassFluxPipeline(FluxPipeline):
    """Class-conditional pixel-space sampling with a `FluxTransformer2DModel`, through diffusers' own
    `FluxPipeline.__call__`: packed 2x2 latents with `img_ids`, `FlowMatchEulerDiscreteScheduler` with its
    resolution-dependent shift, true CFG as two calls per step (cond, then uncond, in `cache_context`s).

    The class is the prompt: `class_embedding` gives the `prompt_embeds` (tokens x joint_attention_dim) and
    `pooled_embedding` the `pooled_prompt_embeds`; the null class's pair is the negative prompt. No VAE and no
    text encoders: the "latents" are the pixels, so `vae_scale_factor` is 1 and `height`/`width` are pixels.
    Everything else a `FluxPipeline` call takes (`sigmas`, `latents`, callbacks, ...) passes through.
    """

    model_cpu_offload_seq = "class_embedding->pooled_embedding->transformer"
    _optional_components = []

    def __init__(self, transformer: FluxTransformer2DModel, class_embedding: ClassEmbedding,
                 pooled_embedding: ClassEmbedding, scheduler, sample_size: int = 32):
        DiffusionPipeline.__init__(self)  # not FluxPipeline's: it would register a VAE and four text modules
        self.register_modules(transformer=transformer, class_embedding=class_embedding,
                              pooled_embedding=pooled_embedding, scheduler=scheduler)
        self.register_to_config(sample_size=sample_size)
        # What FluxPipeline.__call__ reads: pixel space (scale 1, 2x2 packing), no text encoders.
        self.vae_scale_factor = 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=2)
        self.vae = self.text_encoder = self.text_encoder_2 = self.tokenizer = self.tokenizer_2 = None
        self.tokenizer_max_length = class_embedding.config.tokens
        self.default_sample_size = sample_size

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def num_classes(self) -> int:
        return self.class_embedding.config.num_classes

    def class_prompt(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) of class ids (the null id = num_classes is the negative prompt)."""
        dtype = self.transformer.dtype
        return (self.class_embedding(labels).to(dtype),
                self.pooled_embedding(labels).flatten(1).to(dtype))

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator=None, output_type: str = "pt", return_dict: bool = True, size: int | None = None,
                 **flux_kwargs):
        """Sample one image per entry of `class_labels` at `size` px (default: the trained full size).

        guidance_scale: true-CFG scale (`true_cfg_scale` of FluxPipeline); <= 1 runs the conditional branch only.
        output_type: "pt" -> (N, C, size, size) in [0, 1]; "np"; "pil"; "latent" -> the packed latents.
        """
        device = self._execution_device
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be ids in 0..{self.num_classes - 1}, got {class_labels}")
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        size = size or self.config.sample_size
        cond, pooled = self.class_prompt(labels)
        null, null_pooled = self.class_prompt(torch.full_like(labels, self.num_classes))
        latents = super().__call__(
            prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=null,
            negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=guidance_scale, height=size, width=size,
            num_inference_steps=num_inference_steps, generator=generator, output_type="latent",
            max_sequence_length=cond.shape[1], **flux_kwargs).images
        if output_type == "latent":
            return ImagePipelineOutput(images=latents) if return_dict else (latents,)
        images = (self._unpack_latents(latents, size, size, self.vae_scale_factor).float() / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# FluxPipeline's true CFG, which ClassFluxPipeline.__call__ runs: the class's call first, then the null class's
fastdiff.register_pipeline(ClassFluxPipeline, fastdiff.CfgLayout("separate", "cond", None), family="flux")
