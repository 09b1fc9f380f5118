"""Checks shared by the model config dataclasses (run in their __post_init__).

Plain dataclasses on purpose: models/ imports only common/ from the rest of the project (the
type checker shared with data_pipeline.typed_config), and the trainer can still load these
classes with from_dict.
"""
from __future__ import annotations

import dataclasses
import typing

from common.typecheck import ConfigError, coerce


def validate_fields(cfg) -> None:
    """Check every field against its annotation with the project's one type checker (lists become
    tuples, YAML float strings floats); counts (ints) must be >= 0 and tuple entries > 0.
    Raises ConfigError (a ValueError) naming ``<Config>.<field>``."""
    name = type(cfg).__name__
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        where, tp = f"{name}.{field.name}", hints[field.name]
        value = coerce(getattr(cfg, field.name), tp, where)
        if tp is int and value < 0:
            raise ConfigError(f"{where}: expected an int >= 0, got {value!r}")
        if typing.get_origin(tp) is tuple and not all(v > 0 for v in value):
            raise ConfigError(f"{where}: expected a list of positive ints, got {list(value)!r}")
        object.__setattr__(cfg, field.name, value)


def require(cfg, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{type(cfg).__name__}: {message}")
