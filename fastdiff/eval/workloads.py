"""What a benchmark runs: a pipeline plus the call that makes one batch of samples, rebuilt fresh per run
(generators are consumed by a call) so every configuration sees the same seeds.

- "ref-digits", "ref-unet", "ref-textures" (the names of `fastdiff.eval.reference`): models this project trained
  (a DiT on digits, a UNet2DConditionModel on digits, a DiT on photograph crops); fidelity numbers mean something.
- a family name of `fastdiff.eval.tiny` ("dit", "flux", ...): seeded random weights; good for latency and for
  checking that a method runs, while its fidelity numbers are optimistic — reports say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastdiff.integrations.diffusers import find_parts

from . import tiny


@dataclass
class Workload:
    name: str
    pipe: Any
    make_kwargs: Callable[..., dict]  # (indices=None) -> a fresh call (new generators) for those sample indices
    to_images: Callable[[Any], torch.Tensor]  # pipeline output -> (N, C, H, W) tensor
    trained: bool  # False: random weights, fidelity is not meaningful
    describe: str
    data_range: float | None = None  # None: images in [0, 1]; else the baseline's value range (latents)
    samples: int = 0


def load(name: str, *, samples: int, steps: int, seed: int = 0, guidance: float | None = None) -> Workload:
    reference = _reference()
    if reference is not None and name in reference.names():
        pipe = reference.load(name)
        pipe.set_progress_bar_config(disable=True)
        scale = 3.0 if guidance is None else guidance  # the model cards' headline setting
        classes = reference.num_classes(name)

        def make(indices=None):
            # sample i is class i % classes from generator seed + i, whatever batch it runs in
            indices = range(samples) if indices is None else indices
            return dict(class_labels=[i % classes for i in indices], num_inference_steps=steps, guidance_scale=scale,
                        generator=[torch.Generator().manual_seed(seed + i) for i in indices], output_type="pt")

        denoiser = type(find_parts(pipe)[1]).__name__
        return Workload(name, pipe, make, lambda out: out.images, True,
                        f"{name} ({denoiser} trained by fastdiff), {samples} samples (classes 0-{classes - 1} cycled), "
                        f"{steps} steps, CFG {scale}, {type(pipe.scheduler).__name__}", samples=samples)
    if name in tiny.FAMILIES:
        pipe = tiny.build_pipeline(name)

        def make(indices=None):
            # the embeddings of all samples are drawn once; a subset takes its rows, so sample i is the same
            # whatever batch it runs in
            indices = list(range(samples) if indices is None else indices)
            kw = tiny.pipeline_kwargs(name, batch_size=samples, steps=steps, seed=seed)
            out = {}
            for key, value in kw.items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == samples:
                    value = value[indices]
                elif isinstance(value, list) and len(value) == samples:
                    value = [value[i] for i in indices]
                out[key] = value
            out["generator"] = [torch.Generator().manual_seed(seed + i) for i in indices]
            return out

        return Workload(name, pipe, make, tiny.output_tensor, False,
                        f"tiny {name} ({type(find_parts(pipe)[1]).__name__}, seeded RANDOM weights: fidelity "
                        f"is not meaningful), {samples} samples, {steps} steps", samples=samples)
    known = (reference.names() if reference is not None else []) + list(tiny.FAMILIES)
    raise ValueError(f"unknown workload {name!r}; known: {known}")


def _reference():
    """The reference-model registry, or None where it is not installed."""
    try:
        from . import reference
    except ImportError:
        return None
    return reference if hasattr(reference, "names") else None
