"""Feature caching across denoising steps."""

from .static import StepCache

__all__ = ["StepCache"]
