"""Pass registry: spec name -> Pass class."""

from __future__ import annotations

from ..schema import PASS_CONFIGS, PassConfig
from .base import Pass

_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _PASSES:
        raise ValueError(f"pass {cls.name!r} registered twice")
    if PASS_CONFIGS.get(cls.name) is not cls.Config:
        raise ValueError(f"pass {cls.name!r}: its Config must be schema.PASS_CONFIGS[{cls.name!r}]")
    _PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    if name not in _PASSES:
        raise KeyError(f"unknown pass {name!r}; registered: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def build_pass(config: PassConfig) -> Pass:
    return get_pass(config.pass_)(config)


def registered() -> dict[str, type[Pass]]:
    return dict(_PASSES)
