"""The one interface all four mechanisms (caching, merging, sparse attention, bottleneck) implement.

A mechanism sees the model only through its `Host` (`fastdiff.host`): it wraps submodules by name, and each hook is
handed the denoiser call in progress (`Call`: context, record, arguments bound once), or None outside one.

Rules every mechanism keeps (the host enforces the first two):
- **State** lives in the host, per call: `host.state(call, self)` is this mechanism's object (`new_state()`) for
  the call's slot (its index in the step; a mechanism whose state spans the step's calls, guidance, names slot 0)
  and its token grid, kept across the run. So branches, call slots and resolutions never share state, and nothing
  per call is kept on the mechanism (it is shared by every thread calling the model).
- **Stages** (a driver's `Session.begin_stage`): a stage on another token grid than the last drops the state of every
  other grid — cached residuals, sparse patterns, merge metrics and guidance deltas of one grid are never reused on
  another (a cache computes the new grid's first step) — and a stage on the same grid keeps it (steps count on).
- **Schedules** that are fractions of the run (cache warm-up/cool-down, merge start/stop, sparse start, guidance
  start) read the run's global step (`StepContext.step`) against the run's steps (`StepContext.num_steps`): a
  two-stage run of 4 + 4 steps merges from step 2 with `start: 0.25`, wherever the stages split it.
- **Cost**: `estimate_cost(table)` is pure over cost rows that each carry their own context (`cost.estimate.CostRow`),
  read exactly as the hooks read a call's, with the same state rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapters.base import BlockAdapter
    from ..clock import CallRecord
    from ..cost.estimate import CostTable
    from ..host import Host


class Mechanism(ABC):
    """A mechanism attaches named hooks through its host and keeps per-call state there.

    Lifecycle: `validate(adapter)` (raise before anything is attached if the model is not supported) →
    `attach(adapter, host)` → calls → `detach()`. Hooks themselves are removed by the host, all at
    once, so a mechanism never restores modules by hand.
    """

    name: str = "mechanism"
    host: "Host | None" = None
    # A driver (resolution bottleneck) wraps the denoiser outside the step clock and drives the run: the session
    # attaches it after the clock with `attach_driver`, and asks it for each call's `dense_layout`.
    outer: bool = False

    def __init__(self, config: Any):
        self.config = config

    def validate(self, adapter: "BlockAdapter") -> None:
        """Raise UnsupportedModelError (naming model class, mechanism and what is supported) if this
        mechanism cannot apply to `adapter`'s model. Must not modify anything."""

    @abstractmethod
    def estimate_cost(self, table: "CostTable") -> "CostTable":
        """Pure: the FLOPs table after this mechanism (what it skips, shrinks or sparsifies), row by row."""

    @abstractmethod
    def attach(self, adapter: "BlockAdapter", host: "Host") -> None:
        """Install hooks with `host.wrap(...)`; nothing else may modify the model."""

    def detach(self) -> None:
        """Drop references to the model and host (hooks are already gone)."""
        self.host = None

    def new_state(self) -> Any:
        """Fresh per-call state (see the state rule above)."""
        return None

    def report(self, records: list["CallRecord"]) -> dict:
        """Mechanism-specific numbers for `summary()` over the run's records of this mechanism's denoiser (e.g.
        the cache's memory); JSON-serialisable."""
        return {}
