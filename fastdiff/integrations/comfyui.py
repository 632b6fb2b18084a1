"""The ComfyUI host: fastdiff's mechanisms on ComfyUI's own models, through ComfyUI's public patch API only.

`patch(model, section, settings)` returns a clone of a ComfyUI `ModelPatcher` carrying a `Plan` (the config
sections asked for, in step fractions) and these patches, all on the clone's `model_options`:
- an `OUTER_SAMPLE` wrapper opens a `ComfyRun` per sampling run (the config for the run's step count, fresh
  mechanisms, their per-call state, the records) in a copy of the guider's model options, and closes it in
  `finally` (state dropped, the report printed and kept on the plan);
- a `DIFFUSION_MODEL` wrapper is the step clock: `transformer_options["sample_sigmas"]` / `["sigmas"]` give the
  step, `["cond_or_uncond"]` each batch row's CFG branch; hooks on the whole model (a UNet's cache, guidance
  skipping) run inside it (a model without that wrapper point, SD3's MMDiT, is clocked at `APPLY_MODEL`);
- `set_model_patch_replace(..., "dit", "double_block" | "single_block", i)` for each DiT block a mechanism wraps
  (chaining to a replace patch another node set there before);
- token merging on a UNet: ComfyUI's attn1/attn2 patches before and after each attention (`comfyui_tokens`).
Nothing is set on the diffusion model, which every clone shares: the input MODEL computes exactly what it did, and
two clones or two queue items never share a run. `forward_orig` and ComfyUI's classes are never touched.

A `ComfyRun` is the mechanisms' `Host` (`fastdiff.host`): it wraps the diffusion model and its blocks, and refuses
any other submodule (token merging reaches attention through ComfyUI's attention patches instead, driving the
merge mechanism's split form: `comfyui_tokens.TokenPatches`).

Only the node pack (`comfyui_fastdiff`) imports this module; it imports ComfyUI lazily, when a model is patched.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from ..adapters import comfyui as comfy_adapters
from ..clock import CallRecord
from ..config import SECTIONS, FastDiffConfig
from ..context import RunState, StepContext, TokenLayout
from ..cost.estimate import dense_table, schedule
from ..cost.model import CostModel
from ..errors import ConfigError, FastDiffError, UnsupportedModelError
from ..host import Call, Hook, run_rows
from ..mechanisms import registry
from ..summary import Summary
from .comfyui_tokens import TokenPatches, refuse_sparse
from .comfyui_tokens import install as install_token_patches
from .comfyui_tokens import refuse as refuse_tokens

KEY = "fastdiff"  # transformer_options key of the clone's Plan, and the wrappers' key
RUN_KEY = "fastdiff_run"  # transformer_options key of the run in progress (in the guider's copy of the options)
PART = "diffusion_model"
log = logging.getLogger("fastdiff.comfyui")

# Settings the nodes give in fractions of the run's steps, turned into the config's step counts per run.
FRACTIONS = {"cache": ("start", "end")}
# The Accelerate node's section: a target speedup, planned per run over the mechanisms the other nodes left unset.
ACCELERATE = "accelerate"
PLANNED = ("cache", "guidance")  # what the planner may choose here: what this host runs


@dataclass
class Plan:
    """What a patched clone asks for: config sections (FastDiffConfig section -> settings), the cache's
    warm-up / cool-down as fractions of the run (`start`, `end`). Also where each run's report is kept
    (`last`: the last run's Summary, `report`: its text) — the only thing a run leaves behind."""

    sections: dict[str, dict]
    last: Summary | None = None
    report: str = ""
    notes: list[str] = field(default_factory=list)  # the last run's warnings (settings that did nothing)
    runs: int = 0

    def sections_at(self, steps: int) -> dict[str, dict]:
        """The config sections the nodes set, for a run of `steps` steps (fractions made step counts); the
        Accelerate node's target is planned per run (`ComfyRun`), not here."""
        sections = {}
        for name, settings in self.sections.items():
            if name == ACCELERATE:
                continue
            settings = dict(settings)
            if name == "cache":
                start, end = settings.pop("start", 0.0), settings.pop("end", 1.0)
                settings["warmup"] = math.ceil(start * steps - 1e-9)
                settings["cooldown"] = steps - math.floor(end * steps + 1e-9)
            sections[name] = settings
        return sections


def _check_sections(sections: dict[str, dict]) -> None:
    unknown = sorted(set(sections) - set(SECTIONS) - {"telemetry", ACCELERATE})
    if unknown:
        raise ConfigError(f"fastdiff ComfyUI: unknown section(s) {unknown}; sections: {list(SECTIONS)}")
    for name, keys in FRACTIONS.items():
        for key in keys:
            value = sections.get(name, {}).get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"fastdiff ComfyUI: {name} {key} must be a fraction of the steps in [0, 1], "
                                  f"got {value!r}")
    target = sections.get(ACCELERATE, {}).get("speedup", 1.0)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1.0 <= target <= 100.0:
        raise ConfigError(f"fastdiff ComfyUI: the target speedup must be a number in [1, 100], got {target!r}")
    cache = sections.get("cache", {})
    if cache.get("start", 0.0) > cache.get("end", 1.0):
        raise ConfigError(f"fastdiff ComfyUI: cache start ({cache['start']}) is after its end ({cache['end']})")


def plan_of(model) -> Plan | None:
    """The fastdiff plan a ComfyUI ModelPatcher carries (None: not patched by fastdiff)."""
    return model.model_options.get("transformer_options", {}).get(KEY)


def patch(model, section: str, settings: dict) -> Any:
    """A clone of ComfyUI `model` (ModelPatcher) that runs config section `section` with `settings` (cache:
    CacheConfig fields plus `start` / `end` fractions of the steps, in place of warmup / cooldown), on top of any
    sections an earlier fastdiff node put on `model` (the same section again replaces it). `model` is unchanged.
    Raises UnsupportedModelError / ConfigError, before anything is patched, when the model or settings cannot run."""
    import comfy.patcher_extension as pe  # ComfyUI, only when a node runs

    previous = plan_of(model)
    sections = {**(previous.sections if previous else {}), section: dict(settings)}
    _check_sections(sections)
    diffusion_model = model.model.diffusion_model
    # a dry run at a nominal step count: refuses what cannot apply, and says which blocks the mechanisms wrap
    dry = ComfyRun(Plan(sections), diffusion_model, None, steps=20)
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options[KEY] = Plan(sections)
    clock = comfy_adapters.CLOCKS.get(dry.adapter.name, "diffusion_model")
    clock = (pe.WrappersMP.APPLY_MODEL, _apply_model) if clock == "apply_model" else \
        (pe.WrappersMP.DIFFUSION_MODEL, _diffusion_model)
    for kind, wrapper in ((pe.WrappersMP.OUTER_SAMPLE, _outer_sample), clock):
        if not clone.get_wrappers(kind, KEY):  # an earlier fastdiff node's clone has them already
            clone.add_wrapper_with_key(kind, KEY, wrapper)
    if dry.tokens is not None:
        install_token_patches(clone, attention=dry.tokens.sparse is not None)
    patches = comfy_adapters.PATCHES[dry.adapter.name]
    for block in dry.adapter.blocks:
        bp = patches[block.kind]
        if bp.patch is None or block.path not in dry.hooks:
            continue
        index = int(block.path.rsplit(".", 1)[1])
        before = clone.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(
            (bp.patch, index))
        before = getattr(before, "__fastdiff_before__", before)  # ours from an earlier node: what it chained to
        clone.set_model_patch_replace(_block_patch(block.path, bp, before), "dit", bp.patch, index)
    return clone


# -- ComfyUI's wrappers and patches ----------------------------------------------------------------------
def _outer_sample(executor, *args, **kwargs):
    """Open a run for this sampling call in a copy of the guider's options; close it whatever happens."""
    guider = executor.class_obj
    options = guider.model_options
    plan: Plan = options["transformer_options"][KEY]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    noise = args[0] if args else kwargs["noise"]
    plan.runs += 1
    cfg = not math.isclose(float(getattr(guider, "cfg", 1.0)), 1.0)
    run = ComfyRun(plan, guider.model_patcher.model.diffusion_model, sigmas, index=plan.runs - 1, noise=noise, cfg=cfg,
                   text_tokens=_text_tokens(guider))
    plan.notes = run.check(noise, cfg)
    for note in plan.notes:
        log.warning(note)
    guider.model_options = _copy_options(options)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = options
        plan.last, plan.report = run.close()
        warned = {n.split()[2] for n in plan.notes}  # "fastdiff: the <name> setting ..."
        idle = [n for n in run.idle() if n.split()[2] not in warned]
        for note in idle:
            log.warning(note)
        plan.notes += idle
        print(plan.report)  # what ComfyUI's console shows after the sampler's progress bar


def _text_tokens(guider) -> int | None:
    """The text tokens of the run's positive cond (its cross-attention input), when the guider holds one."""
    conds = (getattr(guider, "conds", None) or {}).get("positive") or []
    text = conds[0].get("cross_attn") if conds and isinstance(conds[0], dict) else None
    return text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else None


def _copy_options(options: dict) -> dict:
    import comfy.model_patcher

    return comfy.model_patcher.create_model_options_clone(options)


def _transformer_options(args: tuple, kwargs: dict) -> dict | None:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    return next((a for a in reversed(args) if isinstance(a, dict) and "sigmas" in a), None)


def _diffusion_model(executor, *args, **kwargs):
    """The step clock: opens the run's call, runs the hooks on the whole model around ComfyUI's forward."""
    to = _transformer_options(args, kwargs)
    run: ComfyRun | None = None if to is None else to.get(RUN_KEY)
    if run is None:  # the model called outside a patched sampling run (by another node): leave it alone
        return executor(*args, **kwargs)
    run.open(args, kwargs, to)
    try:
        return run.through("", executor, args, kwargs)
    finally:
        run.current = None


def _apply_model(executor, *args, **kwargs):
    """The step clock of a model without a DIFFUSION_MODEL wrapper point (SD3's MMDiT): opens the run's call around
    ComfyUI's apply_model; its arguments are read by apply_model's names (x, t, c_crossattn, ...)."""
    to = _transformer_options(args, kwargs)
    run: ComfyRun | None = None if to is None else to.get(RUN_KEY)
    if run is None:
        return executor(*args, **kwargs)
    signature = inspect.signature(executor.class_obj._apply_model)
    run.open(args, kwargs, to, bound=signature.bind_partial(*args, **kwargs).arguments)
    try:
        return executor(*args, **kwargs)
    finally:
        run.current = None


def _block_patch(path: str, bp: comfy_adapters.BlockPatch, before: Callable | None):
    """ComfyUI's replace patch for block `path`: runs the run's hooks of that block around the block (or around
    the patch another node had set there)."""

    def block(args: dict, extra: dict) -> dict:
        base = extra["original_block"] if before is None else (lambda a: before(a, extra))
        run = (args.get("transformer_options") or {}).get(RUN_KEY)
        if run is None or run.current is None:
            return base(args)
        return run.block(path, bp, base, args)

    block.__fastdiff_before__ = before
    return block


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _hooked(hook: Hook, call: Call, inner: Callable, *args, **kwargs):
    return hook(call, inner, args, kwargs)


# -- one sampling run ------------------------------------------------------------------------------------
class ComfyRun:
    """One sampling run of a patched ComfyUI model, and the `Host` of its mechanisms: the config for the run's
    steps, mechanisms made for this run only, their hooks by block path ("" = the whole diffusion model), their
    per-call state, the step clock and the call records."""

    name = PART
    control = False

    def __init__(self, plan: Plan, diffusion_model: torch.nn.Module, sigmas: Any, steps: int | None = None,
                 index: int = 0, noise: torch.Tensor | None = None, cfg: bool = False, text_tokens: int | None = None):
        self.denoiser = diffusion_model
        self.adapter = comfy_adapters.resolve(diffusion_model)
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas.reshape(-1)]  # one host sync per run
        self.steps = steps if self.sigmas is None else len(self.sigmas) - 1
        if not self.steps or self.steps < 1:
            raise FastDiffError(f"fastdiff ComfyUI: a run needs at least one step, got sigmas {self.sigmas}")
        self.index = index
        self.text_tokens = text_tokens  # of the run's cond, to price it before it starts (None: the family's typical)
        self._cost: CostModel | None = None
        sections = plan.sections_at(self.steps)
        self.planned: str = ""  # what the Accelerate node chose for this run
        if ACCELERATE in plan.sections and noise is not None:  # a dry run (no latent yet) checks the rest only
            chosen, self.planned = self._accelerate(plan.sections[ACCELERATE]["speedup"], sections, noise, cfg)
            sections = {**sections, **chosen}
        self.config = FastDiffConfig.from_dict(sections)
        self.mechanisms = registry.build(self.config)
        self._paths = {id(b.module): b.path for b in self.adapter.blocks}
        self._paths.setdefault(id(diffusion_model), "")
        self.hooks: dict[str, list[Hook]] = {}
        self.run_state = RunState()
        self.records: list[CallRecord] = []
        self.current: Call | None = None
        self._step, self._calls = -1, 0
        # the stage running (the bottleneck sampler's): its index, first step, and sigmas the clock reads steps from
        self._stage, self._stage_start, self._stage_sigmas = 0, 0, None
        # token merging and sparse attention: through ComfyUI's attention patches and override (comfyui_tokens)
        self.tokens: TokenPatches | None = None
        split = {m.name: m for m in self.mechanisms if m.name in ("merge", "sparse")}
        for mechanism in self.mechanisms:
            if mechanism.name == "merge":
                refuse_tokens(mechanism, self.adapter)
            elif mechanism.name == "sparse":
                refuse_sparse(mechanism, self.adapter)
            mechanism.validate(self.adapter)
        for mechanism in self.mechanisms:  # innermost first, as a session attaches them
            if mechanism.name not in split:
                mechanism.attach(self.adapter, self)
        if split:
            self.tokens = TokenPatches(self, split.get("merge"), split.get("sparse"))

    @property
    def cost_model(self) -> CostModel:
        if self._cost is None:
            self._cost = CostModel(self.adapter)
        return self._cost

    # -- Host -------------------------------------------------------------------------------------------
    def wrap(self, module: Any, name: str, hook: Hook) -> None:
        path = self._paths.get(id(module))
        if path == "" and comfy_adapters.CLOCKS.get(self.adapter.name) == "apply_model":
            raise UnsupportedModelError(
                f"{type(self.denoiser).__name__} in ComfyUI: mechanism '{name.split('.')[1]}' wraps the whole diffusion "
                "model, which this ComfyUI version gives no DIFFUSION_MODEL wrapper point for; on this model the "
                "ComfyUI host runs mechanisms on its blocks only (cache)")
        if path is None:
            mechanism = name.split(".")[1] if name.count(".") else name
            raise UnsupportedModelError(
                f"{type(self.denoiser).__name__} in ComfyUI: mechanism '{mechanism}' wraps {type(module).__name__} "
                f"submodules, which the ComfyUI host cannot reach through ComfyUI's patches; it wraps the diffusion "
                f"model and its blocks ({', '.join(sorted({b.kind for b in self.adapter.blocks}))}) only")
        self.hooks.setdefault(path, []).append(hook)

    def state(self, call: Call, mechanism, slot: int | None = None) -> Any:
        return self.run_state.get(mechanism.name, call.ctx.call if slot is None else slot, call.ctx.grid,
                                  mechanism.new_state)

    def states(self, mechanism) -> list[Any]:
        return self.run_state.of(mechanism.name)

    def run_rows(self, call: Call, rows) -> None:
        run_rows(call, rows)

    # -- the clock --------------------------------------------------------------------------------------
    def _step_of(self, sigma: float) -> int:
        """The step i whose interval (sigma_i+1, sigma_i] of the schedule holds `sigma` (ComfyUI's sigmas run down):
        a call between two schedule sigmas is its step's; a second-order sampler's call at the next sigma (Heun's
        corrector) is counted in the next step, as another call slot. In a stage (`begin_stage`): the stage's
        schedule, its steps counted on from the stage's first."""
        sigmas = self.sigmas if self._stage_sigmas is None else self._stage_sigmas
        down = [-s for s in sigmas[:-1]]
        i = bisect.bisect_right(down, -sigma * (1 - 1e-5)) - 1
        i = min(max(i, 0), len(sigmas) - 2)
        return min(self._stage_start + i, self.steps - 1)

    def begin_stage(self, stage: int, start: int, sigmas: torch.Tensor) -> None:
        """A sampler that runs the steps in stages (fastdiff's bottleneck sampler) begins stage `stage` at the run's
        step `start`, on `sigmas` (its own, from its first to the terminal 0; maybe another latent size): the clock
        reads its steps from those, and state kept on another token grid is dropped at its first call."""
        self._stage, self._stage_start = stage, start
        self._stage_sigmas = [float(s) for s in sigmas.reshape(-1)]

    @torch.compiler.disable
    def open(self, args: tuple, kwargs: dict, to: dict, bound: dict | None = None) -> Call:
        """Open the call: its step, branches and layout (`bound`: its arguments by name, default bound to the
        diffusion model's forward)."""
        bound = self.adapter.bind(args, kwargs) if bound is None else bound
        sigma = to.get("sigmas")
        if sigma is None or self.sigmas is None:
            raise FastDiffError("fastdiff ComfyUI: the diffusion model was called without transformer_options "
                                "'sigmas' inside a sampling run; ComfyUI's samplers always pass them")
        sigma = float(sigma.reshape(-1)[0])  # one host sync per call, never per block
        step = self._step_of(sigma)
        if step != self._step:
            self._step, self._calls = step, 0
        ctx = StepContext(self.index, step, self.steps, sigma, self._calls, self.adapter.branches(bound, None, 0),
                          self.adapter.layout(bound), stage=self._stage, stage_start=self._stage_start,
                          stage_steps=None if self._stage_sigmas is None else len(self._stage_sigmas) - 1)
        self._calls += 1
        self.run_state.enter_stage(ctx.run, ctx.stage, ctx.grid)
        record = CallRecord(ctx, part=PART)
        self.records.append(record)
        self.current = Call(record, bound)
        return self.current

    def through(self, path: str, inner: Callable, args: tuple, kwargs: dict):
        """`inner(*args, **kwargs)` under the hooks the mechanisms put on `path` (the first attached innermost)."""
        fn = inner
        for hook in self.hooks.get(path, ()):
            fn = partial(_hooked, hook, self.current, fn)
        return fn(*args, **kwargs)

    def block(self, path: str, bp: comfy_adapters.BlockPatch, base: Callable, args: dict) -> dict:
        """A DiT block through its hooks: arguments by name, the block's output as (img, txt); a joint block's
        [text; image] sequence is handed over as its two streams."""
        names = bp.outputs
        if not bp.joint:
            # ComfyUI's blocks add into their stream inputs in place (Flux's `img += ...`), and the block after this
            # one into what it returns: a tensor the hooks were handed (a cache keeps its span's input) must not
            # change after. So the block runs on copies of its streams, and ComfyUI goes on with copies of what the
            # hooks return. (A joint block's streams are joined into a new tensor each way already.)
            def inner(**kw):
                out = base({**kw, **{k: _copy(kw.get(k)) for k in names}})
                return out[names[0]] if len(names) == 1 else tuple(out[k] for k in names)

            out = self.through(path, inner, (), {k: args.get(k) for k in bp.args})
            out = (out,) if len(names) == 1 else out
            return {k: _copy(v) for k, v in zip(names, out)}
        n = self.current.ctx.layout.text_tokens
        joint = args["img"]

        def inner_joint(img, txt, **kw):
            out = base({**kw, "img": torch.cat((txt, img), 1)})["img"]
            return out[:, n:], out[:, :n]

        kw = {k: args.get(k) for k in bp.args if k != "img"}
        img, txt = self.through(path, inner_joint, (), {"img": joint[:, n:], "txt": joint[:, :n], **kw})
        return {"img": torch.cat((txt, img), 1)}

    # -- planning ---------------------------------------------------------------------------------------
    def _dense(self, noise: torch.Tensor, cfg: bool):
        """The run's dense cost table, priced on its latent size and text before it starts."""
        spec = self.adapter.spec
        frames = noise.shape[2] if noise.ndim == 5 else 1  # video latents: (batch, channels, frames, h, w)
        grid = spec.latent_grid(None, frames, noise.shape[-2], noise.shape[-1])
        text = spec.text_tokens if self.text_tokens is None else self.text_tokens
        layout = TokenLayout(grid, text if spec.text_position != "none" else 0, spec.text_position)
        return dense_table(self.cost_model, schedule([(layout, self.steps)], 1, cfg))

    def _accelerate(self, speedup: float, fixed: dict, noise: torch.Tensor, cfg: bool) -> tuple[dict, str]:
        """The planner's choice for this run (`fastdiff.planner.search` over its measured options): the most
        expected fidelity whose FLOPs are at most dense / `speedup`, composing the mechanisms the other nodes left
        unset on top of those they set. ConfigError naming the reachable range when the target cannot be met."""
        from .. import planner

        dense = self._dense(noise, cfg)
        whole = comfy_adapters.CLOCKS.get(self.adapter.name) != "apply_model"  # guidance wraps the whole model
        free = tuple(m for m in PLANNED if m not in fixed and (whole or m != "guidance"))
        if not free:
            raise ConfigError(f"fastdiff Accelerate: every mechanism it plans ({list(PLANNED)}) is already set by "
                              "another fastdiff node; drop those nodes or the Accelerate node")
        options = planner.options_for(type(self.denoiser).__name__, free)

        def price(sections: dict) -> float:
            table = dense
            for mechanism in registry.build(FastDiffConfig.from_dict({**fixed, **sections})):
                mechanism.validate(self.adapter)
                table = mechanism.estimate_cost(table)
            return table.flops

        best, notes = planner.search(options, price, dense.flops, dense.flops / speedup)
        chosen = best.sections()
        predicted = dense.flops / price(chosen)
        what = " + ".join(o.label for o in best.options) or "nothing"
        return chosen, f"target {speedup:.2f}x: {what} (predicted {predicted:.2f}x FLOPs over {self.steps} steps)"

    # -- reporting --------------------------------------------------------------------------------------
    def check(self, noise: torch.Tensor, cfg: bool) -> list[str]:
        """Warnings for the sections that cannot save anything in this run (e.g. caching over 4 steps), priced on
        the run's latent size before it starts."""
        dense = self._dense(noise, cfg)
        notes = []
        for mechanism in self.mechanisms:
            if mechanism.name == "telemetry":
                continue
            if mechanism.estimate_cost(dense).flops >= dense.flops:
                notes.append(_nothing(mechanism.name, self.config, self.steps, cfg))
        return notes

    def idle(self) -> list[str]:
        """After the run: the sections that skipped nothing in it (e.g. an EasyCache threshold this model's changes
        never fall under), which the check before the run could not know."""
        notes = []
        for mechanism in self.mechanisms:
            if mechanism.name == "telemetry" or not self.records:
                continue
            if all(r.decisions.get(mechanism.name, "compute") == "compute" for r in self.records):
                notes.append(f"fastdiff: the {mechanism.name} setting skipped nothing in this run "
                             f"({len(self.records)} model calls, config {getattr(self.config, mechanism.name).strify()})")
        return notes

    def close(self) -> tuple[Summary, str]:
        """End the run: drop the mechanisms' state, and the run's summary and its one-paragraph report."""
        tracked = self.config.telemetry is not None and self.config.telemetry.enabled
        summary = Summary.build(self.records, [self], config=self.config.strify(), tracked=tracked, ranks=1,
                                priced=True)
        self.run_state.reset()
        for mechanism in self.mechanisms:
            mechanism.detach()
        text = report(summary)
        if self.tokens is not None and self.tokens.sparse is not None:
            text += "\n  " + self.tokens.density_line(self.records)
        if self.tokens is not None and self.tokens.merge is not None:
            text += "\n  " + self.tokens.merge_line(self.records)
        if self.planned:
            text += f"\n  accelerate: {self.planned}"
        return summary, text


def _nothing(name: str, config: FastDiffConfig, steps: int, cfg: bool) -> str:
    why = {
        "cache": lambda c: (f"with {steps} steps, warm-up {c.warmup} and cool-down {c.cooldown} steps, no step can be "
                            "skipped"),
        "guidance": lambda c: ("the sampler runs no unconditional branch (cfg 1.0)" if not cfg else
                               f"skipping starts at {c.start:g} of {steps} steps, after the last one"),
    }.get(name, lambda c: "it saves no FLOPs on this model and size")
    return f"fastdiff: the {name} setting does nothing in this run: {why(getattr(config, name))}"


def report(summary: Summary) -> str:
    """What ran, in a few lines: steps and calls computed or skipped per mechanism, tokens, estimated speedup."""
    decisions: dict[str, dict[str, int]] = {}
    for row in summary.per_step:
        for call in row.decisions:
            for item in filter(None, call.split(",")):
                name, value = item.split("=", 1)
                decisions.setdefault(name, {}).setdefault(value, 0)
                decisions[name][value] += 1
    per_stage = {}  # stage -> its first step's tokens (a bottleneck sampler's stages run at their own sizes)
    for row in summary.per_step:
        per_stage.setdefault(row.stage, "-" if row.image_tokens is None else f"{row.image_tokens}+{row.text_tokens}")
    tokens = " / ".join(per_stage.values()) or "-"
    staged = f", {summary.stages} stages" if summary.stages > 1 else ""
    speed = summary.estimated_speedup
    lines = [f"fastdiff ({summary.family}, {summary.model}): {summary.steps} steps{staged}, {summary.calls} model "
             f"calls, tokens {tokens} per sample, estimated speedup {speed:.2f}x" if speed else
             f"fastdiff ({summary.family}, {summary.model}): {summary.steps} steps{staged}, {summary.calls} model calls"]
    for name, counts in decisions.items():
        lines.append(f"  {name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if not decisions:
        lines.append("  no mechanism skipped anything in this run")
    lines.append(f"  config {summary.config}")
    return "\n".join(lines)


def summary_of(model) -> Summary | None:
    """The last run's summary of a patched ComfyUI model (None before its first run)."""
    plan = plan_of(model)
    return None if plan is None else plan.last


__all__ = ["KEY", "Plan", "ComfyRun", "patch", "plan_of", "report", "summary_of"]
