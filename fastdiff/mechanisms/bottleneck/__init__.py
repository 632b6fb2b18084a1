"""Resolution-bottleneck sampling: most steps at a lower latent resolution, detail restored at full resolution."""

from .driver import FLOW_SCHEDULERS, Driver
from .schedule import Stage, split_steps

__all__ = ["FLOW_SCHEDULERS", "Driver", "Stage", "split_steps"]
