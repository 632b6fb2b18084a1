"""Paired fidelity of an accelerated output to the baseline output of the same seeds.

PSNR is computed here (it is one line and must give inf for identical images); SSIM comes from
torchmetrics, which needs no downloaded weights. Images are (N, C, H, W) in [0, 1]; latents are
compared over the baseline's own value range (`data_range`), which the caller passes.
"""

from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole batch; inf when identical."""
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (torchmetrics, gaussian window); images smaller than the window use a smaller kernel."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    x, ref = _as_images(x), _as_images(ref)
    k = min(11, min(x.shape[-2:]) // 2 * 2 - 1)  # odd, at most the image size
    return float(tm_ssim(x.double(), ref.double(), data_range=data_range, kernel_size=max(k, 3)))


def _as_images(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) view of image or video tensors: frames become batch entries."""
    if t.ndim == 5:  # (N, C, F, H, W) latents or (N, F, C, H, W) frames: fold the 3rd dim into the batch
        t = t.transpose(1, 2).flatten(0, 1)
    return t
