"""Config section -> mechanism class. The order of SECTIONS is the attach order (innermost first)."""

from __future__ import annotations

from ..config import SECTIONS, FastDiffConfig
from .base import Mechanism
from .bottleneck.mechanism import Bottleneck
from .caching import GuidanceSkip, StepCache
from .merging import TokenMerge
from .sparse_attention import SparseAttention
from .telemetry import Telemetry

MECHANISMS: dict[str, type[Mechanism]] = {"telemetry": Telemetry, "merge": TokenMerge, "sparse": SparseAttention,
                                          "cache": StepCache, "guidance": GuidanceSkip,
                                          "bottleneck": Bottleneck}
assert set(MECHANISMS) == set(SECTIONS), "every config section needs its mechanism"


def build(config: FastDiffConfig) -> list[Mechanism]:
    out = []
    for name in SECTIONS:
        section = getattr(config, name)
        if section is None or (name == "telemetry" and not section.enabled):
            continue
        out.append(MECHANISMS[name](section))
    return out
