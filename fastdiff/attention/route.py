"""Routing a model's own SDPA calls to fastdiff, only inside the attention modules a mechanism chose.

diffusers computes attention in its processors, which call `torch.nn.functional.scaled_dot_product_attention`
either directly (AttnProcessor2_0, JointAttnProcessor2_0, ...) or through `dispatch_attention_fn`'s native backend
(Flux, Wan, ...). Replacing that one function is how a mechanism reaches the attention of every family without
copying a single processor: while installed (reference-counted, undone when the last user detaches), the
replacement looks up a handler in a context variable that only a hooked module's forward sets. Anywhere else —
another pipeline in the same process, the text encoder, a module fastdiff did not choose — SDPA runs untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from . import dispatch

# A handler takes (query, key, value, attn_mask, scale) and returns the attention output, or None to let SDPA run.
Handler = Callable[..., "torch.Tensor | None"]
_handler: contextvars.ContextVar[Handler | None] = contextvars.ContextVar("fastdiff_attention", default=None)
_lock = threading.Lock()
_users = 0


def _routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    handler = _handler.get()
    if handler is not None and dropout_p == 0.0 and not is_causal and not kwargs.get("enable_gqa", False):
        out = handler(query, key, value, attn_mask, scale)
        if out is not None:
            return out
    return dispatch.sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)


def install() -> None:
    global _users
    with _lock:
        if _users == 0:
            if F.scaled_dot_product_attention is not dispatch._sdpa:
                raise RuntimeError(
                    "fastdiff sparse attention: torch.nn.functional.scaled_dot_product_attention was replaced by "
                    "someone else after fastdiff was imported (another attention patch?); remove that patch first")
            F.scaled_dot_product_attention = _routed
        _users += 1


def uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            F.scaled_dot_product_attention = dispatch._sdpa


@contextlib.contextmanager
def handling(handler: Handler):
    """SDPA calls made inside this block (in this thread / task) go to `handler` first."""
    token = _handler.set(handler)
    try:
        yield
    finally:
        _handler.reset(token)
