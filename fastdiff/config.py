"""Configuration: one dataclass per mechanism, gathered in FastDiffConfig.

Every config validates itself (`validate()` raises ConfigError) so that `fastdiff.apply` can refuse
bad input before it touches the model. Configs round-trip through plain dicts and YAML (omegaconf),
and `strify()` gives a compact, stable name for logs and result files.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _check_fields(cls, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=repr)  # YAML keys may be ints: never compare mixed types
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class TelemetryConfig:
    """Records what happened in each denoiser call, for `handle.summary()`.

    Args:
        enabled: record per-step, per-block compute decisions and the token counts each call saw.
    """

    enabled: bool = True

    def validate(self) -> None:
        _require(isinstance(self.enabled, bool), f"telemetry.enabled must be a bool, got {self.enabled!r}")

    def strify(self) -> str:
        return ""


@dataclass
class CacheConfig:
    """Block caching across denoising steps (static interval: FORA for DiTs, DeepCache-style for UNets).

    Args:
        policy: "static" — compute every `interval`-th step, reuse cached block results in between.
        interval: steps between two computed steps; 1 never reuses (bit-identical to no caching).
        warmup: first steps that are always computed (the layout of the image is decided there).
        cooldown: last steps that are always computed (fine detail); needs the scheduler's step count.
    """

    policy: str = "static"
    interval: int = 2
    warmup: int = 1
    cooldown: int = 0

    def validate(self) -> None:
        _require(self.policy in CACHE_POLICIES, f"cache.policy must be one of {CACHE_POLICIES}, got {self.policy!r}")
        _require(1 <= self.interval <= 100, f"cache.interval must be in [1, 100], got {self.interval}")
        _require(self.warmup >= 0, f"cache.warmup must be >= 0, got {self.warmup}")
        _require(self.cooldown >= 0, f"cache.cooldown must be >= 0, got {self.cooldown}")

    def strify(self) -> str:
        return f"cache[{self.policy},i{self.interval},w{self.warmup},c{self.cooldown}]"


CACHE_POLICIES = ("static",)

# Sections in the order mechanisms attach (innermost first). Mechanism issues add their section here.
SECTIONS: dict[str, type] = {"telemetry": TelemetryConfig, "cache": CacheConfig}


@dataclass
class FastDiffConfig:
    """The whole configuration of one `fastdiff.apply` call.

    Args:
        telemetry: per-call bookkeeping behind `summary()`; costs a few Python operations per block.
        cache: block caching across steps; None = off.
    """

    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    cache: CacheConfig | None = None

    def __post_init__(self):
        # FastDiffConfig(cache={"interval": 3}) is as good as FastDiffConfig(cache=CacheConfig(interval=3))
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                _check_fields(cls, value, f"config section '{name}'")
                setattr(self, name, cls(**value))

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> "FastDiffConfig":
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if section is None:
                continue
            _require(
                isinstance(section, cls),
                f"config section '{name}' must be a {cls.__name__}, a dict or None, got {type(section).__name__}",
            )
            for f in fields(section):
                _check_type(cls, name, f, getattr(section, f.name))
            section.validate()
        return self

    # -- conversion --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {name: None if getattr(self, name) is None else dataclasses.asdict(getattr(self, name))
                for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict | None) -> "FastDiffConfig":
        data = {} if data is None else data
        _check_fields(cls, data, "the fastdiff config")
        return cls().merged(data)

    def merged(self, overrides: dict) -> "FastDiffConfig":
        """A new config with `overrides` ({section: dict | dataclass | None}) merged in; validated."""
        _check_fields(type(self), overrides, "the fastdiff config")
        out = {}
        for name, section_cls in SECTIONS.items():
            current = getattr(self, name)
            if name not in overrides:
                out[name] = dataclasses.replace(current) if current is not None else None
                continue
            value = overrides[name]
            if value is None or isinstance(value, section_cls):
                out[name] = value
            elif isinstance(value, dict):
                _check_fields(section_cls, value, f"config section '{name}'")
                base = dataclasses.asdict(current) if current is not None else {}
                out[name] = section_cls(**{**base, **value})
            else:
                raise ConfigError(f"config section '{name}' must be a dict, a {section_cls.__name__} or None, "
                                  f"got {type(value).__name__}")
        return type(self)(**out).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FastDiffConfig":
        from omegaconf import OmegaConf

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # YAML syntax or omegaconf interpolation errors
            raise ConfigError(f"{path}: not a valid config file: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a fastdiff config must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))
        if path is not None:
            Path(path).write_text(text)
        return text

    def strify(self) -> str:
        """Compact stable name, e.g. 'baseline' or 'cache[static,i3]'."""
        parts = [s for name in SECTIONS if (sec := getattr(self, name)) is not None and (s := sec.strify())]
        return "+".join(parts) or "baseline"


def _check_type(section_cls: type, section: str, f: dataclasses.Field, value: Any) -> None:
    """Reject values of the wrong type (YAML and keyword overrides arrive untyped)."""
    hint = typing.get_type_hints(section_cls)[f.name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if union else (hint,)))
    if value is None:
        _require(type(None) in allowed, f"{section}.{f.name} must not be None")
        return
    if isinstance(value, bool):  # bool is an int subclass; only accept it where bool is meant
        ok = bool in allowed
    else:
        ok = any(isinstance(value, (int, float) if a is float else a) for a in allowed if a is not type(None))
    names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    _require(ok, f"{section}.{f.name} must be {names}, got {value!r}")
