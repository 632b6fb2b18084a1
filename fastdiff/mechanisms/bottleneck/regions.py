"""Region-adaptive upsampling (RALU-style): a bottleneck stage whose edge-rich regions already run at full size.

A region stage (`{scale: 2, regions: r}`) sits between a stage before it and a full-size stage after it. At its start
the previous stage's clean estimate is scored for edges (`edge_score`: Sobel magnitude of the clean latent at the
stage's half resolution, summed over each half-resolution token's patch), and the top fraction r of the half-resolution
tokens ("cells") are upsampled: each becomes its 2x2 full-size tokens; the other cells stay one coarse token each. Both
parts are re-noised from the clean estimate at the stage's first sigma, as every stage is; at the stage after it all
tokens are full size (the coarse cells' clean estimate resized smoothly, the fine ones' kept).

The driver's invariant holds: the pipeline keeps full-size latents. A coarse cell holds its half-resolution latents
nearest-upsampled (`resample.up`), a fine cell its own. The denoiser and the scheduler see the mixed token set
(`tokens`: each coarse cell's one token, the pick of its block, then every fine token), and what they give back is put
in place (`place`), so `tokens(place(y)) == y` exactly. Which cells are fine is read back off the latents themselves
(`read_cells`: a coarse cell is exactly an upsampled block; a fine cell, re-noised with fresh Gaussian noise, is not),
so each batch row keeps its own regions, CFG's branches of a row see the same ones, and no state is kept per call.

Positions: a mixed set lives in the full-size frame, fine tokens at their full-size (row, col) and a coarse token at
the centre of the 2x2 it covers (2I + 0.5, 2J + 0.5). A set of coarse tokens only (r = 0) is the plain half-resolution
grid at its own positions, one of fine tokens only (r = 1) the plain full grid: the stage is then exactly a plain stage
at scale 2 or 1. 0 < r < 1 always upsamples at least one cell and keeps at least one coarse (`fine_count`). FLUX takes
one set of positions per call (`img_ids`), so rows with different regions run as separate denoiser calls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ...errors import ConfigError, FastDiffError, UnsupportedModelError
from . import resample
from .driver import FLOW_SCHEDULERS, Driver
from .schedule import stage_sigmas

SCALE = 2  # a region stage's coarse cells are half the side; its fine tokens full size
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


# -- the regions --------------------------------------------------------------------------------------------------
def fine_count(fraction: float, cells: int) -> int:
    """Cells a region stage upsamples: round(fraction * cells), kept within [1, cells - 1] when 0 < fraction < 1 so
    that the set is really mixed (0 and 1 are the plain stages at scale 2 and 1)."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return cells
    return min(cells - 1, max(1, math.floor(fraction * cells + 0.5)))


def edge_score(x0: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) clean latents -> (B, h/patch, w/patch) edge score per token cell: the Sobel gradient magnitude of
    each channel (replicate padding), summed over channels and over the cell's patch x patch latents."""
    b, c, h, w = x0.shape
    x = F.pad(x0.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    k = torch.stack([_SOBEL, _SOBEL.t()]).unsqueeze(1).to(x)
    g = F.conv2d(x, k)  # (B C, 2, h, w): d/dx, d/dy
    mag = g.pow(2).sum(1).sqrt().reshape(b, c, h, w).sum(1)
    return mag.reshape(b, h // patch, patch, w // patch, patch).sum((2, 4))


def select(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, h, w) scores -> (B, h, w) bool: the k highest cells of each row (ties: the first in row-major order)."""
    flat = score.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.view_as(score)


def _cells_to_latents(cells: torch.Tensor, packing: int) -> torch.Tensor:
    """(B, h, w) cells -> (B, 1, h * 2p, w * 2p) per full-size latent."""
    side = SCALE * packing
    return cells.repeat_interleave(side, 1).repeat_interleave(side, 2).unsqueeze(1)


def read_cells(grid: torch.Tensor, packing: int) -> torch.Tensor:
    """(B, C, H, W) full-size latents of a region stage -> (B, H/2p, W/2p) bool, True where the cell is fine (its
    latents are not exactly its half-resolution ones nearest-upsampled)."""
    same = grid == resample.up(resample.pick(grid, SCALE), SCALE)
    b, _, h, w = grid.shape
    side = SCALE * packing
    return ~same.all(1).view(b, h // side, side, w // side, side).all(4).all(2)


# -- the mixed token set ------------------------------------------------------------------------------------------
def _indices(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the coarse cells' token indices (row-major in the coarse grid) and the fine tokens' indices (row-major
    in the full grid). Every row must have as many fine cells as the first."""
    flat = cells.flatten(1)
    k = int(flat[0].sum())
    if bool((flat.sum(1) != k).any()):
        raise FastDiffError("bottleneck regions: batch rows with different numbers of fine cells in one call")
    fine_tok = cells.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2).flatten(1)
    # a stable sort of the 0/1 flags lists the wanted indices first, in increasing order
    coarse = torch.sort(flat.to(torch.uint8), dim=1, stable=True).indices[:, : flat.shape[1] - k]
    fine = torch.sort((~fine_tok).to(torch.uint8), dim=1, stable=True).indices[:, : k * SCALE * SCALE]
    return coarse, fine


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 1, index.to(t.device).unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def tokens(grid: torch.Tensor, cells: torch.Tensor, packing: int) -> torch.Tensor:
    """(B, C, H, W) full-size latents -> (B, N, C p p) the mixed set: coarse cells' tokens, then the fine tokens."""
    coarse, fine = _indices(cells)
    low = resample.pack(resample.pick(grid, SCALE), packing)
    full = resample.pack(grid, packing)
    return torch.cat([_gather(low, coarse), _gather(full, fine)], 1)


def place(mixed: torch.Tensor, cells: torch.Tensor, packing: int, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `tokens`: (B, N, C p p) mixed tokens -> (B, C, H, W) full-size latents, each coarse cell its
    token nearest-upsampled; `tokens(place(y)) == y` exactly."""
    coarse, fine = _indices(cells)
    b, _, d = mixed.shape
    h, w = size
    nc = coarse.shape[1]
    if mixed.shape[1] != nc + fine.shape[1]:
        raise FastDiffError(f"bottleneck regions: {mixed.shape[1]} tokens for a mixed set of {nc + fine.shape[1]}")
    low = mixed.new_zeros(b, (h // SCALE // packing) * (w // SCALE // packing), d)
    low.scatter_(1, coarse.to(mixed.device).unsqueeze(-1).expand(-1, -1, d), mixed[:, :nc])
    full = mixed.new_zeros(b, (h // packing) * (w // packing), d)
    full.scatter_(1, fine.to(mixed.device).unsqueeze(-1).expand(-1, -1, d), mixed[:, nc:])
    up = resample.up(resample.unpack(low, h // SCALE, w // SCALE, packing), SCALE)
    return torch.where(_cells_to_latents(cells, packing).to(mixed.device), resample.unpack(full, h, w, packing), up)


def positions(cells: torch.Tensor) -> torch.Tensor:
    """(h, w) cells of one row -> (N, 2) float (row, col) positions of its mixed set in the full-size token frame:
    coarse tokens at the centre of the 2x2 they cover, fine tokens at their own."""
    h, w = cells.shape
    ci = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    fi = torch.stack(torch.meshgrid(torch.arange(h * SCALE), torch.arange(w * SCALE), indexing="ij"), -1).reshape(-1, 2)
    fine_tok = cells.repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1).flatten().cpu()
    coarse = ci[~cells.flatten().cpu()].double() * SCALE + (SCALE - 1) / 2
    return torch.cat([coarse, fi[fine_tok].double()])


def mixed_tokens(full_tokens: int, fraction: float) -> int:
    """Image tokens of a region stage's calls for a run of `full_tokens` full-size tokens."""
    cells = full_tokens // (SCALE * SCALE)
    return cells + (SCALE * SCALE - 1) * fine_count(fraction, cells)


def check_family(adapter) -> None:
    """Refuse a region stage on a family that cannot take a mixed-resolution token set (before anything is touched)."""
    from ...adapters.base import specs

    if not (adapter.spec.resample and adapter.spec.resample.token_sets):  # the adapter's data: ResampleSpec.token_sets
        known = sorted(s.name for s in specs() if s.resample is not None and s.resample.token_sets)
        raise UnsupportedModelError(
            f"{type(adapter.denoiser).__name__}: resolution-bottleneck sampling with a region stage (region-adaptive "
            f"upsampling, stages[].regions) runs a mixed-resolution token set with positions passed in as data, "
            f"which the '{adapter.name}' family's denoiser does not take; supported families: {known}")


def price(table, region: int, fraction: float):
    """`fastdiff.estimate`'s table with the region stage's rows priced as the mixed set. `stage_sizes` gives those rows
    a stand-in grid of (h/2, w) tokens (the half grid twice as wide: another grid than every other stage's, so the
    per-grid state rule reads them as the run does its mixed set); here each becomes the flat (1, 1, N) layout the run
    records, a block the mechanisms before kept costing its dense price at N tokens and one they skipped costing 0.
    A mechanism that prices a block of the stage otherwise (merging, sparse attention: they need a rectangular grid)
    is refused."""
    model, rows, priced = table.model, [], {}
    for row in table.rows:
        ctx = row.ctx
        if ctx.stage != region:
            rows.append(row)
            continue
        _, h, w2 = ctx.layout.grid
        layout = dataclasses.replace(ctx.layout, grid=(1, 1, h * (w2 // 2) + (SCALE * SCALE - 1) * fine_count(
            fraction, h * (w2 // 2))))
        if ctx.layout not in priced:
            priced[ctx.layout] = tuple(model.block_flops(ctx.layout))
        if layout not in priced:
            priced[layout] = tuple(model.block_flops(layout))
        stand_in, mixed = priced[ctx.layout], priced[layout]
        if any(v not in (0.0, d) for v, d in zip(row.flops, stand_in)):
            raise ConfigError("bottleneck: a region stage's token set is no rectangular grid; only mechanisms that "
                              "run or skip whole blocks (caching, guidance skipping) compose with it, not merging or "
                              "sparse attention")
        rows.append(dataclasses.replace(row, ctx=dataclasses.replace(ctx, layout=layout),
                                        flops=tuple(0.0 if v == 0 else m for v, m in zip(row.flops, mixed))))
    return dataclasses.replace(table, rows=tuple(rows))


# -- the driver ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RegionDriver(Driver):
    """The bottleneck driver with one region stage (`region`: its index; `fraction`: of its cells upsampled).
    Every other stage and step runs as `Driver` runs it."""

    region: int = 1
    fraction: float = 0.3
    max_calls: int | None = None  # calls per step the step clock tells apart (rows with own regions each make one)
    split_ok: bool = True  # False where a composed mechanism pairs a step's calls (guidance skipping)

    def __post_init__(self):
        super().__post_init__()
        check_region_stages([s.scale for s in self.stages], self.region, self.fraction, "bottleneck")
        if self.positions is None:
            raise ConfigError("bottleneck: a region stage needs the family's positions as call data")

    # -- schedule ---------------------------------------------------------------------------------------------
    def set_timesteps(self, scheduler, inner, args, kwargs):
        out = super().set_timesteps(scheduler, inner, args, kwargs)
        run = self.run
        tokens = self._full_tokens(scheduler, kwargs.get("mu"))
        if tokens:  # a resolution-dependent shift: the region stage's is that of its own token count
            m, n = self.region, run.counts[self.region]
            part = stage_sigmas(scheduler, self.stages[m], n, mixed_tokens(tokens, self.fraction), self.strength_is)
            b = run.bounds[m]
            run.sigmas[b:b + n] = part
            scheduler.sigmas[b:b + n] = part.to(scheduler.sigmas)
            scheduler.timesteps[b:b + n] = (part * scheduler.config.num_train_timesteps).to(scheduler.timesteps)
        self._local.calls = 0
        return out

    def check_composition(self, scheduler, mechanisms, owner: str) -> None:
        """Refuse what a region stage cannot run with, before the driver hooks anything: a sampler other than
        flow matching's, merging or sparse attention (they need a rectangular token grid)."""
        name = type(scheduler).__name__
        if name not in FLOW_SCHEDULERS:
            raise UnsupportedModelError(
                f"{owner}: resolution-bottleneck sampling with a region stage re-noises by the flow-matching rule and "
                f"runs {', '.join(FLOW_SCHEDULERS)}; the pipeline samples with {name}")
        grid_bound = sorted(m.name for m in mechanisms if m.name in ("merge", "sparse"))
        if grid_bound:
            raise ConfigError(
                f"bottleneck: a region stage runs a mixed-resolution token set, no rectangular grid, and sections "
                f"{grid_bound} need one (merging pools, sparse attention tiles the grid); drop them or the region "
                "stage (caching and guidance skipping compose with it)")
        self.split_ok = not any(m.name == "guidance" for m in mechanisms)

    def tokens_seen(self) -> int | None:
        """Image tokens of the latest region-stage call in this thread (None before one)."""
        return getattr(self._local, "tokens", None)

    def _in_region(self, run) -> bool:
        return run is not None and run.stage_of(run.step) == self.region

    def dense_layout(self, layout):
        """The full-size layout a region stage's call stands for (its grid is the mixed set's)."""
        h, w = self.run.full
        return dataclasses.replace(layout, grid=(1, h // self.packing, w // self.packing))

    def in_region(self) -> bool:
        return self._in_region(self.run)

    # -- the denoiser -----------------------------------------------------------------------------------------
    def forward(self, bind: Callable[[tuple, dict], dict], inner, args, kwargs):
        run = self._require_run()
        self._local.calls = getattr(self._local, "calls", 0) + 1
        if not self._in_region(run):
            return super().forward(bind, inner, args, kwargs)
        bound = bind(args, kwargs)
        p, (h, w) = self.packing, run.full
        hidden = bound[self.hidden_arg]
        grid = resample.unpack(hidden, h, w, p)
        cells = read_cells(grid, p)
        k = fine_count(self.fraction, cells[0].numel())
        if bool((cells.flatten(1).sum(1) != k).any()):
            raise FastDiffError(
                f"bottleneck regions: the latents the pipeline passed are not the region stage's (each row has {k} "
                "fine cells); a pipeline that changes latents between steps cannot run a region stage")
        self._local.tokens = cells[0].numel() + (SCALE * SCALE - 1) * k
        if k == 0:  # only coarse tokens: the plain half-resolution stage
            return super().forward(bind, inner, args, kwargs)
        if k == cells[0].numel():  # only fine tokens: the plain full-size call
            return inner(*args, **kwargs)
        batch = hidden.shape[0]
        keys = [bytes(c.flatten().cpu().numpy().tobytes()) for c in cells]
        groups: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        result, first = hidden.new_empty(hidden.shape), None
        for rows in groups.values():
            index = torch.tensor(rows, device=hidden.device)
            sub = cells[index]
            pos = positions(sub[0])
            given = self.positions(bound, pos)
            for name, ids in given.items():
                if not torch.equal((ids[0] if ids.ndim == 3 else ids)[:, -2:].double().cpu(), pos):
                    raise FastDiffError(f"bottleneck regions: the half-step positions do not fit {name}'s {ids.dtype}")
            if len(groups) == 1:
                call = dict(bound)
            else:  # these rows' own call
                call = {key: v if key in given else _cut(v, index, batch) for key, v in bound.items()}
            call.update(given)
            call[self.hidden_arg] = tokens(grid[index], sub, p)
            out = inner(**call)
            sample = out[0] if isinstance(out, tuple) else out.sample
            result[index] = resample.pack(place(sample, sub, p, (h, w)), p)
            first = out if first is None else first
        if isinstance(first, tuple):
            return (result, *first[1:])
        first.sample = result
        return first

    # -- the scheduler ----------------------------------------------------------------------------------------
    def step(self, signature, inner, args, kwargs):
        run = self._require_run()
        calls, self._local.calls = getattr(self._local, "calls", 0), 0
        m = self.region
        k = run.stage_of(run.step)
        before = k == m - 1 and run.step == run.bounds[m] - 1
        if not before and k != m:
            if run.step == 0:
                self._check_calls(signature, args, kwargs, calls)
            return super().step(signature, inner, args, kwargs)
        b = signature.bind(*args, **kwargs)
        b.apply_defaults()
        a = dict(b.arguments)
        a.pop("self", None)
        v, sample, t = a.pop("model_output"), a.pop("sample"), a.pop("timestep")
        if run.step == 0:
            run.first = sample.detach().clone()
            self._check_calls(signature, args, kwargs, calls)
        p, (h, w) = self.packing, run.full
        full_v, full_x = resample.unpack(v, h, w, p), resample.unpack(sample, h, w, p)
        first = resample.unpack(run.first, h, w, p)
        sigma = float(run.sigmas[run.step])
        sig = float(run.sigmas[run.step + 1]) if run.step + 1 < len(run.sigmas) else 0.0
        if before:  # the last step of the stage before: choose the regions, re-noise both parts
            s = self.stages[k].scale
            y, vy = resample.pick(full_x, s), resample.pick(full_v, s)
            out = inner(vy, t, y, **a)
            x0 = y.float() - sigma * vy.float()
            x0c = resample.resize(x0, (h // SCALE, w // SCALE), self.resize)
            cells = select(edge_score(x0c, p), fine_count(self.fraction, (h // SCALE // p) * (w // SCALE // p)))
            grid = self._renoise(x0c, resample.resize(x0, (h, w), self.resize), cells, first, sig, sample.dtype)
            if self.on_stage is not None:
                self.on_stage(m)
        else:
            cells = read_cells(full_x, p)
            out = inner(tokens(full_v, cells, p), t, tokens(full_x, cells, p), **a)
            if run.step == run.bounds[m + 1] - 1:  # the stage's last step: all of it to full size
                x0 = full_x.float() - sigma * full_v.float()
                lat = _cells_to_latents(cells, p).to(x0.device)
                x0 = torch.where(lat, x0, resample.resize(resample.pick(x0, SCALE), (h, w), self.resize))
                noise = resample.row_noise(first, x0.shape, m + 1, x0.dtype, x0.device)
                grid = ((1 - sig) * x0 + sig * noise).to(sample.dtype)
                if self.on_stage is not None:
                    self.on_stage(m + 1)
            else:
                prev = out[0] if isinstance(out, tuple) else out.prev_sample
                grid = place(prev, cells, p, (h, w))
        run.step += 1
        full = resample.pack(grid, p)
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.prev_sample = full
        return out

    def _renoise(self, x0c, x0f, cells, first, sig, dtype):
        """The region stage's first latents: coarse cells from the half-size estimate, fine ones from the full-size
        one, each re-noised at `sig` with the noise a plain stage at its size would draw (so r = 0 and r = 1 are the
        plain stages exactly). Both are drawn from one stream, so the full-size draw repeats the half-size one's
        values at equal flat indices: where those are in use by a coarse cell, the fine draw takes values of its own
        stream instead, and no noise value is used twice."""
        m = self.region
        nc = resample.row_noise(first, x0c.shape, m, x0c.dtype, x0c.device)
        nf = resample.row_noise(first, x0f.shape, m, x0f.dtype, x0f.device)
        coarse_lat = _coarse_latents(cells, self.packing, x0c.shape[1]).to(x0c.device)  # (B, C, h/2, w/2) bool
        n_low = coarse_lat[0].numel()
        clash = torch.zeros(nf.shape[0], nf[0].numel(), dtype=torch.bool, device=nf.device)
        clash[:, :n_low] = coarse_lat.flatten(1)
        if bool(clash.any()):
            alt = resample.row_noise(first, x0f.shape, -m, x0f.dtype, x0f.device)
            nf = torch.where(clash.view_as(nf), alt, nf)
        coarse = ((1 - sig) * x0c + sig * nc).to(dtype)
        fine = ((1 - sig) * x0f + sig * nf).to(dtype)
        return torch.where(_cells_to_latents(cells, self.packing).to(fine.device), fine, resample.up(coarse, SCALE))

    def _check_calls(self, signature, args, kwargs, calls):
        """Rows with their own regions make a denoiser call each: refuse, at the run's first step, a run whose region
        stage would make more calls per step than the step clock tells apart, or where a composed mechanism pairs
        the step's calls (guidance skipping)."""
        if fine_count(self.fraction, 4) in (0, 4):
            return
        b = signature.bind(*args, **kwargs)
        rows = b.arguments["sample"].shape[0]
        if rows > 1 and not self.split_ok:
            raise ConfigError(
                "bottleneck regions: each image of a batch runs its own call in the region stage (FLUX takes one set "
                f"of positions per call), which guidance skipping cannot pair; sample one image per call ({rows} given)"
                " or drop the guidance section")
        if self.max_calls is not None and rows * max(1, calls) > self.max_calls:
            raise ConfigError(
                f"bottleneck regions: each image of a batch runs its own call in the region stage (FLUX takes one set "
                f"of positions per call): {rows} images x {calls} calls per step is more than the {self.max_calls} "
                f"calls a step may make; sample at most {max(1, self.max_calls // max(1, calls))} images per call")


def _coarse_latents(cells: torch.Tensor, packing: int, channels: int) -> torch.Tensor:
    """(B, h, w) cells -> (B, C, h p, w p) bool over the half-resolution latents: True where the cell is coarse."""
    lat = (~cells).repeat_interleave(packing, 1).repeat_interleave(packing, 2)
    return lat.unsqueeze(1).expand(-1, channels, -1, -1)


def _cut(v, index: torch.Tensor, batch: int):
    """Rows `index` of a call argument: every tensor with `batch` leading rows is cut (as guidance skipping cuts)."""
    if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch:
        return v[index.to(v.device)]
    if isinstance(v, dict):
        return {k: _cut(x, index, batch) for k, x in v.items()}
    return v


def check_region_stages(scales: list[int], region: int, fraction, where: str) -> None:
    """The shape a run with a region stage must have (also checked by `BottleneckConfig.validate`)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"{where}.stages[{region}].regions must be a fraction in [0, 1], got {fraction!r}")
    if scales[region] != SCALE:
        raise ConfigError(f"{where}.stages[{region}]: a region stage is at scale {SCALE} (its coarse cells half the "
                          f"side, its fine tokens full size), got scale {scales[region]}")
    if region == 0:
        raise ConfigError(f"{where}.stages[0]: a region stage needs a stage before it (its regions are chosen from "
                          "that stage's clean estimate)")
    if region + 1 >= len(scales) or scales[region + 1] != 1:
        raise ConfigError(f"{where}.stages[{region}]: the stage after a region stage must be at scale 1")
