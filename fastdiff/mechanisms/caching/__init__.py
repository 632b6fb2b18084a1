"""Feature caching across denoising steps: one mechanism, pluggable policies and estimators."""

from .cache import StepCache
from .guidance import GuidanceSkip

__all__ = ["StepCache", "GuidanceSkip"]
