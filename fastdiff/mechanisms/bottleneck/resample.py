"""Latent resizing for resolution-bottleneck sampling: exact within a stage, smooth between stages.

Within a low-resolution stage the pipeline keeps full-size latents that are the stage's true latents upsampled by
nearest neighbour, `up(y)`; the denoiser and the scheduler see `pick(x)`, every s-th latent of each row and column.
`pick(up(y)) == y` bit for bit, and every sampler update is linear in its tensors, so the pipeline's latents stay
exactly `up` of the stage's own and nothing is lost while the pipeline holds them. Between stages the clean
estimate is resized smoothly (bicubic, bilinear, area or Lanczos-3 on the unpacked latent) and re-noised.

Latents are (..., H, W) spatially, except packed ones (FLUX: (B, tokens, C * p * p), p x p latent patches per
token, row-major), which `unpack` / `pack` turn into (B, C, H, W) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError

METHODS = ("bicubic", "bilinear", "area", "lanczos")


def pick(x: torch.Tensor, s: int) -> torch.Tensor:
    """Every s-th latent along the last two (spatial) dims: the stage's latents inside up-sampled full-size ones."""
    return x if s == 1 else x[..., ::s, ::s].contiguous()


def up(y: torch.Tensor, s: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by s along the last two dims; `pick(up(y, s), s) == y` exactly."""
    return y if s == 1 else y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


def unpack(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h/p * w/p, C p p) packed tokens -> (B, C, h, w) latents."""
    b, n, d = tokens.shape
    c = d // (p * p)
    x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/p * w/p, C p p) tokens (the inverse of `unpack`)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _lanczos_weights(n_in: int, n_out: int, a: int = 3) -> torch.Tensor:
    """(n_out, n_in) Lanczos-a resampling matrix (antialiased when shrinking: the kernel widens by the factor)."""
    scale = n_in / n_out
    support = a * max(1.0, scale)
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    src = torch.arange(n_in, dtype=torch.float64)
    d = (src[None, :] - centers[:, None]) / max(1.0, scale)
    wts = torch.sinc(d) * torch.sinc(d / a) * (d.abs() < a)
    wts = torch.where((src[None, :] - centers[:, None]).abs() <= support, wts, torch.zeros_like(wts))
    return wts / wts.sum(1, keepdim=True)


def resize(x: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Smooth resize of the last two dims to `size` (any leading dims), in float32, back in x's dtype."""
    if method not in METHODS:
        raise ConfigError(f"bottleneck: resize must be one of {METHODS}, got {method!r}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    if method == "lanczos":
        wh = _lanczos_weights(x.shape[-2], size[0]).to(flat)
        ww = _lanczos_weights(x.shape[-1], size[1]).to(flat)
        out = torch.einsum("oh,nchw,pw->ncop", wh, flat, ww)
    elif method == "area":
        out = F.interpolate(flat, size=size, mode="area")
    else:
        shrink = size[0] < x.shape[-2]
        out = F.interpolate(flat, size=size, mode=method, align_corners=False, antialias=shrink)
    return out.reshape(*lead, *size).to(x.dtype)


def row_noise(first: torch.Tensor, shape: tuple, stage: int, dtype, device) -> torch.Tensor:
    """Fresh Gaussian noise of `shape` for re-noising at a stage, one generator per batch row seeded by a hash of
    that row's initial noise (`first`, the run's starting latents): deterministic for a seeded pipeline call, and a
    row gets the same noise whatever batch it runs in."""
    import hashlib

    rows = []
    for r in first.detach().to("cpu", torch.float32):
        seed = int.from_bytes(hashlib.blake2b(r.numpy().tobytes(), digest_size=8).digest(), "little")
        g = torch.Generator().manual_seed((seed + 1_000_003 * stage) % (2 ** 63))
        rows.append(torch.randn(shape[1:], generator=g))
    return torch.stack(rows).to(device=device, dtype=dtype)
