"""The auto adapter: a denoiser class no family file describes, read from its own structure.

What it finds, at apply (nothing runs):
- a UNet: `down_blocks` / optional `mid_block` / `up_blocks` of callable blocks. Their outputs are not shaped like
  their inputs (skip tuples, resampling), so a cache replays each block's own output (DeepCache), and the outermost
  down and up block are always computed: they refresh the full-resolution path around the reused deep features.
- otherwise the repeated-block lists: every `ModuleList` of >= 2 blocks of one class (the denoiser's own children
  or one level below them; no bare torch layers), in registration order. Lists join one chain where both sides
  are provably dual-stream (blocks take the text states and return them: diffusers' block registry or the
  block's `return` statements say so); elsewhere the denoiser may concatenate or reshape between two lists, so
  each list is a chain of its own. The chain the adapter serves is the one whose blocks attend (transformer
  blocks, not repeated embedders or projections) with the most parameters; the other lists always run. Its
  blocks' change is reused as a residual (output = input + cached change), never their stale output.
  Which argument holds the hidden / text states: diffusers' block registry, else the block's signature.

What it learns on the first real call: one extra forward of the denoiser with that call's own arguments (no grad,
the blocks hooked with torch forward hooks that are removed right after; only shapes are kept) records, per
block, whether it returns a tensor or a tuple and at which index each stream sits, the shapes it took and gave,
and the order the blocks ran in. That costs one denoiser forward once per apply.
Why the first call and not apply: a forward needs inputs, and a class fastdiff has never seen cannot be given
made-up ones (its latent layout, ids, masks, sizes are its own). The
registry alone is not enough either: it names arguments but not whether a block returns a tensor (it says index
0 for BasicTransformerBlock, which returns a tensor). A chain that the probe shows to be unsafe — blocks that ran
out of order, interleaved with other lists or not at all, outputs not shaped like their inputs, extra outputs a
stand-in cannot fill — is refused with UnsupportedModelError naming what was found.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .base import BlockAdapter, BlockList, FamilySpec, IOPattern

_PROBE_LOCK = threading.RLock()  # reentrant: a probed forward may call another accelerated denoiser
DENOISER_INPUTS = ("hidden_states", "sample", "x")


@dataclass(frozen=True)
class _Chain:
    """Block lists run one after another, each block feeding the next (a cache span may cover them all)."""

    paths: tuple[str, ...]
    params: int
    attends: bool


def find_spec(denoiser: torch.nn.Module) -> tuple[FamilySpec | None, str]:
    """The auto FamilySpec of `denoiser`, or (None, what was looked for and not found)."""
    params = [p for p in inspect.signature(type(denoiser).forward).parameters if p != "self"]
    # the latent input: by its usual names, else the first argument (UVit2DModel's `input_ids`)
    hidden_arg = next((a for a in DENOISER_INPUTS if a in params), params[0] if params else None)
    timestep_arg = next((a for a in ("timestep", "timesteps", "t") if a in params), "timestep")  # HiDream, ZImage
    if hidden_arg is None:
        return None, "an input in its forward"
    unet = _unet_lists(denoiser)
    if unet is not None:
        lists = tuple(BlockList(path, kind, IOPattern(encoder_arg=None, hidden_arg=_block_hidden_arg(module)),
                                reuse="output") for path, kind, module in unet)
        return FamilySpec(name="auto", classes=(), block_lists=lists, layout=None, latent_grid=None,
                          hidden_arg=hidden_arg, timestep_arg=timestep_arg, always_compute=_unet_outer), ""
    chains = _chains(denoiser)
    if not chains:
        return None, ("`down_blocks`/`up_blocks` of callable blocks, or a ModuleList of two or more blocks of one "
                      "class (on the denoiser or one level below)")
    # the main chain: transformer blocks (they attend) before other repeated modules (embedders, projections),
    # then the most parameters
    best = max(chains, key=lambda c: (c.attends, c.params))
    lists = tuple(BlockList(path, "auto", _static_io(denoiser.get_submodule(path)[0])) for path in best.paths)
    return FamilySpec(name="auto", classes=(), block_lists=lists, layout=None, latent_grid=None,
                      hidden_arg=hidden_arg, timestep_arg=timestep_arg), ""


class AutoAdapter(BlockAdapter):
    """A BlockAdapter whose blocks' I/O is confirmed by a probe of the first call (see the module docstring).

    The probe runs in `bind`, the first thing a host asks of the adapter in every denoiser call, so the blocks'
    I/O is known before any mechanism sees that call.
    """

    def __init__(self, spec: FamilySpec, denoiser: torch.nn.Module):
        super().__init__(spec, denoiser)
        self._probed = False
        # every repeated-block list of the denoiser: the probe checks that none of them runs inside the chain
        self._others = [m for path, m in _repeated_lists(denoiser) if path not in {b.path for b in spec.block_lists}]

    def bind(self, args: tuple, kwargs: dict) -> dict:
        if not self._probed:
            with _PROBE_LOCK:  # one probe at a time (two threads' first calls): probes are once per adapter
                if not self._probed:
                    self._probe(args, kwargs)
                    self._probed = True
        return super().bind(args, kwargs)

    def hidden_input(self, bound: dict) -> torch.Tensor:
        """The latent input; a list of one latent per batch row (ZImageTransformer2DModel) reads as their stack
        (hosts read only its shape and rows)."""
        hidden = bound[self.spec.hidden_arg]
        if isinstance(hidden, torch.Tensor):
            return hidden
        if isinstance(hidden, (list, tuple)) and hidden and all(isinstance(h, torch.Tensor) for h in hidden) \
                and len({h.shape for h in hidden}) == 1:
            return torch.stack(list(hidden))
        raise UnsupportedModelError(
            f"{type(self.denoiser).__name__}: its latent input '{self.spec.hidden_arg}' is a "
            f"{type(hidden).__name__}, not a tensor or a list of equally shaped tensors; the auto adapter cannot "
            "tell its batch rows. Register a FamilySpec for this class.")

    # -- the probe ----------------------------------------------------------------------------------
    def _probe(self, args: tuple, kwargs: dict) -> None:
        seen: dict[int, dict] = {}
        order: list[Any] = []
        handles = []
        owner = {id(b.module): b for b in self.blocks}

        inside = [0]  # chain blocks running now: other lists' blocks running inside them are their own business

        def pre(module, a, kw):
            block = owner.get(id(module))
            if block is None:
                if not inside[0]:
                    order.append("other")
                return
            inside[0] += 1
            order.append(block.index)
            if block.index not in seen:
                try:
                    bound = inspect.signature(type(module).forward).bind(module, *a, **kw).arguments
                except TypeError:  # a forward whose signature does not describe its call: no named inputs
                    bound = {}
                enc = bound.get(block.io.encoder_arg) if block.io.encoder_arg else None
                seen[block.index] = {"hidden": _shape(bound.get(block.io.hidden_arg)), "encoder": _shape(enc)}

        def post(module, a, kw, out):
            block = owner.get(id(module))
            if block is None:
                return
            inside[0] -= 1
            rec = seen.get(block.index)
            if rec is None or "out" in rec:
                return
            # only shapes are kept (a torch.Size for a tensor, a tuple of them for a tuple): no activations
            if isinstance(out, torch.Tensor):
                rec["out"] = out.shape
            elif isinstance(out, (tuple, list)):
                rec["out"] = tuple(o.shape if isinstance(o, torch.Tensor) else None if o is None else "other"
                                   for o in out)
            else:
                rec["out"] = "other"

        try:
            for module in [b.module for b in self.blocks] + [m for lst in self._others for m in lst]:
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True))
            with torch.no_grad():
                _original_forward(self.denoiser)(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        outputs = {i: rec.pop("out", None) for i, rec in seen.items()}
        try:
            self._check_order(order)
            if any(b.reuse == "residual" for b in self.blocks):  # UNet blocks' outputs are replayed as they were
                self._settle_io(seen, outputs)
        except UnsupportedModelError:
            if self._stood_in():
                raise
            # nothing stands in for these blocks (telemetry only reads their inputs): nothing unsafe to refuse

    def _stood_in(self) -> bool:
        """Whether a step cache wraps any of the blocks (its hooks are named `fastdiff.cache.<block path>`)."""
        for block in self.blocks:
            forward = block.module.__dict__.get("forward")
            while forward is not None and hasattr(forward, "__fastdiff_hook__"):
                if forward.__fastdiff_hook__.startswith("fastdiff.cache."):
                    return True
                forward = getattr(forward, "__wrapped__", None)
        return False

    def _check_order(self, order: list) -> None:
        model = type(self.denoiser).__name__
        ran = [i for i in order if i != "other"]
        expected = [b.index for b in self.blocks]
        if sorted(set(ran)) != expected:
            missing = [self.blocks[i].path for i in expected if i not in ran]
            raise UnsupportedModelError(
                f"{model}: the auto adapter found the blocks {self._paths()}, but the first call did not run "
                f"{missing}: no cache span over them would skip work. Register a FamilySpec for {model}.")
        start = order.index(expected[0])
        run = order[start: start + len(expected)]
        if run != expected:
            raise UnsupportedModelError(
                f"{model}: the blocks {self._paths()} do not run one after another in the first call (order "
                f"{order[start: start + len(expected) + 2]}...: interleaved with other blocks or run twice), so a "
                f"cache span cannot stand in for them. Register a FamilySpec for {model}.")

    def _settle_io(self, seen: dict, outputs: dict) -> None:
        """Each block's IOPattern from what it took and returned; refuse a chain a residual cannot span."""
        model = type(self.denoiser).__name__
        for block in self.blocks:
            rec, out = seen[block.index], outputs[block.index]
            hidden, encoder = rec["hidden"], rec["encoder"]
            where = f"{model}: block {block.path} ({type(block.module).__name__})"
            if hidden is None:
                raise UnsupportedModelError(f"{where} got no tensor as '{block.io.hidden_arg}'; the auto adapter "
                                            f"cannot tell its hidden states. Register a FamilySpec for {model}.")
            if isinstance(out, torch.Size):
                if tuple(out) != hidden:
                    raise UnsupportedModelError(
                        f"{where} returns {tuple(out)} from hidden states {hidden}: not a residual block, "
                        f"so a cache cannot stand in for it. Register a FamilySpec for {model}.")
                block.io = replace(block.io, hidden_index=None, encoder_index=None)
                continue
            if not isinstance(out, tuple):
                raise UnsupportedModelError(f"{where} returns neither a tensor nor a tuple of tensors.")
            h = _pick(out, hidden, block.io.hidden_index, _return_names(type(block.module)), block.io.hidden_arg)
            if h is None:
                raise UnsupportedModelError(
                    f"{where} returns {len(out)} values, none (or more than one, indistinguishably) shaped like its "
                    f"hidden states {hidden}. Register a FamilySpec for {model}.")
            rest = [i for i in range(len(out)) if i != h]
            e = None
            if encoder is not None:
                cand = [i for i in rest if isinstance(out[i], torch.Size) and tuple(out[i]) == encoder]
                e = block.io.encoder_index if block.io.encoder_index in cand else cand[0] if len(cand) == 1 else None
            extra = [i for i in rest if i != e and out[i] is not None]
            if extra:
                raise UnsupportedModelError(
                    f"{where} returns more than hidden and text states (outputs {extra}); a cache stand-in could not "
                    f"fill them. Register a FamilySpec for {model}.")
            block.io = replace(block.io, hidden_index=h, encoder_index=e)
        for a, b in zip(self.blocks, self.blocks[1:]):
            out_a = outputs[a.index]
            ha = tuple(out_a if isinstance(out_a, torch.Size) else out_a[a.io.hidden_index])
            if ha != seen[b.index]["hidden"]:
                raise UnsupportedModelError(
                    f"{model}: {a.path} returns hidden states {ha} but {b.path} takes "
                    f"{seen[b.index]['hidden']}: the denoiser reshapes between them, so one cache span cannot cover "
                    f"both. Register a FamilySpec for {model}.")

    def _paths(self) -> list[str]:
        return [bl.path for bl in self.spec.block_lists]


# -- finding blocks ----------------------------------------------------------------------------------
def _callable_block(module: Any) -> bool:
    return isinstance(module, torch.nn.Module) and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))


def _unet_lists(denoiser: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]] | None:
    """(path, kind, first module) of a UNet's down, mid and up blocks; None when it is not such a UNet."""
    down, up = getattr(denoiser, "down_blocks", None), getattr(denoiser, "up_blocks", None)
    if not (isinstance(down, torch.nn.ModuleList) and isinstance(up, torch.nn.ModuleList) and len(down) and len(up)):
        return None
    if not all(_callable_block(m) for m in [*down, *up]):
        return None  # e.g. levels that are lists of blocks: the denoiser runs their members itself
    found = [("down_blocks", "down", down[0])]
    mid = getattr(denoiser, "mid_block", None)
    if _callable_block(mid):
        found.append(("mid_block", "mid", mid))
    found.append(("up_blocks", "up", up[0]))
    return found


def _unet_outer(blocks) -> set[int]:
    """DeepCache: the outermost down block and up block always run; everything deeper may be replayed."""
    downs = [b.index for b in blocks if b.kind == "down"]
    ups = [b.index for b in blocks if b.kind == "up"]
    return {downs[0], ups[-1]}


def _repeated_lists(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """ModuleLists of >= 2 modules of one (non-torch) class: the denoiser's children and their children."""
    found = []
    for name, child in denoiser.named_children():
        places = [(name, child)]
        if not isinstance(child, torch.nn.ModuleList):
            places += [(f"{name}.{n}", c) for n, c in child.named_children()]
        for path, module in places:
            if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
                continue
            classes = {type(m) for m in module}
            cls = next(iter(classes))
            if len(classes) == 1 and _callable_block(module[0]) and not cls.__module__.startswith("torch.") \
                    and _block_hidden_arg(module[0]) is not None:
                found.append((path, module))
    return found


def _chains(denoiser: torch.nn.Module) -> list[_Chain]:
    chains: list[_Chain] = []
    previous = None
    for path, module in _repeated_lists(denoiser):
        n = sum(p.numel() for p in module.parameters())
        attends = any("Attention" in type(m).__name__ or "Attn" in type(m).__name__ for m in module[0].modules())
        dual = _dual_stream(module[0])
        if chains and dual and previous:
            last = chains.pop()
            chains.append(_Chain(last.paths + (path,), last.params + n, last.attends or attends))
        else:
            chains.append(_Chain((path,), n, attends))
        previous = dual
    return chains


# -- block I/O, statically ---------------------------------------------------------------------------
def _block_hidden_arg(module: torch.nn.Module) -> str | None:
    names = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    meta = _registry(type(module))
    if meta is not None and meta.hidden_states_argument_name in names:
        return meta.hidden_states_argument_name
    if "hidden_states" in names:
        return "hidden_states"
    return names[0] if names else None


def _static_io(module: torch.nn.Module) -> IOPattern:
    """I/O as far as it is known without a call (the probe settles the rest)."""
    names = inspect.signature(type(module).forward).parameters
    meta = _registry(type(module))
    hidden_arg = _block_hidden_arg(module)
    if meta is not None:
        enc = meta.encoder_hidden_states_argument_name
        return IOPattern(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index, hidden_arg,
                         enc if enc in names else None)
    return IOPattern(None, None, hidden_arg, "encoder_hidden_states" if "encoder_hidden_states" in names else None)


def _dual_stream(module: torch.nn.Module) -> bool:
    """The block takes text states and returns them updated (so a following dual-stream list gets them as is)."""
    io = _static_io(module)
    if io.encoder_arg is None:
        return False
    meta = _registry(type(module))
    if meta is not None and meta.return_encoder_hidden_states_index is not None:
        return True
    names = _return_names(type(module))
    return bool(names) and all(r is not None and io.encoder_arg in r and io.hidden_arg in r for r in names)


def _return_names(cls: type) -> list[tuple[str, ...] | None]:
    """Per `return` statement of cls.forward: the names in a returned tuple literal (None for anything else)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return []
    out = []
    for node in ast.walk(tree.body[0]):
        if isinstance(node, ast.Return):
            value = node.value
            if isinstance(value, ast.Tuple):
                out.append(tuple(e.id if isinstance(e, ast.Name) else "" for e in value.elts))
            else:
                out.append(None)
    return out


def _pick(out: tuple, hidden: tuple, hint: int | None, returns: list, hidden_arg: str) -> int | None:
    """Index of the hidden states in a block's returned tuple: the one element shaped like them, the registry's
    index or the position of the hidden argument's name in the `return` tuple when more than one is."""
    cand = [i for i, o in enumerate(out) if isinstance(o, torch.Size) and tuple(o) == hidden]
    if len(cand) == 1:
        return cand[0]
    if hint in cand:
        return hint
    named = {r.index(hidden_arg) for r in returns if r is not None and hidden_arg in r and len(r) == len(out)}
    if len(named) == 1 and next(iter(named)) in cand:
        return next(iter(named))
    return None


def _registry(cls: type):
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        return TransformerBlockRegistry.get(cls)
    except Exception:  # not registered there (or an older diffusers)
        return None


def _shape(x: Any) -> tuple | None:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _original_forward(denoiser: torch.nn.Module):
    """The denoiser's forward under fastdiff's own wrappers (another library's, e.g. an offload hook, stay)."""
    forward = denoiser.forward
    while hasattr(forward, "__fastdiff_hook__"):
        forward = forward.__wrapped__
    return forward
