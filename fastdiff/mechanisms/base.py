"""The one interface all four mechanisms (caching, merging, sparse attention, bottleneck) implement."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapters.base import BlockAdapter
    from ..cost.estimate import CostTable
    from ..session import Session


class Mechanism(ABC):
    """A mechanism attaches named hooks through the session and keeps per-run state in RunState.

    Lifecycle: `validate(adapter)` (raise before anything is attached if the model is not supported) →
    `attach(adapter, session)` → calls → `detach()`. Hooks themselves are removed by the session, all at
    once, so a mechanism never restores modules by hand.
    """

    name: str = "mechanism"

    def __init__(self, config: Any):
        self.config = config

    def validate(self, adapter: "BlockAdapter") -> None:
        """Raise UnsupportedModelError (naming model class, mechanism and what is supported) if this
        mechanism cannot apply to `adapter`'s model. Must not modify anything."""

    @abstractmethod
    def estimate_cost(self, table: "CostTable") -> "CostTable":
        """Pure: the FLOPs table after this mechanism (what it skips, shrinks or sparsifies)."""

    @abstractmethod
    def attach(self, adapter: "BlockAdapter", session: "Session") -> None:
        """Install hooks with `session.hooks.wrap(...)`; nothing else may modify the model."""

    def detach(self) -> None:
        """Drop references to the model and session (hooks are already gone)."""
        self.session = None

    def make_state(self) -> Any:
        """Fresh per-(run, call) state; see RunState.slot."""
        return None

    def report(self) -> dict:
        """Mechanism-specific numbers for `summary()` (e.g. the cache's memory); JSON-serialisable."""
        return {}
