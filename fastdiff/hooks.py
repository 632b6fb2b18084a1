"""Named, removable forward wrappers — the only way fastdiff touches a model.

A wrapper is stored as an instance attribute (`module.forward`), never by changing the class, and
`HookSet.remove()` restores each attribute exactly as it was (absent, or the previous wrapper of
another library), newest first.

accelerate's hooks (what diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload` install) keep
the module's own forward in `module._old_forward` and call it from the `module.forward` they set. diffusers
removes and re-adds them at the end of every pipeline call (`maybe_free_model_hooks`), which sets
`forward = _old_forward` and wraps again. So fastdiff's wrapper always goes *under* an accelerate hook (into
`_old_forward`): it survives that cycle, accelerate keeps moving the weights on top of it, and `remove()` takes it
out of whichever of the two attributes holds it then, leaving accelerate's hook working on the bare forward.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import FastDiffError

Wrapper = Callable[[Callable, tuple, dict], Any]

_UNDER = "_old_forward"  # where accelerate's add_hook_to_module keeps the forward it wraps
_DIFFUSERS = "_diffusers_hook"  # diffusers' HookRegistry (e.g. enable_parallelism's context-parallel split hooks)


def _diffusers_ref(obj: Any, hooked: Callable) -> tuple[Any, str] | None:
    """The diffusers HookFunctionReference (and its field) holding `hooked`, when a diffusers hook was registered
    over fastdiff's wrapper: the registry keeps what it wrapped there and calls it from `module.forward`."""
    for ref in getattr(obj.__dict__.get(_DIFFUSERS), "_fn_refs", ()):
        for field in ("forward", "original_forward"):
            if getattr(ref, field, None) is hooked:
                return ref, field
    return None


def _accelerate_hooked(obj: Any, attr: str) -> bool:
    """Whether `obj.<attr>` is accelerate's hook wrapper around `obj._old_forward`."""
    if attr != "forward" or _UNDER not in obj.__dict__ or "_hf_hook" not in obj.__dict__:
        return False
    func = getattr(obj.__dict__.get(attr), "func", None)  # add_hook_to_module: partial(new_forward, module)
    return getattr(func, "__module__", "").startswith("accelerate")


class _Hooked:
    """The wrapper fastdiff stores on a hooked object: calls `wrapper(inner, args, kwargs)`.

    A `copy.deepcopy` of the object gets (a copy of) what was there before fastdiff, bound to the copy: a copied
    block or scheduler computes with its own weights and state, never through the original's hooks. (A copy of a
    whole accelerated denoiser is refused by its Session.) Pickling one raises a clear error.
    """

    def __init__(self, name: str, wrapper: Wrapper, inner: Callable):
        functools.update_wrapper(self, inner)  # keeps the signature visible: pipelines inspect scheduler.step
        self.__fastdiff_hook__ = name
        self._wrapper = wrapper
        self.__wrapped__ = inner

    def __call__(self, *args, **kwargs):
        return self._wrapper(self.__wrapped__, args, kwargs)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.__wrapped__, memo)

    def __reduce_ex__(self, protocol):
        raise FastDiffError(
            f"a model accelerated by fastdiff cannot be pickled ({self.__fastdiff_hook__} is a fastdiff wrapper): "
            "call fastdiff.remove(pipe) first, then pickle")


@dataclass
class _Entry:
    obj: Any
    attr: str  # the attribute callers use ("forward", "step", ...)
    slot: str  # where the wrapper was stored: `attr`, or `_old_forward` under an accelerate hook
    had: bool  # whether `slot` was in the instance dict before
    inner: Callable  # what the wrapper calls (and what goes back on remove)
    hooked: Callable

    def where(self) -> str | None:
        """The attribute holding the wrapper now (accelerate moves it between forward and _old_forward)."""
        d = self.obj.__dict__
        for slot in (self.attr, _UNDER) if self.attr == "forward" else (self.attr,):
            if d.get(slot) is self.hooked:
                return slot
        if self.attr == "forward" and _diffusers_ref(self.obj, self.hooked) is not None:
            return _DIFFUSERS
        return None


class HookSet:
    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._watch: tuple = ()  # see seal()

    def wrap(self, obj: Any, name: str, wrapper: Wrapper, attr: str = "forward") -> None:
        """Make `obj.<attr>(*a, **kw)` call `wrapper(inner, a, kw)`, where `inner` is what it called before."""
        slot = _UNDER if _accelerate_hooked(obj, attr) else attr
        had = slot in obj.__dict__
        inner = obj.__dict__[slot] if slot != attr else getattr(obj, attr)

        hooked = _Hooked(name, wrapper, inner)
        obj.__dict__[slot] = hooked
        self._entries.append(_Entry(obj, attr, slot, had, inner, hooked))

    def names(self) -> list[str]:
        return [e.hooked.__fastdiff_hook__ for e in self._entries]

    def remove(self) -> None:
        # Check first, so that a refusal leaves every hook in place: the outermost wrapper of each
        # attribute (under accelerate's hook, if one sits on top) must still be our newest one.
        newest = {(id(e.obj), e.attr): e for e in self._entries}
        for e in newest.values():
            if e.where() is None:
                raise FastDiffError(
                    f"{type(e.obj).__name__}.{e.attr} was wrapped again by someone else after fastdiff; "
                    "remove that wrapper first, then fastdiff.remove()")
        while self._entries:
            e = self._entries.pop()
            slot = e.where()
            if slot == _DIFFUSERS:  # a diffusers hook wraps ours (enable_parallelism after apply): unlink ours there
                ref, field = _diffusers_ref(e.obj, e.hooked)
                setattr(ref, field, e.inner)
                outer = e.obj.__dict__.get(e.attr)  # the registry's forward copies __wrapped__ from what it wrapped
                if getattr(outer, "__wrapped__", None) is e.hooked:
                    outer.__wrapped__ = e.inner
            elif slot == e.slot and not e.had:
                del e.obj.__dict__[slot]
            else:  # where we put it, or where accelerate moved it: what we wrapped goes back there
                e.obj.__dict__[slot] = e.inner
        self._watch = ()

    # -- the hooked modules must still be the model's ------------------------------------------------
    def seal(self, *roots: torch.nn.Module) -> None:
        """Remember where under `roots` each hooked module sits (call once all hooks are on), for check_intact."""
        hooked = {id(e.obj) for e in self._entries if isinstance(e.obj, torch.nn.Module)}
        links: dict[tuple[int, str], tuple] = {}  # every (parent, child name) edge from a root to a hooked module
        for root in roots:
            for path, module in root.named_modules():
                if not path or id(module) not in hooked:
                    continue
                parent, parts = root, path.split(".")
                for i, part in enumerate(parts):
                    child = parent._modules[part]
                    links.setdefault((id(parent), part), (parent._modules, part, child,
                                                          f"{type(root).__name__}.{'.'.join(parts[: i + 1])}"))
                    parent = child
        self._watch = tuple(zip(*links.values())) if links else ()

    def check_intact(self) -> None:
        """Raise if a module hooked under the sealed roots was replaced (e.g. `blocks[1] = other`) since seal():
        its hooks are on the old object, so the call would compute the wrong thing. One C-level pass per call."""
        if not self._watch:
            return
        dicts, names, children, paths = self._watch
        if all(map(operator.is_, map(dict.get, dicts, names), children)):
            return
        where = next(p for d, n, c, p in zip(*self._watch) if d.get(n) is not c)
        raise FastDiffError(
            f"{where} was replaced after fastdiff.apply (fastdiff's hooks are on the module that was there), so "
            "this call would not compute what the config says. Call fastdiff.remove(pipe), then apply again "
            "after replacing modules")


class Args:
    """Read / replace a module's forward arguments by name, however the caller passed them (by position or by
    keyword) — the one binder of the hooks on blocks and submodules: a table of positions made once per module when
    its hook is made, so a call costs a dict lookup, never a signature bind. (The denoiser call itself is bound once
    per call by the host: `host.Call.args`.)"""

    def __init__(self, module: torch.nn.Module):
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # [0] is self
        self.position: dict[str, int] = {}
        for i, p in enumerate(params):
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                break
            self.position[p.name] = i

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.position.get(name)
        return args[i] if i is not None and i < len(args) else None

    def set(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        i = self.position.get(name)
        if name not in kwargs and i is not None and i < len(args):
            args = args[:i] + (value,) + args[i + 1:]
        else:
            kwargs = {**kwargs, name: value}
        return args, kwargs
