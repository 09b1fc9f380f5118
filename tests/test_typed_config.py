"""The config system: YAML differences + key=value overrides, strict keys and types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from data_pipeline.typed_config import (
    ConfigError,
    config_hash,
    flatten,
    load_config,
    parse_override,
    save_config,
)


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    name: Optional[str] = None


@dataclass
class Outer:
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.001\n")
    cfg = load_config(Outer, path, ["inner.betas=[0.8, 0.99]", "mode=b", "tags=[x, y]"])
    assert cfg.steps == 20 and cfg.mode == "b" and cfg.tags == ["x", "y"]
    assert cfg.inner.lr == 0.001 and cfg.inner.betas == (0.8, 0.99)
    assert cfg.inner.name is None and cfg.flag is False


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_config(Outer, None, ["inner.lr=1", "inner.name=null"])
    assert isinstance(cfg.inner.lr, float) and cfg.inner.name is None


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 2e-3 as the string "2e-3"
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 2e-3\n")
    assert load_config(Outer, path).inner.lr == 0.002
    assert load_config(Outer, None, ["inner.lr=5e-4"]).inner.lr == 0.0005


def test_error_says_whether_file_or_override_is_wrong(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="command-line overrides") as info:
        load_config(Outer, path, ["steps=x"])
    assert "ok.yaml" not in str(info.value)


@pytest.mark.parametrize("override, needle", [
    ("stepz=3", "stepz"),
    ("inner.lrr=3", "inner.lrr"),
    ("steps=abc", "steps"),
    ("steps=1.5", "steps"),
    ("flag=1", "flag"),
    ("mode=c", "mode"),
    ("inner.betas=[1, 2, 3]", "inner.betas"),
    ("inner=5", "inner"),
])
def test_bad_keys_and_types_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"inner\.momentum.*bad\.yaml"):
        load_config(Outer, path)


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="malformed override"):
        parse_override(text)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, tmp_path / "list.yaml")


def test_saved_config_round_trips_and_hash_tracks_values(tmp_path):
    cfg = load_config(Outer, None, ["steps=7", "inner.name=x"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Outer, None, ["steps=8"])) != config_hash(cfg)
    assert flatten(cfg)["inner.lr"] == 1e-4
