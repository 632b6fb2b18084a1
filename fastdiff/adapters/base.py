"""Adapters describe a denoiser family as data: its blocks, their I/O, its token layout, its cost streams.

A `FamilySpec` is pure data plus tiny functions; `resolve(denoiser)` binds the spec of the denoiser's
class to the instance and returns a `BlockAdapter`. Adding a family = adding a small file that calls
`register(FamilySpec(...))`. Nothing here runs a model.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..context import COND, UNCOND, UNKNOWN, TokenLayout
from ..errors import ConfigError, UnsupportedModelError

# Token streams a linear/conv layer can act on (cost model): per image token (at UNet level k: "image@k"),
# per text token, both concatenated, or once per sample (timestep/pooled embeddings, adaLN).
IMAGE, TEXT, JOINT, GLOBAL = "image", "text", "joint", "global"


@dataclass(frozen=True)
class IOPattern:
    """Where a block keeps its hidden / encoder states.

    Args:
        hidden_index: index of the hidden states in the returned tuple; None if the block returns a tensor.
        encoder_index: index of the encoder (text) states in the returned tuple, if the block returns them.
        hidden_arg / encoder_arg: names of those inputs in the block's forward.
    """

    hidden_index: int | None = None
    encoder_index: int | None = None
    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = "encoder_hidden_states"


@dataclass(frozen=True)
class BlockList:
    """A ModuleList of blocks on the denoiser: its attribute path, kind and I/O pattern.

    `reuse` says how a cache may stand in for a block: "residual" (output = input + cached delta, for
    transformer blocks) or "output" (the cached output as it was, for UNet blocks with skip outputs).
    """

    path: str
    kind: str
    io: IOPattern = IOPattern()
    reuse: str = "residual"


@dataclass(frozen=True)
class CfgLayout:
    """How a pipeline class runs classifier-free guidance.

    Args:
        mode: "batched" (cond and uncond halves in one call) or "separate" (one call per branch).
        first: the branch of the first half (batched) or of the first call in a step (separate).
        flag: pipeline attribute that is truthy while CFG is on (batched mode), if the pipeline has one.
    """

    mode: str
    first: str
    flag: str | None = "do_classifier_free_guidance"


@dataclass(frozen=True)
class RopeSpec:
    """How a submodule receives rotary position embeddings, so token merging can gather them with the tokens.

    Args:
        arg: name of the argument holding the (cos, sin) pair.
        seq_dim: dimension of each tensor that runs over token positions.
        text: "none" — the positions of the image tokens only; "first" — text positions first, then image ones.
        batch_dim: a broadcast (size-1) batch dimension of the tensors, if they have one: each batch row then
            gets its own gathered positions in one call. None: the positions are shared by all rows, so rows
            whose merges differ run one at a time.
    """

    arg: str
    seq_dim: int = 0
    text: str = "none"
    batch_dim: int | None = None


@dataclass(frozen=True)
class TokenModule:
    """A submodule of a transformer block that runs on tokens, which token merging may wrap.

    Args:
        name: attribute of the block ("attn1", "ff"); blocks where it is missing or None are skipped; "" is the
            block itself, for attention called as a function inside it (ComfyUI's Flux) rather than as a module.
        role: "self_attention", "cross_attention" or "mlp".
        text: where text tokens are in its `hidden_states`: "none" (image tokens only; a cross-attention's text
            comes in as keys), "separate" (text in `encoder_hidden_states`, output a tuple with the image tokens
            at index 0: joint attention), "first" (the block concatenated [text; image] before calling it).
        kv_arg: argument through which keys/values can come from other tokens than the queries (ToDo passes the
            pooled image tokens there). None when the module has none, or where pooled keys would be wrong
            (RoPE rotates keys by their own positions; joint attention projects text and image together).
        rope: the rotary embeddings the module receives, if any.
        mask_arg: an attention mask over [image; text] keys (image keys first) that the module receives and
            whose image part must shrink with the tokens. None: a mask over image keys is not expected there.
    """

    name: str
    role: str
    text: str = "none"
    kv_arg: str | None = None
    rope: RopeSpec | None = None
    mask_arg: str | None = None


@dataclass(frozen=True)
class AttentionOp:
    """An attention op the cost model cannot find as a module with `to_q`/`to_k` linears (a fused qkv projection
    with attention called as a function, e.g. ComfyUI's Flux): priced on the modules whose path matches `path`.

    Args:
        path: regex on the module path of the module that runs the op (e.g. its block).
        width: attribute (dotted path) of that module holding the attention's inner width (heads × head dim).
        q_streams / kv_streams: token streams of the queries and of the keys.
    """

    path: str
    width: str
    q_streams: tuple[str, ...]
    kv_streams: tuple[str, ...]


@dataclass(frozen=True)
class TokenSite:
    """Transformer blocks (module paths matching the regex `blocks`) and the token submodules inside them."""

    blocks: str
    modules: tuple[TokenModule, ...]


# diffusers' BasicTransformerBlock (DiT, PixArt, the SD UNets' Transformer2DModel): attn1 takes keys/values from
# `encoder_hidden_states` when given one, attn2 attends to the text, ff is the MLP; no RoPE.
BASIC_TRANSFORMER_BLOCK = (
    TokenModule("attn1", "self_attention", kv_arg="encoder_hidden_states"),
    TokenModule("attn2", "cross_attention"),
    TokenModule("ff", "mlp"),
)


@dataclass(frozen=True)
class ResampleSpec:
    """How a family's latents change resolution inside a run (resolution-bottleneck sampling).

    Args:
        packing: latent patch side the pipeline packs into one token before the denoiser (FLUX: 2, latents
            (B, tokens, C * 2 * 2)); 1: the denoiser takes (..., H, W) latents and patches them itself.
        positions: (bound call arguments, (h, w) token grid) -> the call arguments that carry token positions or
            the size for that grid, for families whose pipeline passes them in (FLUX `img_ids`, SDXL `time_ids`);
            None: the model derives them from the latent shape (SD3's cropped position table, Wan's and
            HunyuanVideo's RoPE).
        multiple: (denoiser config) -> what a smaller stage's latent height and width must divide by besides the
            packing (a UNet's total downsampling, a patch size); None: 1.
        token_sets: the denoiser takes any set of image tokens with their positions passed in as data (`positions`
            also accepts explicit (N, 2) positions), so a region stage (region-adaptive upsampling) can hand it a
            mixed-resolution set; False where positions come from the latent shape or a convolution sees the grid.
    """

    packing: int = 1
    positions: Callable[[dict, tuple[int, int]], dict] | None = None
    multiple: Callable[[Any], int] | None = None
    token_sets: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """Everything fastdiff knows about one denoiser family, as data.

    Args:
        name: short family name ("dit", "flux", ...).
        classes: denoiser class names this spec serves.
        block_lists: the denoiser's block lists, in execution order.
        hidden_arg: name of the latent input of the denoiser's forward.
        layout: (denoiser, bound forward arguments) -> TokenLayout of this call.
        streams: (regex on the module path, stream) pairs, first match wins, default "image": which tokens
            each Linear/Conv of the denoiser processes. Used by the cost model.
        level: module path -> UNet resolution level (0 = full latent grid); None for transformers.
        pipelines: pipeline class name -> CfgLayout.
        row_branches: optional (denoiser, bound arguments) -> per-row branch labels read from the inputs
            themselves (e.g. DiT's null class label); wins over the pipeline flag.
        latent_grid: (denoiser config, latent frames, height, width) -> token grid (frames, h, w); None for
            the auto fallback, which knows blocks but not the layout.
        text_tokens: typical number of text tokens, the default for `fastdiff.estimate`.
        text_position: where text tokens sit in attention (see TokenLayout).
        reruns: paths of modules the denoiser runs once more outside their block (cost model).
        always_compute: blocks -> indices a step-cache must never skip (a UNet's shallow path).
        attention: where the token submodules (attention, MLP) sit inside the blocks, and how text, RoPE and
            masks reach them — what token merging needs; empty: merging is not supported for the family.
        timestep_arg: name of the timestep input of the denoiser's forward (the clock reads it).
        control: a control network (ControlNet) that a pipeline calls beside its denoiser: its calls are
            accounted in summaries, never accelerated, and it is not a denoiser fastdiff applies to.
        resample: how its latents change resolution (ResampleSpec); None: resolution-bottleneck sampling is
            not supported for the family.
        attention_ops: attention ops to price that are not modules with `to_q`/`to_k` (AttentionOp).
    """

    name: str
    classes: tuple[str, ...]
    block_lists: tuple[BlockList, ...]
    layout: Callable[[torch.nn.Module, dict], TokenLayout] | None
    latent_grid: Callable[[Any, int, int, int], tuple[int, int, int]] | None
    hidden_arg: str = "hidden_states"
    streams: tuple[tuple[str, str], ...] = ()
    level: Callable[[str, torch.nn.Module], int] | None = None
    pipelines: dict[str, CfgLayout] = field(default_factory=dict)
    row_branches: Callable[[torch.nn.Module, dict], tuple[str, ...] | None] | None = None
    text_tokens: int = 0
    text_position: str = "none"
    reruns: tuple[str, ...] = ()
    always_compute: Callable[[list], set[int]] | None = None
    attention: tuple[TokenSite, ...] = ()
    control: bool = False
    timestep_arg: str = "timestep"
    resample: ResampleSpec | None = None
    attention_ops: tuple[AttentionOp, ...] = ()

    def cfg_layout(self, pipeline: Any) -> CfgLayout | None:
        """The CFG layout of `pipeline`'s class, or of the listed base class whose `__call__` it runs: a subclass
        that only adds methods lays out CFG as its base does; one with a `__call__` of its own may lay it out
        differently, so it is unknown until registered (`register_pipeline`)."""
        if pipeline is None:
            return None
        for cls in type(pipeline).__mro__:
            if cls.__name__ in self.pipelines:
                return self.pipelines[cls.__name__]
            if "__call__" in vars(cls):
                return None
        return None

    def stream_of(self, path: str) -> str:
        for pattern, stream in self.streams:
            if re.search(pattern, path):
                return stream
        return IMAGE


@dataclass
class Block:
    """One block of a bound adapter."""

    path: str  # e.g. "transformer_blocks.3"
    index: int  # position in execution order over all block lists
    kind: str
    io: IOPattern
    module: torch.nn.Module
    reuse: str = "residual"


class BlockAdapter:
    """A FamilySpec bound to one denoiser instance."""

    def __init__(self, spec: FamilySpec, denoiser: torch.nn.Module):
        self.spec = spec
        self.denoiser = denoiser
        self.blocks: list[Block] = []
        for bl in spec.block_lists:
            mlist = denoiser.get_submodule(bl.path) if _has_path(denoiser, bl.path) else None
            if mlist is None:
                continue  # e.g. a UNet without a mid block
            members = list(mlist) if isinstance(mlist, torch.nn.ModuleList) else [mlist]
            prefix = bl.path if isinstance(mlist, torch.nn.ModuleList) else None
            for i, module in enumerate(members):
                path = f"{prefix}.{i}" if prefix else bl.path
                self.blocks.append(Block(path, len(self.blocks), bl.kind, bl.io, module, bl.reuse))
        if not self.blocks:
            raise UnsupportedModelError(
                f"{type(denoiser).__name__}: adapter '{spec.name}' found none of its block lists "
                f"{[b.path for b in spec.block_lists]}"
            )
        self.signature = inspect.signature(type(denoiser).forward)

    @property
    def name(self) -> str:
        return self.spec.name

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The denoiser forward's arguments by name (defaults not filled in)."""
        return self.signature.bind_partial(self.denoiser, *args, **kwargs).arguments

    def hidden_input(self, bound: dict) -> torch.Tensor:
        return bound[self.spec.hidden_arg]

    def layout(self, bound: dict) -> TokenLayout | None:
        return None if self.spec.layout is None else self.spec.layout(self.denoiser, bound)

    def branches(self, bound: dict, pipeline: Any, call: int, signal: str | None = None) -> tuple[str, ...]:
        """Branch label of each batch row of this call: read from the inputs (`row_branches`), else the host's
        `signal` for the whole call (diffusers' `cache_context("cond"/"uncond")`), else the pipeline's CFG layout."""
        batch = self.hidden_input(bound).shape[0]
        if self.spec.row_branches is not None:
            rows = self.spec.row_branches(self.denoiser, bound)
            if rows is not None:
                return rows
        if signal is not None:
            return (signal,) * batch
        cfg = self.spec.cfg_layout(pipeline)
        if cfg is None:
            return (UNKNOWN,) * batch
        other = UNCOND if cfg.first == COND else COND
        if cfg.mode == "separate":
            return ((cfg.first if call == 0 else other),) * batch
        if cfg.flag is not None and hasattr(pipeline, cfg.flag):
            on = bool(getattr(pipeline, cfg.flag))
        else:
            # No flag to read (PixArt, DiT keep it local): batched CFG feeds the same latents to both halves.
            hidden = self.hidden_input(bound)
            on = batch % 2 == 0 and torch.equal(hidden[: batch // 2], hidden[batch // 2:])
        if not on:
            return (COND,) * batch
        half = batch // 2
        return (cfg.first,) * half + (other,) * (batch - half)


def _has_path(module: torch.nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


# -- registry --------------------------------------------------------------------------------------
_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    for cls in spec.classes:
        _REGISTRY[cls] = spec
    return spec


CFG_MODES = ("batched", "separate")


def register_pipeline(pipeline: type | str, layout: CfgLayout, *, family: str) -> None:
    """Say how a pipeline class lays out classifier-free guidance for the denoisers of `family`, so that a pipeline
    defined outside the adapters (a subclass or a pipeline of one's own) gets each row's branch (guidance skipping
    needs it). `pipeline` is the class or its name; a subclass of it that keeps its `__call__` is matched too
    (`FamilySpec.cfg_layout`).

        fastdiff.register_pipeline(MyPipeline, fastdiff.CfgLayout("batched", "uncond"), family="unet")

    Registering a pipeline again with the same layout changes nothing; with another one it raises ConfigError, as
    does any bad argument (the message names what is accepted)."""
    families = sorted({s.name for s in specs() if not s.control})
    if family not in families:
        raise ConfigError(f"register_pipeline: family {family!r:.60} is not a registered denoiser family; "
                          f"families: {families}")
    name = pipeline.__name__ if isinstance(pipeline, type) else pipeline
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_pipeline: pipeline must be a pipeline class or its class name, got {pipeline!r:.60}")
    if not isinstance(layout, CfgLayout):
        raise ConfigError(f"register_pipeline: layout must be a CfgLayout(mode, first, flag), got "
                          f"{type(layout).__name__}")
    if layout.mode not in CFG_MODES or layout.first not in (COND, UNCOND) or \
            not (layout.flag is None or isinstance(layout.flag, str) and layout.flag.isidentifier()):
        raise ConfigError(f"register_pipeline: {layout!r:.120} is not a CFG layout: mode must be one of {CFG_MODES}, "
                          f"first one of {(COND, UNCOND)}, flag None or a pipeline attribute name")
    targets = [s for s in specs() if s.name == family]
    for spec in targets:
        known = spec.pipelines.get(name)
        if known is not None and known != layout:
            raise ConfigError(f"register_pipeline: {name} is already registered for '{family}' as {known}, not {layout}")
    for spec in targets:
        spec.pipelines[name] = layout


def specs() -> list[FamilySpec]:
    """Every registered FamilySpec, once each."""
    return list({id(s): s for s in _REGISTRY.values()}.values())


def supported() -> dict[str, list[str]]:
    """Family name -> denoiser class names fastdiff has adapters for."""
    out: dict[str, list[str]] = {}
    for cls, spec in _REGISTRY.items():
        out.setdefault(spec.name, []).append(cls)
    return out


def resolve(denoiser: torch.nn.Module) -> BlockAdapter:
    """The adapter for `denoiser`: by its class (or a base class), else the auto fallback (`auto.py`); raises
    UnsupportedModelError when neither applies."""
    for cls in type(denoiser).__mro__:
        spec = _REGISTRY.get(cls.__name__)
        if spec is not None:
            return BlockAdapter(spec, denoiser)
    from . import auto  # the fallback builds on this module

    spec, looked_for = auto.find_spec(denoiser)
    if spec is not None:
        return auto.AutoAdapter(spec, denoiser)
    names = ", ".join(sorted(_REGISTRY))
    raise UnsupportedModelError(
        f"fastdiff has no adapter for {type(denoiser).__name__}, and the auto adapter found no {looked_for} on it. "
        f"Supported denoisers: {names}. "
        "Pass a diffusers pipeline or one of those models, or register a FamilySpec for this class."
    )


# -- small helpers the family files share ------------------------------------------------------------
def patch_grid(f: int, h: int, w: int, pt: int, ph: int, pw: int) -> tuple[int, int, int]:
    """Token grid of a (frames, height, width) latent cut into (pt, ph, pw) patches."""
    return (f // pt, h // ph, w // pw)


def tensor_layout(dims: str, latent_grid: Callable, text_position: str,
                  hidden_arg: str = "hidden_states", text_arg: str = "encoder_hidden_states") -> Callable:
    """A layout function for latents stored as `dims` ("BCHW", "BCFHW" or "BFCHW")."""

    def layout(denoiser: torch.nn.Module, bound: dict) -> TokenLayout:
        shape = dict(zip(dims, bound[hidden_arg].shape))
        grid = latent_grid(denoiser.config, shape.get("F", 1), shape["H"], shape["W"])
        text = bound.get(text_arg)
        n_text = text.shape[1] if isinstance(text, torch.Tensor) and text_position != "none" else 0
        return TokenLayout(grid, n_text, text_position if n_text else "none")

    return layout
