"""How each peer is switched on, what it needs from the pipeline, and how everything it leaves behind is undone.

Every ``install_*`` takes ``(pipe, kwargs, call_kwargs)``, calls the peer's own documented entry point and returns
the peer's own disable function; every ``check_*`` returns the reason a peer cannot run on a pipeline, or None.
``peers.py`` holds the levels and the public API.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.metadata
import inspect
import io
import logging
import weakref
from typing import Callable

import torch

# the repeated-block lists diffusers' cache hooks look for (hooks/_common.py), in the order models run them
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


class PeerError(RuntimeError):
    """A peer that is not installed here or cannot run on this pipeline; the message says why."""


# --------------------------------------------------------------------------------------
# What the pipeline and the call look like
# --------------------------------------------------------------------------------------


def denoiser(pipe) -> torch.nn.Module | None:
    if isinstance(pipe, torch.nn.Module):
        return pipe
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def blocks(den: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for n, c in den.named_children() if n in BLOCK_LISTS and isinstance(c, torch.nn.ModuleList) for b in c]


def cfg_mode(pipe, call_kwargs: dict | None) -> str | None:
    """'separate' (cond and uncond are two denoiser calls per step), 'batched' (one call on a batch of two),
    'none', or None when the call is unknown.  Read from the call's guidance settings and from whether the
    pipeline's ``__call__`` enters a diffusers ``cache_context("uncond")`` -- not from a per-class list."""
    if call_kwargs is None:
        return None
    params = inspect.signature(type(pipe).__call__).parameters

    def arg(name):
        return call_kwargs.get(name, params[name].default if name in params else None)

    if "true_cfg_scale" in params:  # guidance-distilled pipelines (Flux, HunyuanVideo): true CFG is a second call
        has_neg = arg("negative_prompt") is not None or arg("negative_prompt_embeds") is not None
        return "separate" if (arg("true_cfg_scale") or 1.0) > 1 and has_neg else "none"
    if (arg("guidance_scale") or 1.0) <= 1:
        return "none"
    return "separate" if any('cache_context("uncond"' in _source(c.__dict__["__call__"])
                             for c in type(pipe).__mro__ if "__call__" in c.__dict__) else "batched"


def _source(fn) -> str:
    """The source of a pipeline's `__call__` (a thin subclass's calls its base's: every class along the MRO is read)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def steps(call_kwargs: dict | None) -> int | None:
    return None if call_kwargs is None else call_kwargs.get("num_inference_steps")


def need_call_kwargs(name: str, call_kwargs: dict | None) -> None:
    if steps(call_kwargs) is None:
        raise PeerError(
            f"{name} needs call_kwargs with num_inference_steps: the keyword arguments of the run it accelerates"
        )


def cloned(call_kwargs: dict) -> dict:
    """The call with fresh copies of its generators, so running it does not advance the caller's."""

    def clone(g):
        if isinstance(g, torch.Generator):
            c = torch.Generator(device=g.device)
            c.set_state(g.get_state())
            return c
        return [clone(x) for x in g] if isinstance(g, list) else g

    return {k: clone(v) for k, v in call_kwargs.items()}


def call_key(call_kwargs: dict) -> str:
    """What a calibration depends on: everything but the generator (tensors by shape)."""
    return repr(sorted((k, tuple(v.shape) if torch.is_tensor(v) else v) for k, v in call_kwargs.items() if k != "generator"))


@contextlib.contextmanager
def quiet(prefix: str):
    """Only errors from the loggers under ``prefix`` (cache-dit gives each module its own non-propagating logger)."""
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith(prefix + ".")]
    logs = [logging.getLogger(n) for n in [prefix, *names]]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


# --------------------------------------------------------------------------------------
# Undo: what the peers leave behind
# --------------------------------------------------------------------------------------

# containers whose contents are restored too: torch's submodule / hook dicts, a diffusers HookRegistry's hooks
_CONTAINERS = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_pre_hooks",
    "hooks",
    "_hook_order",
    "_fn_refs",
)
_MISSING = object()


def _same(a, b) -> bool:
    # by identity: values may be tensors, whose == is elementwise
    if isinstance(a, dict):
        return list(a) == list(b) and all(a[k] is b[k] for k in a)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Snapshot:
    """Instance attributes of the pipeline, of every denoiser module and of the diffusers hook registries already on
    them, and the class attributes of the pipeline's and denoiser's classes.

    diffusers' ``disable_cache`` leaves a ``_diffusers_hook`` registry and an instance-level ``forward`` on every
    hooked module; cache-dit patches ``type(pipe).__call__`` (the class!) and sets instance attributes.  Putting the
    shallow state back (plus the contents of the containers above) restores exactly what was there."""

    def __init__(self, pipe):
        den = denoiser(pipe)
        objs = [pipe] if den is pipe else [pipe, *(den.modules() if den is not None else ())]
        extra = getattr(pipe, "transformer_2", None)  # Wan 2.2 carries a second denoiser
        if isinstance(extra, torch.nn.Module):
            objs += list(extra.modules())
        objs += [o.__dict__["_diffusers_hook"] for o in objs if "_diffusers_hook" in o.__dict__]
        self.objs = [
            (o, dict(o.__dict__), {k: copy.copy(o.__dict__[k]) for k in _CONTAINERS if k in o.__dict__}) for o in objs
        ]
        classes = {type(pipe)} | ({type(den)} if den is not None else set())
        self.classes = [(c, dict(vars(c))) for c in classes]

    def restore(self) -> None:
        for obj, saved, containers in self.objs:
            d = obj.__dict__
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
            for k, items in containers.items():
                if not _same(d[k], items):
                    d[k].clear()
                    d[k].update(items) if isinstance(items, dict) else d[k].extend(items)
        for cls, saved in self.classes:
            for k in [k for k in vars(cls) if k not in saved]:
                delattr(cls, k)
            for k, v in saved.items():
                if vars(cls).get(k, _MISSING) is not v:
                    setattr(cls, k, v)


# --------------------------------------------------------------------------------------
# diffusers built-in cache hooks (denoiser.enable_cache(config) / disable_cache())
# --------------------------------------------------------------------------------------

try:
    import diffusers
    from diffusers.models.cache_utils import CacheMixin

    DIFFUSERS, DIFFUSERS_MISSING = f"diffusers {diffusers.__version__}", None
except ImportError as e:  # pragma: no cover - diffusers is a dependency of fastdiff
    DIFFUSERS, DIFFUSERS_MISSING, CacheMixin = "diffusers", f"diffusers is not importable: {e}", None


def check_cache_mixin(pipe) -> str | None:
    den = denoiser(pipe)
    if den is None:
        return f"{type(pipe).__name__} has no transformer/unet"
    if not isinstance(den, CacheMixin):
        return f"{type(den).__name__} is not a diffusers CacheMixin: it has no enable_cache()"
    return None


def check_registered_blocks(pipe) -> str | None:
    """First-block style hooks read each block's I/O layout from diffusers' TransformerBlockRegistry."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    if reason := check_cache_mixin(pipe):
        return reason
    for block in blocks(denoiser(pipe)):
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            return f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry"
    return None


def check_timestep(pipe) -> str | None:
    """PAB / FasterCache decide on ``current_timestep_callback``: the pipeline must expose ``current_timestep``."""
    if reason := check_cache_mixin(pipe):
        return reason
    if not isinstance(getattr(type(pipe), "current_timestep", None), property):
        return f"{type(pipe).__name__} exposes no current_timestep for the timestep callback"
    return None


def check_seacache(pipe) -> str | None:
    if reason := check_cache_mixin(pipe):
        return reason
    name = type(denoiser(pipe)).__name__
    if name not in ("WanTransformer3DModel", "Cosmos3OmniTransformer"):
        return f"SeaCache has built-in adapters for Wan text-to-video and Cosmos 3 only, not {name}"
    return None


def _enable(pipe, config) -> Callable[[], None]:
    den = denoiser(pipe)
    den.enable_cache(config)
    return den.disable_cache


def install_fbc(pipe, kw, call_kwargs):
    from diffusers.hooks import FirstBlockCacheConfig

    return _enable(pipe, FirstBlockCacheConfig(**kw))


def install_taylorseer(pipe, kw, call_kwargs):
    from diffusers.hooks import TaylorSeerCacheConfig

    if kw.pop("blocks", False):
        # forecast whole transformer blocks; the default identifiers hook only modules whose name ends in 'attn' --
        # none on Wan, whose attentions are attn1 / attn2
        names = [n for n, c in denoiser(pipe).named_children() if n in BLOCK_LISTS and isinstance(c, torch.nn.ModuleList)]
        kw["cache_identifiers"] = [rf"{n}\.\d+" for n in names]
    # float32 factors: the models run in float32 here, the bfloat16 default would add its own error
    return _enable(pipe, TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **kw))


def install_pab(pipe, kw, call_kwargs):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return _enable(pipe, PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: pipe.current_timestep, **kw))


def install_fastercache(pipe, kw, call_kwargs):
    from diffusers.hooks import FasterCacheConfig

    need_call_kwargs("diffusers-fastercache", call_kwargs)
    # its CFG cache splits one batch into [uncond, cond]: meaningful only when the pipeline batches CFG; otherwise
    # its documented switch for models without an uncond batch (is_guidance_distilled) keeps the attention reuse only
    batched = cfg_mode(pipe, call_kwargs) == "batched"
    latent_format = "BFCHW" if type(denoiser(pipe)).__name__.startswith("CogVideoX") else "BCFHW"
    config = FasterCacheConfig(
        current_timestep_callback=lambda: pipe.current_timestep,
        is_guidance_distilled=not batched,
        tensor_format=latent_format,
        **kw,
    )
    with quiet("diffusers.hooks.faster_cache"):  # an 'experimental feature' warning on every apply
        return _enable(pipe, config)


def install_seacache(pipe, kw, call_kwargs):
    from diffusers.hooks import SeaCacheConfig

    return _enable(pipe, SeaCacheConfig(**kw))


# ---- MagCache: per-model magnitude ratios from diffusers' own calibration mode

_RATIOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> {call key: ratios}


def calibrate_magcache(pipe, call_kwargs: dict) -> list[float]:
    """MagCache's ratios for this pipeline and call: one full run under ``MagCacheConfig(calibrate=True)``.

    MagCache needs per-checkpoint ratios (diffusers ships Flux's only).  In calibration mode diffusers skips nothing,
    and at the last step of each cache context (cond / uncond) prints and logs the ratios; we read its log record
    (its formula, not ours) and average the contexts, as MagCache keeps one list per model.  The run uses cloned
    generators; the result is cached per denoiser and call."""
    from diffusers.hooks import MagCacheConfig

    den = denoiser(pipe)
    key = call_key(call_kwargs)
    if key in _RATIOS.get(den, {}):
        return _RATIOS[den][key]

    records: list[list[float]] = []

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("MagCache Calibration Results:"):
                records.append(ast.literal_eval(msg.split(":", 1)[1].strip()))

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = Grab(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # to us only: diffusers' handler would print every INFO line of the hooks
    snap = Snapshot(pipe)
    try:
        den.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps(call_kwargs)))
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            pipe(**cloned(call_kwargs))
    finally:
        if getattr(den, "_cache_config", None) is not None:
            den.disable_cache()
        snap.restore()
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    if not records:
        raise PeerError("MagCache calibration produced no ratios (has diffusers' log message changed?)")
    ratios = [sum(col) / len(col) for col in zip(*records)]
    _RATIOS.setdefault(den, {})[key] = ratios
    return ratios


def install_magcache(pipe, kw, call_kwargs):
    from diffusers.hooks import MagCacheConfig

    need_call_kwargs("diffusers-magcache", call_kwargs)
    ratios = calibrate_magcache(pipe, call_kwargs)
    return _enable(pipe, MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps(call_kwargs), **kw))


# --------------------------------------------------------------------------------------
# cache-dit (cache_dit.enable_cache(pipe, ...) / disable_cache(pipe))
# --------------------------------------------------------------------------------------


def cache_dit_status() -> tuple[str, str | None]:
    """(source, why it is unavailable or None)."""
    try:
        version = importlib.metadata.version("cache-dit")
    except importlib.metadata.PackageNotFoundError:
        return "cache-dit", "cache-dit is not installed (pip install --no-deps cache-dit; not a fastdiff dependency)"
    try:
        import cache_dit  # noqa: F401
    except Exception as e:  # whatever its import raises makes it unusable here: say what
        return f"cache-dit {version}", f"cache-dit {version} does not import here: {type(e).__name__}: {e}"
    return f"cache-dit {version}", None


def check_cache_dit(pipe) -> str | None:
    from cache_dit import BlockAdapterRegister

    if isinstance(pipe, torch.nn.Module):
        return "cache-dit peers are applied to the pipeline (its adapters are keyed by pipeline class)"
    if not BlockAdapterRegister.is_supported(pipe) and _cache_dit_family(pipe) is None:
        return f"cache-dit has no BlockAdapter registered for {type(pipe).__name__}"
    return None


def _cache_dit_family(pipe) -> str | None:
    """cache-dit keys its adapters by pipeline class name; a custom pipeline around a denoiser cache-dit knows (our
    reference models) gets cache-dit's own adapter of that denoiser's family, which checks the transformer class."""
    from cache_dit import BlockAdapterRegister

    family = _CACHE_DIT_FAMILIES.get(type(getattr(pipe, "transformer", None)).__name__)
    return family if family in BlockAdapterRegister._adapters else None


# denoiser class -> cache-dit's adapter for its stock pipeline
_CACHE_DIT_FAMILIES = {"DiTTransformer2DModel": "DiT", "FluxTransformer2DModel": "Flux"}


def install_cache_dit(pipe, kw, call_kwargs, taylorseer: bool = False):
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    order = kw.pop("taylorseer_order", 1)
    config = DBCacheConfig(num_inference_steps=steps(call_kwargs), **kw)
    mode = cfg_mode(pipe, call_kwargs)
    if mode is not None:
        # cache-dit tells cond from uncond calls by their parity, with a per-pipeline-class default of how the
        # checkpoint is usually run (Flux: no second call); state what this run really does
        config.enable_separate_cfg = mode == "separate"
    calibrator = None
    if taylorseer:
        # a last block that emits no text stream (SD3's context_pre_only) leaves the encoder forecaster without
        # state: "AssertionError: State 'transformer_blocks_Bn_residual' not found"
        last = blocks(denoiser(pipe))[-1:]
        text_out = not any(getattr(b, "context_pre_only", False) for b in last)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order, enable_encoder_calibrator=text_out)
    from cache_dit import BlockAdapterRegister

    target = pipe
    if not BlockAdapterRegister.is_supported(pipe):
        target = BlockAdapterRegister._adapters[_cache_dit_family(pipe)](pipe)
    with quiet("cache_dit"):
        cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)

    def disable():
        with quiet("cache_dit"):
            cache_dit.disable_cache(pipe)

    return disable
