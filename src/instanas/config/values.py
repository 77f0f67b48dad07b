"""Values for the configuration: YAML values and command-line strings converted to each field's
type, the range and choice checks of every field and the few checks that span fields, each
failure a one-line :class:`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import SECTIONS, Config, ControllerConfig


def all_keys() -> dict[str, Any]:
    """Every dotted key (``section.field`` or top-level ``field``) with its dataclass field."""
    return dict(_keys())


@functools.cache
def _keys() -> dict[str, Any]:
    # Resolving the annotations costs about 1 ms a call, and the parser asks once per key.
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if hints[f.name] in SECTIONS:
            for sub in fields(hints[f.name]):
                keys[f"{f.name}.{sub.name}"] = sub
        else:
            keys[f.name] = f
    return keys


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _owner_and_field(config: Config, key: str) -> tuple[Any, Any]:
    keys = all_keys()
    if key not in keys:
        raise ConfigError(
            f"unknown config key {key!r}{did_you_mean(key, list(keys))}; "
            "see `instanas run --help` for every key"
        )
    parts = key.split(".")
    owner = config if len(parts) == 1 else getattr(config, parts[0])
    return owner, keys[key]


def _field_type(owner: Any, name: str) -> Any:
    return typing.get_type_hints(type(owner))[name]


def coerce(key: str, raw: Any, hint: Any) -> Any:
    """Convert ``raw`` (a YAML value or a command-line string) to the field's type."""
    if isinstance(raw, str) and hint is not str:
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {raw!r} ({exc})") from exc
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty: give a {hint.__name__}")
    convert = _CONVERTERS.get(hint)
    if convert is None:
        raise ConfigError(f"{key}: unsupported type {hint}")
    return convert(key, raw)


def _to_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise ConfigError(f"{key} must be true or false, not {raw!r}: {_example(key)}")


def _to_int(key: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        raise ConfigError(f"{key} must be a whole number, not {raw!r}: {_example(key)}")
    return raw


def _to_float(key: str, raw: Any) -> float:
    if isinstance(raw, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            raw = float(raw)
        except ValueError:
            pass
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(f"{key} must be a number, not {raw!r}: {_example(key)}")
    return float(raw)


def _to_list(key: str, raw: Any) -> list:
    if not isinstance(raw, list):
        raise ConfigError(f"{key} must be a list, not {raw!r}: {_example(key)}")
    return raw


# How coerce converts a value once YAML has parsed it, by the field's type.
_CONVERTERS = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: lambda key, raw: str(raw),
    list: _to_list,
}


def _example(key: str) -> str:
    """How to write a valid value, from the built-in default."""
    default = default_value(key) if key in all_keys() else None
    if default is None:
        return f"see --{key} in `instanas run --help`"
    shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    return f"e.g. --{key} {shown!r}" if isinstance(default, list) else f"e.g. --{key} {shown}"


def set_value(config: Config, key: str, raw: Any) -> None:
    owner, f = _owner_and_field(config, key)
    setattr(owner, f.name, coerce(key, raw, _field_type(owner, f.name)))


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    for key, raw in overrides.items():
        set_value(config, key, raw)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range and choice checks of every field, plus the few checks that span fields."""
    for key, f in all_keys().items():
        parts = key.split(".")
        owner = config if len(parts) == 1 else getattr(config, parts[0])
        value = getattr(owner, f.name)
        _check_field(key, value, f.metadata)
    for stage in config.space.stages:
        if (
            not isinstance(stage, (list, tuple))
            or len(stage) != 3
            or not all(isinstance(v, int) and v > 0 for v in stage)
        ):
            raise ConfigError(
                f"space.stages entry {stage!r} is not [channels, cells, stride] of "
                "positive whole numbers"
            )
    if not config.space.stages:
        raise ConfigError("space.stages is empty: give at least one [channels, cells, stride]")
    _check_controller(config.controller)
    widths = config.baseline.widths
    if not isinstance(widths, list) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise ConfigError(
            "baseline.widths must be a list of positive multiples of space.width, "
            "e.g. [0.5, 0.75, 1.0, 1.4]"
        )
    if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in config.pretrain.milestones):
        raise ConfigError("pretrain.milestones must be fractions between 0 and 1, e.g. [0.5, 0.75]")
    for key, value in (("device", config.device), ("latency.device", config.latency.device)):
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ConfigError(f"{key} {value!r} is not supported: use cpu, cuda or cuda:N")


def _check_controller(controller: ControllerConfig) -> None:
    if not isinstance(controller.widths, list) or not all(
        isinstance(w, int) and w > 0 for w in controller.widths
    ):
        raise ConfigError(
            "controller.widths must be a list of positive whole numbers "
            "(one residual stage each; [] for a linear controller)"
        )
    if controller.form == "difficulty" and controller.objective != "reinforce":
        raise ConfigError(
            "controller.form difficulty learns with the reinforce objective: "
            "set controller.objective reinforce or controller.form free"
        )


def _check_field(key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        choices = [str(c) for c in meta["choices"]]  # data.channels chooses among numbers
        raise ConfigError(
            f"{key} is {value!r}{did_you_mean(str(value), choices)}; "
            f"use one of: {', '.join(choices)}"
        )
    bounds = (
        ("gt", lambda v, b: v > b, "greater than"),
        ("ge", lambda v, b: v >= b, "at least"),
        ("le", lambda v, b: v <= b, "at most"),
        ("lt", lambda v, b: v < b, "less than"),
    )
    for name, ok, words in bounds:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(
                f"{key} is {value}, it must be {words} {meta[name]}: set --{key} to a valid value"
            )


def help_text(key: str) -> str:
    return all_keys()[key].metadata.get("help", "")


def default_value(key: str) -> Any:
    f = all_keys()[key]
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None
