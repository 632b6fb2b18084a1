"""Configuration: one dataclass per mechanism, gathered in FastDiffConfig.

Every config validates itself (`validate()` raises ConfigError) so that `fastdiff.apply` can refuse
bad input before it touches the model. Configs round-trip through plain dicts and YAML, and `strify()`
gives a compact, stable name for logs and result files.

YAML files are read as plain data (`yaml.safe_load`): no interpolation, no tags, so a config file can neither read
the environment nor run code, and errors quote at most a key and a value, never the file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a user value for an error message, cut short: a message names a value, it never dumps input."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for Python to print (over 4300 digits)
        return "<a number too long to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def _check_fields(cls, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=repr)  # YAML keys may be ints: never compare mixed types
    if unknown:
        shown = ", ".join(_shown(k, 40) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"unknown key(s) [{shown}] in {where}; valid keys: {sorted(known)}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_types(section: Any) -> None:
    """Every field of a section against its type hint; the first thing each section's validate() does, so the
    range checks after it compare numbers, never bools, NaNs or strings."""
    name = next((n for n, cls in SECTIONS.items() if cls is type(section)), type(section).__name__)
    for f in fields(section):
        _check_type(type(section), name, f, getattr(section, f.name))


@dataclass
class TelemetryConfig:
    """Records what happened in each denoiser call, for `handle.summary()`.

    Args:
        enabled: record per-step, per-block compute decisions and the token counts each call saw.
    """

    enabled: bool = True

    def validate(self) -> None:
        _check_types(self)

    def strify(self) -> str:
        return ""


@dataclass
class CacheConfig:
    """Block caching across denoising steps: a policy decides *when* the cached span of blocks is reused,
    an estimator decides *what* stands in for it.

    Args:
        policy: "static" — compute every `interval`-th step (FORA for DiTs, DeepCache for UNets);
            "residual" — the first `head` blocks always run; the rest is reused while the accumulated
            relative change of their residual stays below `threshold` (first-block cache / TeaCache-style);
            "easycache" — reuse while the accumulated output change, predicted from the input change times
            the transformation rate measured at computed steps, stays below `threshold` (EasyCache);
            "delta" — Δ-DiT: in the first `boundary` of the steps the rear `stage_blocks` of the blocks are
            cached, afterwards the front ones, each recomputed every `interval` steps.
        estimator: "reuse" — the span's residual (or UNet block outputs) from the last computed step;
            "taylor" — Newton/Taylor forecast of order `order` over the last computed steps (TaylorSeer);
            "foca" — forecast-then-calibrate: an Adams–Bashforth-2 prediction corrected with the trapezoid
            rule (FoCa-style predictor-corrector, more stable than order 2 over long gaps).
        order: Taylor order (1 or 2); the forecast uses at most as many computed steps as are available.
        interval: static/delta: steps between two computed steps; 1 never reuses.
        threshold: residual/easycache: accumulated relative change allowed before recomputing; 0 never reuses.
        head: blocks always computed at the front (Fn); the residual policy reads its signal from them.
        tail: blocks always computed at the back (Bn).
        max_skip: most consecutive reused steps (0 = no limit); "zeus"-style interleaving is max_skip=1.
        warmup: first steps always computed (the layout of the image is decided there).
        cooldown: last steps always computed (fine detail); needs the scheduler's step count.
        boundary: delta: fraction of the steps in the first stage (rear blocks cached).
        stage_blocks: delta: fraction of the blocks cached in each stage.
        rescale: optional polynomial (highest power first) mapping the residual policy's measured relative
            change to the output change it predicts, fitted by `fastdiff.calibrate` (TeaCache-style).
        offload: keep cached tensors in CPU memory between steps (saves accelerator memory, costs copies).
    """

    policy: str = "static"
    estimator: str = "reuse"
    order: int = 1
    interval: int = 2
    threshold: float = 0.1
    head: int = 0
    tail: int = 0
    max_skip: int = 0
    warmup: int = 1
    cooldown: int = 0
    boundary: float = 0.5
    stage_blocks: float = 0.5
    rescale: list[float] | None = None
    offload: bool = False

    def validate(self) -> None:
        _check_types(self)
        _require(self.policy in CACHE_POLICIES, f"cache.policy must be one of {CACHE_POLICIES}, got {_shown(self.policy)}")
        _require(self.estimator in CACHE_ESTIMATORS,
                 f"cache.estimator must be one of {CACHE_ESTIMATORS}, got {_shown(self.estimator)}")
        _require(self.order in (1, 2), f"cache.order must be 1 or 2, got {self.order}")
        _require(1 <= self.interval <= 100, f"cache.interval must be in [1, 100], got {self.interval}")
        _require(0 <= self.threshold <= 10, f"cache.threshold must be in [0, 10], got {self.threshold}")
        for name in ("head", "tail", "max_skip", "warmup", "cooldown"):
            _require(getattr(self, name) >= 0, f"cache.{name} must be >= 0, got {getattr(self, name)}")
        _require(0 <= self.boundary <= 1, f"cache.boundary must be in [0, 1], got {self.boundary}")
        _require(0 < self.stage_blocks <= 1, f"cache.stage_blocks must be in (0, 1], got {self.stage_blocks}")
        if self.rescale is not None:
            _require(len(self.rescale) >= 1, "cache.rescale must be a non-empty list of numbers (highest power first)")
            _require(self.policy == "residual", "cache.rescale applies to the residual policy only")
            # The policy clamps the predicted change at 0 and reuses while the sum stays below threshold: a
            # polynomial that predicts no positive change for any real change reuses every step after warm-up.
            probe = [i / 64 for i in range(1, 65)]
            _require(max(_polyval(self.rescale, x) for x in probe) > 0,
                     f"cache.rescale {_shown(self.rescale)} predicts no positive output change for any relative "
                     "change in (0, 1]: the residual policy would reuse every step. Fit it with fastdiff.calibrate")
        if self.policy == "residual":
            _require(self.head >= 1, "cache.policy 'residual' reads its signal from the first blocks: head must be >= 1")

    def strify(self) -> str:
        p = self.policy
        knob = {"static": f"i{self.interval}", "delta": f"i{self.interval},b{self.boundary:g},s{self.stage_blocks:g}",
                "residual": f"t{self.threshold:g},F{self.head}B{self.tail}",
                "easycache": f"t{self.threshold:g},F{self.head}B{self.tail}"}[p]
        est = "" if self.estimator == "reuse" else f",{self.estimator}{self.order if self.estimator == 'taylor' else ''}"
        extra = (f",m{self.max_skip}" if self.max_skip else "") + (",offload" if self.offload else "")
        return f"cache[{p},{knob}{est},w{self.warmup},c{self.cooldown}{extra}]"


def _polyval(coeffs: list[float], x: float) -> float:
    out = 0.0
    for c in coeffs:  # Horner, highest power first (numpy.polyfit's order)
        out = out * x + c
    return out


CACHE_POLICIES = ("static", "residual", "easycache", "delta")
CACHE_ESTIMATORS = ("reuse", "taylor", "foca")


@dataclass
class GuidanceConfig:
    """Skip the unconditional branch of classifier-free guidance late in sampling (Adaptive Guidance).

    The skipped branch's prediction is the conditional one minus the last measured guidance delta
    (cond − uncond), so the pipeline's guidance formula still sees both branches.

    Args:
        mode: "step" — skip from the step at fraction `start` of the run on; "converged" — skip (for the
            rest of the run) once the cosine similarity of cond and uncond predictions reaches `threshold`
            after `start`.
        start: fraction of the steps before which both branches always run.
        threshold: "converged": cosine similarity at which the branches count as converged.
    """

    mode: str = "step"
    start: float = 0.5
    threshold: float = 0.99

    def validate(self) -> None:
        _check_types(self)
        _require(self.mode in GUIDANCE_MODES, f"guidance.mode must be one of {GUIDANCE_MODES}, got {_shown(self.mode)}")
        _require(0 <= self.start <= 1, f"guidance.start must be in [0, 1], got {self.start}")
        _require(-1 <= self.threshold <= 1, f"guidance.threshold must be in [-1, 1], got {self.threshold}")

    def strify(self) -> str:
        tail = f",t{self.threshold:g}" if self.mode == "converged" else ""
        return f"guidance[{self.mode},s{self.start:g}{tail}]"


GUIDANCE_MODES = ("step", "converged")


@dataclass
class BottleneckConfig:
    """Resolution-bottleneck sampling: run the stages of each pipeline call at their own latent sizes.

    Each stage denoises from its starting noise level (`strength`) to a clean estimate on its own schedule; between
    stages the estimate is resized (`resize`) and re-noised with fresh noise through the sampler's own noise rule.
    Samplers: FlowMatchEuler (FLUX, SD3, HunyuanVideo: each stage its own shifted sigma schedule) and the stateful
    DDIM, DPM-Solver, Euler and UniPC (SD/SDXL UNets, DiT, PixArt, Wan: each stage the scheduler's own schedule,
    entered part-way as img2img does, its solver state restarted).

    Args:
        stages: the stages in order, each a mapping with `scale` (latent downscale factor, 1 = full size; the
            last stage must be 1), `steps` (a fraction of the call's steps, or an int count), `strength` (the
            stage's starting noise level in (0, 1]; 1 for a first stage; with a stateful sampler img2img's
            strength: the fraction of the stage's schedule it runs) and optionally `shift` (a fixed flow shift for
            the stage, FlowMatchEuler only; default: the scheduler's own rule at the stage's token count).
            One stage may be a *region stage* (region-adaptive upsampling, RALU-style; FLUX-family pipelines only):
            `regions: r`, a fraction in [0, 1], on a stage at scale 2 that follows another stage and precedes a
            scale-1 stage. At its start the top r of its half-resolution tokens by the edges of the previous
            stage's clean estimate are upsampled, so it runs a mixed set of coarse and full-size tokens; r = 0 is a
            plain scale-2 stage, r = 1 a plain scale-1 stage. Caching and guidance skipping compose with it;
            merging and sparse attention (which need a rectangular token grid) do not.
        resize: how the clean estimate moves between stages: "bicubic", "bilinear", "area" or "lanczos".
        strength_is: "time" (the strength is shifted like any timestep: Bottleneck Sampling's rule) or
            "sigma" (the stage starts at exactly that noise level; FlowMatchEuler only).
    """

    stages: list = field(default_factory=lambda: [{"scale": 2, "steps": 0.6, "strength": 1.0},
                                                  {"scale": 1, "steps": 0.4, "strength": 0.85}])
    resize: str = "bicubic"
    strength_is: str = "time"

    def validate(self) -> None:
        _check_types(self)
        _require(isinstance(self.stages, list) and len(self.stages) >= 1,
                 f"bottleneck.stages must be a non-empty list of stage mappings, got {_shown(self.stages)}")
        for i, st in enumerate(self.stages):
            where = f"bottleneck.stages[{i}]"
            _require(isinstance(st, dict), f"{where} must be a mapping, got {_shown(st)}")
            extra = set(st) - set(BOTTLENECK_STAGE_KEYS)
            _require(not extra, f"{where}: unknown keys {sorted(extra)}; a stage has {list(BOTTLENECK_STAGE_KEYS)}")
            scale, steps = st.get("scale", 1), st.get("steps")
            strength, shift = st.get("strength", 1.0), st.get("shift")
            _require(isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1,
                     f"{where}.scale must be an int >= 1, got {_shown(scale)}")
            _require(isinstance(steps, (int, float)) and not isinstance(steps, bool)
                     and (steps >= 1 if isinstance(steps, int) else 0 < steps <= 1),
                     f"{where}.steps must be a fraction in (0, 1] or an int count >= 1, got {_shown(steps)}")
            _require(isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1,
                     f"{where}.strength must be in (0, 1], got {_shown(strength)}")
            _require(shift is None or (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0),
                     f"{where}.shift must be a positive number or absent, got {_shown(shift)}")
        _require(self.stages[-1].get("scale", 1) == 1,
                 "bottleneck.stages: the last stage must be at scale 1, so the output has the requested size")
        region = [i for i, st in enumerate(self.stages) if "regions" in st]
        _require(len(region) <= 1, f"bottleneck.stages: at most one region stage, got regions in stages {region}")
        for i in region:
            where, r = f"bottleneck.stages[{i}]", self.stages[i]["regions"]
            _require(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1,
                     f"{where}.regions must be a fraction in [0, 1], got {_shown(r)}")
            _require(self.stages[i].get("scale", 1) == 2, f"{where}: a region stage is at scale 2 (coarse tokens at "
                                                          f"half the side, fine ones full size), got "
                                                          f"{_shown(self.stages[i].get('scale', 1))}")
            _require(i > 0, f"{where}: a region stage needs a stage before it (its regions come from that stage's "
                            "clean estimate)")
            _require(self.stages[i + 1].get("scale", 1) == 1, f"{where}: the stage after a region stage must be at "
                                                               "scale 1")
        _require(self.resize in BOTTLENECK_RESIZE, f"bottleneck.resize must be one of {BOTTLENECK_RESIZE}, "
                                                   f"got {_shown(self.resize)}")
        _require(self.strength_is in BOTTLENECK_STRENGTH, f"bottleneck.strength_is must be one of "
                                                          f"{BOTTLENECK_STRENGTH}, got {_shown(self.strength_is)}")

    def strify(self) -> str:
        stages = "-".join(f"{st.get('scale', 1)}x{st['steps']:g}" + (f"@{st['strength']:g}" if st.get("strength", 1)
                          != 1 else "") + (f"r{st['regions']:g}" if "regions" in st else "") for st in self.stages)
        return f"bottleneck[{stages},{self.resize},{self.strength_is}]"


BOTTLENECK_STAGE_KEYS = ("scale", "steps", "strength", "shift", "regions")  # regions: mechanisms.bottleneck.regions
BOTTLENECK_RESIZE = ("bicubic", "bilinear", "area", "lanczos")  # the methods mechanisms.bottleneck.resample implements
BOTTLENECK_STRENGTH = ("time", "sigma")

@dataclass
class MergeConfig:
    """Token merging inside blocks: attention (and optionally MLP) submodules run on fewer image tokens.

    Args:
        method: "tome" — ToMe-SD bipartite soft matching: before each targeted submodule, `ratio` of the image
            tokens are merged (averaged) into their most similar destination tokens, and after it every merged
            token gets its destination's output back; "todo" — ToDo: self-attention keeps every query and takes
            its keys/values from the image tokens average-pooled `factor`×`factor` on the grid.
        ratio: tome: fraction of the image tokens merged away (at most what the sx×sy destinations allow);
            0 merges nothing and is bit-identical to no merging.
        sx, sy: tome: one destination token per sx×sy cell of the token grid (of each frame).
        random: tome: pick each cell's destination at random (seeded, so runs are reproducible) rather than
            its first token.
        seed: tome: seed of the random destination choice (mixed with the step and the level).
        targets: tome: which submodules merge around themselves: "self_attention", "cross_attention", "mlp".
            ToDo applies to self-attention only.
        max_downsample: UNets: merge at the levels whose downsampling, relative to the finest level that has
            attention, is at most this (1, 2, 4 or 8): 1 = only the finest attention level (tomesd's default on
            SD1.x; on SDXL, whose full-resolution level has no attention, the 2x level). Transformers have one
            level.
        start, stop: merging runs in the steps from fraction `start` of the run up to (not including) fraction
            `stop`; e.g. stop=0.8 leaves the last fifth of the steps unmerged. A bare denoiser called without a
            scheduler does not know its step count: there merging runs on every call.
        ratio_end: tome: when set, the ratio goes linearly from `ratio` at `start` to `ratio_end` at `stop`
            (e.g. ratio=0.6, ratio_end=0.2: more merging early, when the layout forms).
        depth: which blocks merge: "all", or the "first" / "last" `depth_fraction` of the blocks that have token
            submodules (in execution order, after the `max_downsample` rule).
        depth_fraction: fraction of those blocks for depth "first" / "last".
        factor: todo: key/value pooling factor along height and width (keys: about 1/factor² of the tokens).
        keep_changed: tome: token importance — this fraction of the image tokens, those whose block input changed
            most since the previous step of the same call slot, is merged only after every other source.
        proportional: tome: proportional attention (ToMe) — self-attention whose keys are the merged image tokens
            adds log(size) to each key's logits, size being how many original tokens the key stands for, so a
            merged key weighs as much as the tokens it replaced (merging k equal tokens then changes nothing).
            Passed as an additive float `attention_mask`: families whose self-attention is a diffusers `Attention`
            with a mask-taking processor (DiT, PixArt, the SD UNets); refused elsewhere. Negligible FLOPs, but on
            GPUs a float mask rules out SDPA's flash backend.
        share: tome: how far one matching reaches. "block" — every transformer block matches its own input (as
            tomesd). "level" — one matching per token grid and call, shared by every block on that grid (fewer
            matchings; fine within one DiT stack, but a UNet's encoder and decoder then share a matching made from
            the encoder's input, further from the unmerged output: eval/results/merge-ref-unet).
    """

    method: str = "tome"
    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    random: bool = True
    seed: int = 0
    targets: list[str] = field(default_factory=lambda: ["self_attention"])
    max_downsample: int = 1
    start: float = 0.0
    stop: float = 1.0
    ratio_end: float | None = None
    depth: str = "all"
    depth_fraction: float = 0.5
    factor: int = 2
    keep_changed: float = 0.0
    proportional: bool = False
    share: str = "block"

    def validate(self) -> None:
        _check_types(self)
        _require(self.share in MERGE_SHARES, f"merge.share must be one of {MERGE_SHARES}, got {_shown(self.share)}")
        _require(not self.proportional or self.method == "tome", "merge.proportional applies to method 'tome' only")
        _require(not self.proportional or "self_attention" in self.targets,
                 "merge.proportional weighs the merged keys of self-attention: targets must include 'self_attention'")
        _require(0 <= self.keep_changed < 1, f"merge.keep_changed must be in [0, 1), got {self.keep_changed}")
        _require(self.keep_changed == 0 or self.method == "tome", "merge.keep_changed applies to method 'tome' only")
        _require(self.method in MERGE_METHODS, f"merge.method must be one of {MERGE_METHODS}, got {_shown(self.method)}")
        for name in ("ratio", "ratio_end"):
            value = getattr(self, name)
            _require(value is None or 0 <= value < 1, f"merge.{name} must be in [0, 1), got {value}")
        _require(0 <= self.seed < 2**31, f"merge.seed must be in [0, 2**31), got {self.seed}")
        for name in ("sx", "sy"):
            _require(1 <= getattr(self, name) <= 16, f"merge.{name} must be in [1, 16], got {getattr(self, name)}")
        _require(self.sx * self.sy >= 2, "merge.sx * merge.sy must be >= 2: each destination needs a cell of tokens")
        _require(len(self.targets) >= 1 and all(t in MERGE_TARGETS for t in self.targets),
                 f"merge.targets must be a non-empty list of {MERGE_TARGETS}, got {_shown(self.targets)}")
        _require(len(set(self.targets)) == len(self.targets), f"merge.targets repeats an entry: {_shown(self.targets)}")
        _require(self.max_downsample in (1, 2, 4, 8),
                 f"merge.max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        _require(0 <= self.start < self.stop <= 1, f"merge needs 0 <= start < stop <= 1, got start={self.start}, "
                                                   f"stop={self.stop}")
        _require(self.depth in MERGE_DEPTHS, f"merge.depth must be one of {MERGE_DEPTHS}, got {_shown(self.depth)}")
        _require(0 < self.depth_fraction <= 1, f"merge.depth_fraction must be in (0, 1], got {self.depth_fraction}")
        _require(2 <= self.factor <= 16, f"merge.factor must be in [2, 16], got {self.factor}")
        if self.method == "todo":
            _require(self.targets == ["self_attention"],
                     "merge.method 'todo' pools the keys/values of self-attention only: targets must be ['self_attention']")

    def strify(self) -> str:
        if self.method == "todo":
            head = f"todo,f{self.factor}"
        else:
            ramp = "" if self.ratio_end is None else f"-{self.ratio_end:g}"
            short = {"self_attention": "sa", "cross_attention": "ca", "mlp": "mlp"}
            head = (f"tome,r{self.ratio:g}{ramp},{self.sx}x{self.sy}{'' if self.random else ',fixed'},"
                    + "+".join(short[t] for t in self.targets))
        sched = "" if (self.start, self.stop) == (0.0, 1.0) else f",s{self.start:g}-{self.stop:g}"
        depth = "" if self.depth == "all" else f",{self.depth}{self.depth_fraction:g}"
        md = "" if self.max_downsample == 1 else f",md{self.max_downsample}"
        md += f",keep{self.keep_changed:g}" if self.keep_changed else ""
        md += ",prop" if self.proportional else ""
        md += ",level" if self.share == "level" and self.method == "tome" else ""
        return f"merge[{head}{md}{sched}{depth}]"


@dataclass
class SparseConfig:
    """Block-sparse self-attention on the token grid: each query block attends only some key blocks.

    Image tokens are taken in tile order (tiles of `tile` tokens per axis become consecutive), so a block is a
    compact patch of the grid; text tokens always attend, and are attended by, everything.

    Args:
        pattern: "window" — the key tiles within `window` tiles around the query's (Sliding Tile Attention);
            "crisscross" — the window plus every tile in the same row and column (and, in video, the same place in
            other frames; GRAT); "topk" — per query block, the `density` share of key blocks with the highest pooled
            q·k scores; "topp" — the fewest key blocks holding `top_p` of the pooled score mass.
        block: tokens per query/key block (a power of two, 16-256): the kernels' unit of skipped work.
        tile: [frames, height, width] tokens per tile; None: about `block` tokens, square (cubic for video).
        window: [frames, height, width] window size in tiles (odd numbers: centred), for window / criss-cross,
            and the base that predicted patterns always keep when `window_base` is set.
        density: topk: share of the key blocks each query block keeps, in (0, 1].
        top_p: topp: score mass the kept key blocks must hold, in (0, 1].
        method: predicted patterns' block scores: "mean" (mean-pooled q and k blocks) or "antidiag" (XAttention:
            strided antidiagonal sums of q·k inside each block pair). Pooled means flatten the scores, so "topp"
            with "mean" keeps most blocks: use "antidiag" with "topp" (it costs about 1/stride of dense attention,
            once per prediction).
        stride: antidiag sampling stride (tokens): a power of two, at most `block`.
        window_base: predicted patterns always keep the window around each query block (else only its own block).
        refresh: predicted patterns are predicted at the first sparse step and reused for `refresh` steps before
            the next prediction (AdaSpa: patterns hardly change across steps); 0 = predict once per run.
        start: the first `start` share of the steps runs dense attention (layout forms early).
        dense_blocks: adapter block indices whose attention stays dense.
        dense_heads: attention heads that stay dense in every sparse module (indices below the model's head count).
        backend: force one attention backend ("triton", "gather", "flex", "sdpa"); None chooses (see
            fastdiff.attention.dispatch; the FASTDIFF_ATTENTION_BACKEND environment variable also forces one).
    """

    pattern: str = "window"
    block: int = 64
    tile: list[int] | None = None
    window: list[int] = field(default_factory=lambda: [3, 3, 3])
    density: float = 0.25
    top_p: float = 0.9
    method: str = "mean"
    stride: int = 8
    window_base: bool = False
    refresh: int = 0
    start: float = 0.2
    dense_blocks: list[int] = field(default_factory=list)
    dense_heads: list[int] = field(default_factory=list)
    backend: str | None = None

    def validate(self) -> None:
        _check_types(self)
        _require(self.pattern in SPARSE_PATTERNS,
                 f"sparse.pattern must be one of {SPARSE_PATTERNS}, got {_shown(self.pattern)}")
        _require(16 <= self.block <= 256 and _power_of_two(self.block),
                 f"sparse.block must be a power of two in [16, 256], got {self.block!r}")
        _require(self.tile is None or (len(self.tile) == 3 and all(t >= 1 for t in self.tile)),
                 f"sparse.tile must be None or [frames, height, width] positive ints, got {_shown(self.tile)}")
        _require(len(self.window) == 3 and all(w >= 1 for w in self.window),
                 f"sparse.window must be [frames, height, width] positive ints (tiles), got {_shown(self.window)}")
        _require(0 < self.density <= 1, f"sparse.density must be in (0, 1], got {self.density}")
        _require(0 < self.top_p <= 1, f"sparse.top_p must be in (0, 1], got {self.top_p}")
        _require(self.method in SPARSE_METHODS, f"sparse.method must be one of {SPARSE_METHODS}, got {_shown(self.method)}")
        # the antidiagonal scorer samples every stride-th diagonal of a block: it needs stride | block
        _require(_power_of_two(self.stride) and self.stride <= self.block,
                 f"sparse.stride must be a power of two <= sparse.block ({self.block}), got {self.stride}")
        _require(self.refresh >= 0, f"sparse.refresh must be >= 0, got {self.refresh}")
        _require(0 <= self.start < 1, f"sparse.start must be in [0, 1), got {self.start}")
        for name in ("dense_blocks", "dense_heads"):
            value = getattr(self, name)
            _require(all(i >= 0 for i in value), f"sparse.{name} must be a list of indices >= 0, got {_shown(value)}")
        _require(self.backend is None or self.backend in SPARSE_BACKENDS,
                 f"sparse.backend must be None or one of {SPARSE_BACKENDS}, got {_shown(self.backend)}")

    def strify(self) -> str:
        knob = {"window": f"w{'x'.join(map(str, self.window))}", "crisscross": f"w{'x'.join(map(str, self.window))}",
                "topk": f"d{self.density:g},{self.method}", "topp": f"p{self.top_p:g},{self.method}"}[self.pattern]
        if self.pattern in ("topk", "topp"):
            knob += (",wb" if self.window_base else "") + f",r{self.refresh}"
        return f"sparse[{self.pattern},{knob},b{self.block},s{self.start:g}]"


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


SPARSE_PATTERNS = ("window", "crisscross", "topk", "topp")
SPARSE_METHODS = ("mean", "antidiag")
SPARSE_BACKENDS = ("triton", "gather", "flex", "sdpa")  # the names fastdiff.attention.dispatch.BACKENDS implements


MERGE_METHODS = ("tome", "todo")
MERGE_TARGETS = ("self_attention", "cross_attention", "mlp")
MERGE_DEPTHS = ("all", "first", "last")
MERGE_SHARES = ("block", "level")

# Sections in the order mechanisms attach (innermost first). Mechanism issues add their section here.
# Merging sits inside caching, so a block the cache stands in for never runs its merge hooks (and pays nothing).
# Sparse attention too: a skipped block never calls its attention.
SECTIONS: dict[str, type] = {"telemetry": TelemetryConfig, "merge": MergeConfig, "sparse": SparseConfig,
                             "cache": CacheConfig, "guidance": GuidanceConfig, "bottleneck": BottleneckConfig}


@dataclass
class FastDiffConfig:
    """The whole configuration of one `fastdiff.apply` call.

    Args:
        telemetry: per-call bookkeeping behind `summary()`; costs a few Python operations per block.
        merge: token merging (ToMe / ToDo) inside blocks; None = off.
        sparse: block-sparse self-attention (window, criss-cross, predicted top-k / top-p); None = off.
        cache: block caching across steps; None = off.
        guidance: skipping the unconditional CFG branch late in sampling; None = off.
        bottleneck: resolution-bottleneck sampling (stages at lower latent resolution); None = off.
        families: per-family section overrides, {family: {section: {key: value}}}, applied when the model's
            family is known (`for_family`); a preset uses them where a family needs other settings. A value the
            user overrides explicitly wins over every family's.
    """

    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    merge: MergeConfig | None = None
    sparse: SparseConfig | None = None
    cache: CacheConfig | None = None
    guidance: GuidanceConfig | None = None
    bottleneck: BottleneckConfig | None = None
    families: dict = field(default_factory=dict)

    def __post_init__(self):
        # FastDiffConfig(cache={"interval": 3}) is as good as FastDiffConfig(cache=CacheConfig(interval=3))
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                _check_fields(cls, value, f"config section '{name}'")
                setattr(self, name, cls(**value))

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> "FastDiffConfig":
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if section is None:
                continue
            _require(
                isinstance(section, cls),
                f"config section '{name}' must be a {cls.__name__}, a dict or None, got {type(section).__name__}",
            )
            section.validate()
        # Sparse patterns live on the full token grid; merged (or ToDo-pooled) tokens no longer form it.
        _require(self.sparse is None or self.merge is None or
                 (self.merge.method == "tome" and "self_attention" not in self.merge.targets),
                 "sections 'sparse' and 'merge' both act on self-attention: sparse patterns need the full token grid "
                 "that merging shrinks. Keep merging to other targets (merge.targets: [mlp] or [cross_attention]) or "
                 "drop one section")
        _require(isinstance(self.families, dict), f"config 'families' must be a mapping, got {type(self.families).__name__}")
        known = _family_names() if self.families else []
        for family, over in self.families.items():
            _require(isinstance(family, str) and family in known,
                     f"config 'families': {_shown(family, 40)} is not a family name; families (adapter names): {known}")
            _check_fields(type(self), over, f"config families.{family}")
            _require("families" not in over, f"config families.{family} cannot nest 'families'")
            self.for_family(family)  # every family's resolved config must be valid on its own
        return self

    def for_family(self, family: str) -> "FastDiffConfig":
        """The config a model of `family` runs with: this one with that family's overrides merged in."""
        base = dataclasses.replace(self, families={})
        return base.merged(self.families.get(family, {}))

    # -- conversion --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: None if getattr(self, name) is None else dataclasses.asdict(getattr(self, name))
               for name in SECTIONS}
        if self.families:
            out["families"] = {k: dict(v) for k, v in self.families.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "FastDiffConfig":
        data = {} if data is None else data
        _check_fields(cls, data, "the fastdiff config")
        return cls().merged(data)

    def merged(self, overrides: dict) -> "FastDiffConfig":
        """A new config with `overrides` ({section: dict | dataclass | None}) merged in; validated."""
        _check_fields(type(self), overrides, "the fastdiff config")
        out = {}
        for name, section_cls in SECTIONS.items():
            current = getattr(self, name)
            if name not in overrides:
                out[name] = dataclasses.replace(current) if current is not None else None
                continue
            value = overrides[name]
            if value is None or isinstance(value, section_cls):
                out[name] = value
            elif isinstance(value, dict):
                _check_fields(section_cls, value, f"config section '{name}'")
                base = dataclasses.asdict(current) if current is not None else {}
                out[name] = section_cls(**{**base, **value})
            else:
                raise ConfigError(f"config section '{name}' must be a dict, a {section_cls.__name__} or None, "
                                  f"got {type(value).__name__}")
        if "families" in overrides:
            out["families"] = copy.deepcopy(overrides["families"])
        else:  # what the caller sets explicitly now wins over the families' settings of the same keys
            out["families"] = {}
            for family, over in copy.deepcopy(self.families).items():
                for name, value in overrides.items():
                    if name in over and isinstance(value, dict) and isinstance(over[name], dict):
                        over[name] = {k: v for k, v in over[name].items() if k not in value}
                    elif name in over:
                        del over[name]
                out["families"][family] = over
        return type(self)(**out).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FastDiffConfig":
        """Load a .yaml/.yml config file as plain data: no interpolation, no tags (see the module docstring)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix.lower() not in (".yaml", ".yml"):  # refused unread: only config files are parsed
            raise ConfigError(f"{path}: a config file must be a .yaml or .yml file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config file "
                              f"(at most {MAX_CONFIG_BYTES})")
        try:
            data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_yaml_loader())
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a valid config file: not UTF-8 text (byte {err.start})") from None
        except ValueError:  # an int literal too long for Python to read (over 4300 digits)
            raise ConfigError(f"{path}: not a valid config file: a number too long to read") from None
        except yaml.YAMLError as err:  # where, never what: the message must not quote the file
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = "a key given twice" if getattr(err, "problem", None) == "a key is given twice" else \
                f"YAML {type(err).__name__}"
            raise ConfigError(f"{path}: not a valid config file: {what}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a fastdiff config must be a mapping, got {type(data).__name__}")
        _refuse_interpolation(data, str(path))
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)  # plain data, read back by from_yaml
        if path is not None:
            Path(path).write_text(text)
        return text

    def strify(self) -> str:
        """Compact stable name, e.g. 'baseline' or 'cache[static,i3]'."""
        parts = [s for name in SECTIONS if (sec := getattr(self, name)) is not None and (s := sec.strify())]
        return "+".join(parts) or "baseline"


MAX_CONFIG_BYTES = 1 << 20
MAX_INT = 1 << 63


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    """yaml.SafeLoader (plain data, no tags) as configs were read before through OmegaConf: `1e-3` is a float
    (YAML 1.1 alone reads it as a string), and a key given twice is an error instead of the last one winning."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(problem="a key is given twice",
                                                            problem_mark=key_node.start_mark)
                seen.add(key) if isinstance(key, typing.Hashable) else None
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
         [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
    return Loader


def _refuse_interpolation(data: Any, where: str, at: str = "") -> None:
    """`${...}` in a config file is refused rather than kept as text: configs are plain data (an OmegaConf user
    would expect `${oc.env:...}` to read the environment; fastdiff never resolves it). The error names the key."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        key_at = f"{at}.{key}" if isinstance(data, dict) and at else f"{at}[{key}]" if at else str(key)
        if (isinstance(key, str) and "${" in key) or (isinstance(value, str) and "${" in value):
            raise ConfigError(f"{where}: {key_at[:80]}: interpolation ('${{...}}') is not supported in fastdiff "
                              "configs; write the value itself")
        _refuse_interpolation(value, where, key_at)


def _family_names() -> list[str]:
    """The names `families` may use: those of the registered adapters, and the auto fallback's."""
    from .adapters import supported

    return sorted({*supported(), "auto"})  # "auto": the FamilySpec name of the fallback (adapters/auto.py)


def _check_type(section_cls: type, section: str, f: dataclasses.Field, value: Any) -> None:
    """Reject values of the wrong type (YAML and keyword overrides arrive untyped), list items included."""
    hint = typing.get_type_hints(section_cls)[f.name]
    if not _conforms(hint, value):
        huge = any(isinstance(v, int) and abs(v) > MAX_INT for v in (value if isinstance(value, list) else [value]))
        bound = " (at most 2**63 in size)" if huge else ""
        raise ConfigError(f"{section}.{f.name} must be {_describe(hint)}{bound}, got {_shown(value)}")


def _conforms(hint: Any, value: Any) -> bool:
    """Whether `value` is of type `hint` the strict way every config value is held to: a bool only where a bool
    is meant (bool is an int subclass: True would pass as block 1), a float finite (NaN fails every comparison,
    so `nan < threshold` would silently mean "never"), the items of a list each of the list's item type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(item, v) for v in value)
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if isinstance(value, int) and abs(value) > MAX_INT:  # no setting needs more; huge ints cannot even be printed
        return False
    if hint is float:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    return isinstance(value, origin or hint)


def _describe(hint: Any, plural: bool = False) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0], plural=True)}"
    names = {type(None): ("None", "None"), float: ("a finite number", "finite numbers"), int: ("an int", "ints"),
             bool: ("a bool", "bools"), str: ("a string", "strings")}
    name = getattr(hint, "__name__", str(hint))
    return names.get(hint, (name, name))[plural]
