"""Routing a model's own SDPA calls to fastdiff, only inside the attention modules a mechanism chose.

diffusers computes attention in its processors, which call `torch.nn.functional.scaled_dot_product_attention`
either directly (AttnProcessor2_0, JointAttnProcessor2_0, ...) or through `dispatch_attention_fn`'s native backend
(Flux, Wan, ...). Replacing that one function is how a mechanism reaches the attention of every family without
copying a single processor: while installed, the replacement (a *router*) looks up a handler in a context variable
that only a hooked module's forward sets. Anywhere else — another pipeline in the same process, the text encoder,
a module fastdiff did not choose — the call goes on, untouched, to the function the router replaced.

Who holds the router: each `install(owner)` is one user, released by `uninstall(owner)` or, if the owner is
garbage-collected without it (a session dropped without `remove()`), by a finalizer. When the last user leaves:

- if `F.scaled_dot_product_attention` is still this router, the function it replaced is put back (torch's own,
  or another library's patch that was there before);
- if another library patched over the router meanwhile, their patch stays — it may still call the router, so the
  router turns inert instead: a plain pass-through that never consults a handler again. The next install makes a
  fresh router on top of whatever is installed then, so routers never call each other in a loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

# A handler takes (query, key, value, attn_mask, scale) and returns the attention output, or None to let SDPA run.
Handler = Callable[..., "torch.Tensor | None"]
_handler: contextvars.ContextVar[Handler | None] = contextvars.ContextVar("fastdiff_attention", default=None)

_lock = threading.Lock()
_count = 0  # users not yet released
_leases: "weakref.WeakKeyDictionary[object, weakref.finalize]" = weakref.WeakKeyDictionary()  # owner -> finalizer
_queued: list[None] = []  # releases by finalizers that found the lock taken (see _queue_release)
_router: Callable | None = None  # the installed router, while there are users


def _make_router(below: Callable) -> Callable:
    live = [True]  # False once its last user left: then a pure pass-through to `below`

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        handler = _handler.get() if live[0] else None
        if handler is not None and dropout_p == 0.0 and not is_causal and not kwargs.get("enable_gqa", False):
            out = handler(query, key, value, attn_mask, scale)
            if out is not None:
                return out
        return below(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, **kwargs)

    routed.fastdiff_below = below  # what the router replaced (and what uninstall puts back)
    routed.fastdiff_live = live
    return routed


def installed() -> bool:
    """Whether a router with users is in place (it may sit under another library's patch)."""
    return _router is not None


def install(owner: object | None = None) -> None:
    """Route SDPA for one more user. With `owner`, the use ends at `uninstall(owner)` or when `owner` is
    garbage-collected, whichever comes first (a mechanism passes itself)."""
    global _count, _router
    with _lock:
        _apply_queued()
        if owner is not None and owner in _leases:
            raise RuntimeError(f"fastdiff attention routing: {type(owner).__name__} is already a user")
        if _router is None:
            _router = _make_router(F.scaled_dot_product_attention)
            F.scaled_dot_product_attention = _router
        _count += 1
        if owner is not None:
            _leases[owner] = weakref.finalize(owner, _queue_release)
    _drain()


def uninstall(owner: object | None = None) -> None:
    """End one use (the one `owner` holds, if given); the last one leaves SDPA as described above."""
    global _count
    with _lock:
        _apply_queued()
        if owner is not None:
            lease = _leases.pop(owner, None)
            if lease is None or lease.detach() is None:
                raise RuntimeError(f"fastdiff attention routing: {type(owner).__name__} is not a user")
        elif _count - len(_leases) <= 0:
            raise RuntimeError("fastdiff attention routing: uninstall() without a matching install()")
        _count -= 1
        _release_if_unused()
    _drain()


def _release_if_unused() -> None:
    global _router
    if _count == 0 and _router is not None:
        if F.scaled_dot_product_attention is _router:
            F.scaled_dot_product_attention = _router.fastdiff_below
        _router.fastdiff_live[0] = False  # wherever it is still referenced (a later patch's `orig`), it passes through
        _router = None


def _apply_queued() -> None:  # with _lock held
    global _count
    while _queued:
        _queued.pop()
        _count -= 1
    _release_if_unused()


def _queue_release() -> None:
    # A finalizer runs wherever garbage collection happens: possibly in another thread, or in this one in the
    # middle of install()/uninstall() with the lock held. So it only queues its release, and whoever holds the
    # lock applies the queue before letting go of it.
    _queued.append(None)
    _drain()


def _drain() -> None:
    while _queued and _lock.acquire(blocking=False):
        try:
            _apply_queued()
        finally:
            _lock.release()


@contextlib.contextmanager
def handling(handler: Handler):
    """SDPA calls made inside this block (in this thread / task) go to `handler` first."""
    token = _handler.set(handler)
    try:
        yield
    finally:
        _handler.reset(token)
