"""Named, removable forward wrappers — the only way fastdiff touches a model.

A wrapper is stored as an instance attribute (`module.forward`), never by changing the class, and
`HookSet.remove()` restores each attribute exactly as it was (absent, or the previous wrapper of
another library), newest first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from .errors import FastDiffError

Wrapper = Callable[[Callable, tuple, dict], Any]


class HookSet:
    def __init__(self) -> None:
        self._entries: list[tuple[Any, str, bool, Any, Callable]] = []

    def wrap(self, obj: Any, name: str, wrapper: Wrapper, attr: str = "forward") -> None:
        """Make `obj.<attr>(*a, **kw)` call `wrapper(inner, a, kw)`, where `inner` is what it called before."""
        had = attr in obj.__dict__
        previous = obj.__dict__.get(attr)
        inner = getattr(obj, attr)

        @functools.wraps(inner)  # keeps the signature visible: pipelines inspect scheduler.step's parameters
        def hooked(*args, **kwargs):
            return wrapper(inner, args, kwargs)

        hooked.__fastdiff_hook__ = name
        obj.__dict__[attr] = hooked
        self._entries.append((obj, attr, had, previous, hooked))

    def names(self) -> list[str]:
        return [hooked.__fastdiff_hook__ for *_, hooked in self._entries]

    def remove(self) -> None:
        # Check first, so that a refusal leaves every hook in place: the outermost wrapper of each
        # attribute must still be our newest one.
        newest = {(id(obj), attr): (obj, hooked) for obj, attr, _, _, hooked in self._entries}
        for (_, attr), (obj, hooked) in newest.items():
            if obj.__dict__.get(attr) is not hooked:
                raise FastDiffError(
                    f"{type(obj).__name__}.{attr} was wrapped again by someone else after fastdiff; "
                    "remove that wrapper first, then fastdiff.remove()"
                )
        while self._entries:
            obj, attr, had, previous, _ = self._entries.pop()
            if had:
                obj.__dict__[attr] = previous
            else:
                del obj.__dict__[attr]
