"""Run configuration: typed sections (``schema.py``), values converted and checked
(``values.py``), YAML presets shipped in the package and config files (``files.py``).

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with a one-line
message that names the key and the fix. The names below are the configuration's interface;
import them from ``instanas.config``.
"""

from ..errors import ConfigError
from .files import from_dict, load_config_file, load_preset, preset_names, to_yaml
from .schema import (
    AMP_MODES,
    BaselineConfig,
    Config,
    ControllerConfig,
    DataConfig,
    FinetuneConfig,
    LatencyConfig,
    PretrainConfig,
    SearchConfig,
    SpaceConfig,
    VariantsConfig,
    setting,
)
from .values import (
    all_keys,
    apply_overrides,
    coerce,
    default_value,
    help_text,
    set_value,
    validate,
)

__all__ = [
    "AMP_MODES",
    "BaselineConfig",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DataConfig",
    "FinetuneConfig",
    "LatencyConfig",
    "PretrainConfig",
    "SearchConfig",
    "SpaceConfig",
    "VariantsConfig",
    "all_keys",
    "apply_overrides",
    "coerce",
    "default_value",
    "from_dict",
    "help_text",
    "load_config_file",
    "load_preset",
    "preset_names",
    "set_value",
    "setting",
    "to_yaml",
    "validate",
]
