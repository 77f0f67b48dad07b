"""Where a configuration comes from: the YAML presets shipped in the package (``extends``
merges one into another), config files, and ``config.yaml`` written back for the run.
"""

from __future__ import annotations

from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import SECTION_NAMES, Config
from .values import did_you_mean, set_value, validate


def preset_names() -> list[str]:
    folder = resources.files("instanas") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    names = preset_names()
    if name not in names:
        raise ConfigError(
            f"unknown preset {name!r}{did_you_mean(name, names)}; choose one of: {', '.join(names)}"
        )
    config = from_dict(_preset_data(name))
    config.preset = name
    return config


def _preset_data(name: str) -> dict:
    """A preset's mapping; ``extends: OTHER`` starts from OTHER's and overrides key by key."""
    text = (resources.files("instanas") / "presets" / f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    parent = data.pop("extends", None)
    return _merged(_preset_data(parent), data) if parent else data


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_maps else value
    return out


def load_config_file(path: str | Path) -> Config:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path} ({exc}): give a readable YAML file") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"config {path} holds a {type(data).__name__}, not a mapping of "
            "sections: write it like `pretrain: {epochs: 3}`"
        )
    return from_dict(data or {})


def from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of sections, not {type(data).__name__}: "
            "write it like `pretrain: {epochs: 3}`"
        )
    config = Config()
    for key, value in _flatten(data).items():
        set_value(config, key, value)
    validate(config)
    return config


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    sections = {f.name for f in fields(Config) if f.name in SECTION_NAMES}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if not prefix and name in sections and not isinstance(value, dict):
            raise ConfigError(
                f"{name} is a section, not a value ({value!r}): write it as a "
                f"mapping, e.g. `{name}: {{field: value}}`"
            )
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
