"""Adapters: one small data file per denoiser family, registered on import.

Every module of this package but `base` (the data types) and `auto` (the fallback for unknown classes) is a family
file and is imported here, in name order: adding a family is adding its file.
"""

from importlib import import_module
from pkgutil import iter_modules

from .base import BlockAdapter, BlockList, CfgLayout, FamilySpec, IOPattern, register, resolve, supported

FAMILY_MODULES = sorted(m.name for m in iter_modules(__path__) if m.name not in ("base", "auto"))
for _name in FAMILY_MODULES:
    import_module(f".{_name}", __name__)

__all__ = ["BlockAdapter", "BlockList", "CfgLayout", "FamilySpec", "IOPattern", "register", "resolve", "supported"]
