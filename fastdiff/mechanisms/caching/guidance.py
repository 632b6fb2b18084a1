"""Skipping the unconditional CFG branch late in sampling (Adaptive Guidance).

Late in sampling the conditional and unconditional predictions move together, so their difference —
the guidance delta — changes little. Once skipping starts, only the conditional rows run; each skipped
unconditional prediction is the conditional one minus the last measured delta, so the pipeline's own
guidance formula is left untouched.

- separate CFG calls (Flux true CFG, Wan, HunyuanVideo): the unconditional call does not run at all;
- batched CFG (DiT, PixArt, SD3, SD/SDXL, CogVideoX): the denoiser runs on the conditional rows only (the
  host is asked to run those rows, so the call is accounted as run), every batch-sized input is cut to those
  rows, and the output is put back together in the pipeline's row order. Rows are paired in order (k-th cond
  row ↔ k-th uncond row), the layout every diffusers pipeline uses; samples never mix.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ...context import COND, UNCOND, UNKNOWN
from ...errors import FastDiffError, UnsupportedModelError
from ...parallel import agree, shards_of
from ..base import Mechanism


@dataclass
class GuidanceState:
    delta: torch.Tensor | None = None  # cond - uncond of the last step where both ran (uncond rows' order)
    cond: torch.Tensor | None = None  # separate calls: this step's conditional prediction
    cond_out: Any = None  # ... and the output object it came in (the template of a skipped call's output)
    cond_step: int = -1
    converged: bool = False


class GuidanceSkip(Mechanism):
    name = "guidance"

    def validate(self, adapter) -> None:
        if not adapter.spec.pipelines and adapter.spec.row_branches is None:
            raise UnsupportedModelError(
                f"{type(adapter.denoiser).__name__}: guidance skipping needs to know each row's CFG branch, and the "
                f"'{adapter.name}' adapter describes no pipeline CFG layout. Supported families: those of "
                "fastdiff.supported() applied through their diffusers pipeline, or a pipeline whose layout is "
                "registered with fastdiff.register_pipeline.")

    def estimate_cost(self, table):
        """The unconditional calls (rows whose branches are unconditional) are free from `start` on, read against
        the run's steps. For mode "converged" this is the bound (skipping from `start`); summary() has what a run
        did."""
        return table.with_flops(
            [0.0] * len(r.flops) if UNCOND in r.ctx.branches and r.ctx.step >= self._first_step(r.ctx.num_steps)
            else r.flops for r in table.rows)

    def attach(self, adapter, host):
        self.host = host
        self.adapter = adapter
        host.wrap(adapter.denoiser, "fastdiff.guidance", self._wrapper)

    def new_state(self) -> GuidanceState:
        return GuidanceState()

    def _first_step(self, num_steps: int | None) -> int:
        return 0 if num_steps is None else round(self.config.start * num_steps)

    # -- the hook -----------------------------------------------------------------------------------
    def _wrapper(self, call, inner, args, kwargs):
        # Deciding and bookkeeping run outside torch.compile (they read the step; traced, they would guard on it
        # and recompile every step); only the denoiser call itself is traced.
        kind, st, info = self._plan(call)
        if kind == "replace":
            return info
        if kind == "rows":
            call_args, call_kwargs = self._cut(call, info[0], len(info[0]) + len(info[1]))
            return self._fill(inner(*call_args, **call_kwargs), st, info)
        out = inner(*args, **kwargs)
        if kind != "pass":
            self._observe(kind, st, info, out)
        return out

    @torch.compiler.disable
    def _plan(self, call) -> tuple[str, Any, Any]:
        """What this call does: "pass" (not a denoiser call), "cond" (store the conditional prediction),
        "uncond" / "batched" (run and measure the delta), "replace" (skipped: the stand-in output) or
        "rows" (run the conditional rows only)."""
        if call is None:
            return "pass", None, None
        rec, ctx = call.record, call.ctx
        branches = ctx.branches
        if UNKNOWN in branches:
            self._unknown()
        st: GuidanceState = self.host.state(call, self, slot=0)  # one state for the step's calls: the delta spans them
        if UNCOND not in branches:  # CFG off, or the conditional call of separate CFG
            return "cond", st, ctx.step
        cond_rows = [i for i, b in enumerate(branches) if b == COND]
        uncond_rows = [i for i, b in enumerate(branches) if b == UNCOND]
        late = ctx.step >= self._first_step(ctx.num_steps)
        skip = late and st.delta is not None and (self.config.mode == "step" or st.converged)
        if not cond_rows:  # separate calls: this is the unconditional one
            if skip and st.cond_step == ctx.step and st.cond.shape == st.delta.shape:
                rec.decisions[self.name] = "skip-uncond"
                self.host.run_rows(call, ())
                return "replace", st, _with_sample(st.cond_out, st.cond - st.delta)
            return "uncond", st, (ctx.step, late)
        if skip and len(cond_rows) == len(uncond_rows) and st.delta.shape[0] == len(uncond_rows):
            rec.decisions[self.name] = "skip-uncond"
            self.host.run_rows(call, cond_rows)
            return "rows", st, (cond_rows, uncond_rows)
        return "batched", st, (cond_rows, uncond_rows, late)

    @torch.compiler.disable
    def _observe(self, kind: str, st: GuidanceState, info, out) -> None:
        if kind == "cond":
            st.cond, st.cond_out, st.cond_step = _sample(out), out, info
        elif kind == "uncond":
            step, late = info
            if st.cond_step == step:
                self._measure(st, st.cond, _sample(out), late)
        else:
            cond_rows, uncond_rows, late = info
            if len(cond_rows) == len(uncond_rows):
                sample = _sample(out)
                self._measure(st, sample[cond_rows], sample[uncond_rows], late)

    @torch.compiler.disable
    def _fill(self, out, st: GuidanceState, info):
        """The full batch from the conditional rows: each skipped row is its pair's prediction minus the delta."""
        cond_rows, uncond_rows = info
        cond = _sample(out)
        full = cond.new_empty((len(cond_rows) + len(uncond_rows), *cond.shape[1:]))
        full[cond_rows] = cond
        full[uncond_rows] = cond - st.delta
        return _with_sample(out, full)

    def _measure(self, st: GuidanceState, cond: torch.Tensor, uncond: torch.Tensor, late: bool) -> None:
        st.delta = cond - uncond
        if self.config.mode == "converged" and late and not st.converged:
            cos = torch.nn.functional.cosine_similarity(cond.flatten(1).float(), uncond.flatten(1).float(), dim=1)
            converged = bool(cos.min() >= self.config.threshold)  # every row pair must have converged
            # Under context parallelism the denoiser's output is gathered, so each rank measures the same rows;
            # the ranks still vote (one all-reduce per measured step) so that no rank skips a call another runs.
            st.converged = agree(converged, shards_of(self.adapter.denoiser), device=cos.device)

    @torch.compiler.disable
    def _cut(self, call, rows, batch):
        """The call's arguments for `rows` of the batch: every tensor input with `batch` leading rows is cut. Read
        from the call's arguments as the host bound them (this hook wraps the denoiser: it gets the same ones)."""
        parameters = self.adapter.signature.parameters
        index = torch.tensor(rows)

        def cut(v):
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch:
                return v[index.to(v.device)]
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):  # e.g. a ControlNet's down-block residuals, one row per sample
                return type(v)(cut(x) for x in v)
            return v

        call_args, call_kwargs = [], {}
        for name, value in list(call.args.items())[1:]:  # [0] is self
            kind = parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                call_args.extend(cut(v) for v in value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                call_kwargs.update({k: cut(v) for k, v in value.items()})
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                call_args.append(cut(value))
            else:
                call_kwargs[name] = cut(value)
        return call_args, call_kwargs

    def _unknown(self):
        raise FastDiffError(
            f"guidance skipping: the CFG branch of the rows of this {type(self.adapter.denoiser).__name__} call is "
            "unknown (fastdiff was applied to the bare denoiser, or the pipeline class is not in the "
            f"'{self.adapter.name}' adapter). Apply fastdiff to the diffusers pipeline, or drop the guidance section.")


def _sample(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _with_sample(out, sample: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample, *out[1:])
    return dataclasses.replace(out, sample=sample)
