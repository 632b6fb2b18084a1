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


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) — FID's formula in any feature space.

    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 with symmetric square roots
    (eigh), so identical sets give 0 up to rounding.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a + s_b - 2 * cross))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def fid_inception(x: torch.Tensor, ref: torch.Tensor, weights: str) -> float:
    """FID with torchmetrics' Inception network from a LOCAL weights file (nothing is downloaded).

    Get the file once on a machine with internet (torch-fidelity's `pt_inception-2015-12-05-6726825d.pth`)
    and pass its path; images are (N, 3|1, H, W) in [0, 1] (grey images are repeated to 3 channels).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)
    rgb = lambda t: _as_images(t).expand(-1, 3, -1, -1) if _as_images(t).shape[1] == 1 else _as_images(t)  # noqa: E731
    fid.update(rgb(ref), real=True)
    fid.update(rgb(x), real=False)
    return float(fid.compute())
