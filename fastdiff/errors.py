"""The exceptions fastdiff raises. Every one is raised before any hook is attached."""


class FastDiffError(Exception):
    """Base class of all fastdiff errors."""


class ConfigError(FastDiffError, ValueError):
    """A configuration value, key or preset is invalid."""


class UnsupportedModelError(FastDiffError, TypeError):
    """The denoiser (or pipeline) is not one fastdiff has an adapter for, or a mechanism cannot apply to it."""
