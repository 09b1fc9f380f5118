"""Checks shared by the model config dataclasses (run in their __post_init__).

Plain dataclasses on purpose: models/ imports nothing from the rest of the project, and
the trainer can still load these classes with data_pipeline.typed_config.from_dict.
"""
from __future__ import annotations

import dataclasses
import typing


def validate_fields(cfg) -> None:
    """Raise ValueError naming the field when a value does not match its annotation
    (int/float/bool/str, Literal choices, tuples of ints) or an int count is negative."""
    name = type(cfg).__name__
    hints = typing.get_type_hints(type(cfg), include_extras=False)
    for field in dataclasses.fields(cfg):
        value, tp = getattr(cfg, field.name), hints[field.name]
        where = f"{name}.{field.name}"
        if typing.get_origin(tp) is typing.Literal:
            if value not in typing.get_args(tp):
                raise ValueError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        elif tp is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true/false, got {value!r}")
        elif tp is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: expected an int >= 0, got {value!r}")
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: expected a float, got {value!r}")
        elif tp is str:
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string, got {value!r}")
        elif typing.get_origin(tp) is tuple:
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"{where}: expected a list of positive ints, got {value!r}")


def require(cfg, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{type(cfg).__name__}: {message}")
