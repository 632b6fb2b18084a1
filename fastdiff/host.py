"""The host: all a mechanism may use of whatever runs the model — `session.Part` today, a ComfyUI host later.

A mechanism is attached to one denoiser through a `Host` and never sees more of it: it wraps submodules by name,
and each of its hooks is handed the denoiser `Call` in progress (its context, its record, its arguments bound once),
or None when the module runs outside a denoiser call (a user calling a block by hand: leave it alone). Per-call
state is kept by the host for the call (`state`), so concurrent calls, branches and token grids never share one;
a mechanism that runs fewer batch rows asks the host to (`run_rows`), which keeps the record's accounting right.
Nothing here names a model library: a host for another one implements the same few methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

from .clock import CallRecord
from .context import StepContext


class Call:
    """One denoiser call in progress, as the host hands it to every hook.

    Attributes:
        ctx: the call's context (StepContext); its `branches` are those of the rows that run (see `Host.run_rows`).
        record: what the call is accounted as (CallRecord: blocks run, decisions, token reductions): mechanisms
            write their decisions and reductions there; `summary()` is built from records.
        args: the denoiser forward's arguments by name (defaults not filled in), bound once per call and shared by
            every mechanism (the blocks' and submodules' own arguments are read through `hooks.Args`).
    """

    __slots__ = ("ctx", "record", "args")

    def __init__(self, record: CallRecord, args: dict[str, Any]):
        self.ctx: StepContext = record.ctx
        self.record = record
        self.args = args


# A mechanism's hook: (the call in progress or None, the wrapped callable, its args, its kwargs) -> its result.
Hook = Callable[[Call | None, Callable, tuple, dict], Any]


class Stateful(Protocol):
    """What the host needs of a mechanism to keep its state (`mechanisms.base.Mechanism` is one)."""

    name: str

    def new_state(self) -> Any: ...


class Host(Protocol):
    """What a mechanism may use of the model's runner (implemented by `session.Part`)."""

    def wrap(self, module: Any, name: str, hook: Hook) -> None:
        """Make `module.forward(*a, **kw)` call `hook(call, inner, a, kw)` under the name `name` (removed with
        every other hook of the session, all at once)."""

    def state(self, call: Call, mechanism: Stateful, slot: int | None = None) -> Any:
        """The state `mechanism` keeps for this call's slot (`slot`, default: the call's index in its step) and token
        grid across the run, created with `mechanism.new_state()`; see `context.RunState` for the stage rule."""

    def states(self, mechanism: Stateful) -> list[Any]:
        """Every state `mechanism` keeps now (in the reported run), e.g. to report the memory held."""

    def run_rows(self, call: Call, rows: Sequence[int]) -> None:
        """Only these batch rows of the call run (none: the call does not run); the rest are the mechanism's to
        stand in for. The record keeps the dense batch, so the call is accounted as run."""


def run_rows(call: Call, rows: Sequence[int]) -> None:
    """The bookkeeping every host does for `Host.run_rows`."""
    rows = tuple(rows)
    call.record.rows = rows
    call.ctx = dataclasses.replace(call.ctx, branches=tuple(call.record.ctx.branches[i] for i in rows))
