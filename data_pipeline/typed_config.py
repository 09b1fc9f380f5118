"""Typed dataclass configs: YAML files that hold only differences from the defaults,
plus ``key=value`` command-line overrides.

Every error names the offending key and is raised before any work starts:
unknown keys, wrong types and malformed overrides all raise :class:`ConfigError`.

The type checks themselves (:func:`from_dict`, :class:`ConfigError`) live in
``common/typecheck.py``, which the model configs use too; this module adds files,
overrides and hashing, and lives in ``data_pipeline`` because preprocessing and
training both use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from common.typecheck import ConfigError, from_dict

T = TypeVar("T")

__all__ = ["ConfigError", "from_dict", "to_dict", "flatten", "config_hash", "parse_override", "apply_overrides",
           "read_yaml", "load_config", "save_config"]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` view of a config, e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable hash of a config's resolved values (key order independent)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------------------
# YAML files and key=value overrides
# ---------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as YAML (so ``x=null``, ``x=[1,2]`` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected key=value (e.g. run.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Merge ``key=value`` overrides into a nested dict (returns a new dict)."""
    merged = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` (if any), then by overrides."""
    overrides = list(overrides)
    data = read_yaml(path) if path else {}
    if path:
        try:
            from_dict(cls, data)  # check the file alone first, so errors name where they come from
        except ConfigError as err:
            raise ConfigError(f"{err} (in {path})") from None
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{err} (from the command-line overrides)") from None


def save_config(cfg: Any, path: str | Path, header: str = "") -> None:
    """Write the resolved config as YAML (every field, defaults included), after ``header`` (comments)."""
    Path(path).write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
