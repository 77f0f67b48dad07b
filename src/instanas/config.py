"""Run configuration: typed sections, YAML presets shipped in the package, dotted overrides.

Every field has a help text; the command line exposes each one as ``--section.field VALUE``.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with a one-line
message that names the key and the fix.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .data import DATASETS, VAL_FRACTION_RANGE
from .errors import ConfigError as ConfigError  # raised here; importable from here too
from .space import CellGroup, ControllerSpec, SearchSpace


def _f(default: Any, help: str, **checks: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks}
        )
    return field(default=default, metadata={"help": help, **checks})


def _steps() -> Any:
    """The ``steps`` field of every training stage's section."""
    return _f(
        None,
        "optimiser steps instead of epochs (rounded up to whole epochs; config.yaml shows both)",
        gt=0,
    )


def _batch_size(default: int, help: str = "batch size") -> Any:
    """The ``batch_size`` field of a training stage's section."""
    return _f(default, help, gt=0)


@dataclass
class DataConfig:
    dataset: str = _f("fashion-mnist", " | ".join(DATASETS), choices=DATASETS)
    root: str | None = _f(
        None,
        "folder holding the data set (fashion-mnist: the four IDX files; "
        "cifar: the python-batch folder; folder: class-per-folder tree)",
    )
    val_fraction: float = _f(
        0.1,
        "share of the training data held out for validation",
        gt=VAL_FRACTION_RANGE[0],
        le=VAL_FRACTION_RANGE[1],
    )
    image_size: int | None = _f(
        None, "side images are resized to (default: the data set's own)", gt=0
    )
    flip: bool | None = _f(
        None,
        "random horizontal flips in training (default: on for every "
        "data set); turn off where orientation carries the class: "
        "digits, text, documents, many medical images",
    )
    crop_padding: int | None = _f(
        None,
        "random crops from images zero-padded by this many "
        "pixels in training (default: 2 for fashion-mnist, 4 "
        "for cifar, image_size / 8 for folder trees; 0: none)",
        ge=0,
    )
    cutout: int | None = _f(
        None,
        "side of the square cutout in training (default: 16 for "
        "cifar10, 8 for cifar100, 0 = none otherwise)",
        ge=0,
    )
    limit_train: int | None = _f(None, "use only this many training images (smoke runs)", gt=1)
    limit_test: int | None = _f(None, "use only this many test images (smoke runs)", gt=0)
    stream: bool | None = _f(
        None,
        "stream images from disk through DataLoader workers (default: automatic, when the "
        "decoded training split would not fit a quarter of the memory); folder data sets only",
    )
    workers: int | None = _f(
        None,
        "DataLoader worker processes decoding streamed images (default: min(8, CPU count); "
        "0: decode in the training process)",
        ge=0,
    )


@dataclass
class SpaceConfig:
    """The meta-graph's shape: MobileNetV2's channel groups, widths and strides by default
    (``stages``: [channels, cells, stride] per group)."""

    width: float = _f(1.0, "width multiplier of all channels", gt=0.0)
    stem_channels: int = _f(32, "stem output channels before the width multiplier", gt=0)
    stem_stride: int = _f(1, "stride of the stem convolution", ge=1)
    stages: list = _f(
        [[16, 1, 1], [24, 2, 1], [32, 3, 2], [64, 4, 2], [96, 3, 1], [160, 3, 2], [320, 1, 1]],
        "MobileNetV2 stage table: [channels, cells, stride] per stage",
    )
    head_channels: int = _f(1280, "channels of the 1x1 head convolution", gt=0)
    scale_head: bool = _f(False, "apply the width multiplier to the head as well")


@dataclass
class ControllerConfig:
    input_size: int = _f(32, "side the controller's input image is resized to", gt=0)
    widths: list = _f(
        [16, 32, 64],
        "channels of the controller's residual stages, one per "
        "entry; [] makes a linear controller on the thumbnail",
    )
    alpha: float = _f(0.8, "probability bounding a: p~ = a*p + (1-a)*(1-p)", gt=0.5, le=1.0)
    beta: float = _f(0.8, "weight of the entropy bonus", ge=0.0)
    lr: float = _f(5e-4, "Adam learning rate of the controller", gt=0.0)
    pos_w: float = _f(30.0, "reward of a correct prediction at the window's centre", gt=0.0)
    neg_w: float = _f(0.0, "reward of a wrong prediction")
    window: str = _f(
        "dynamic", "latency window: dynamic (UB shrinks) | static", choices=("dynamic", "static")
    )
    reward: str = _f(
        "window",
        "per-image reward: window (the paper's parabola between the "
        "latency bounds) | budget (correctness minus a latency penalty "
        "whose weight a dual variable adapts so that the batch's mean "
        "latency meets controller.budget)",
        choices=("window", "budget"),
    )
    budget: float = _f(
        0.4,
        "budget reward: target mean cell latency of the greedy children, as "
        "a fraction of the MobileNetV2 path's cell latency",
        gt=0.0,
    )
    signal: str = _f(
        "correct",
        "budget reward: what a child's prediction scores, correct "
        "(pos_w if right, neg_w if wrong) | log_prob (pos_w x log "
        "p(true class), graded)",
        choices=("correct", "log_prob"),
    )
    usage_floor: float = _f(
        0.0,
        "share of a batch every module should be chosen by, and "
        "not chosen by (0: off); a hinge penalty on each module's mean "
        "probability keeps choices from becoming the same for every "
        "image",
        ge=0.0,
        le=0.45,
    )
    budget_warmup: float = _f(
        0.5,
        "budget reward: share of the search over which the target "
        "falls from 0.7 x L_all to the budget",
        ge=0.0,
        le=1.0,
    )
    dual_lr: float = _f(
        0.05,
        "budget reward: step of the latency weight per controller step, "
        "per unit of relative budget overshoot",
        ge=0.0,
    )
    dual_kp: float = _f(
        0.0,
        "budget reward: proportional gain of the latency weight, which is then the integral "
        "of the overshoot (dual_lr) plus dual_kp x the last batch's relative overshoot; damps "
        "overshooting the budget (0: integral only)",
        ge=0.0,
    )
    entropy: str = _f(
        "paper",
        "entropy bonus: paper (sum of -p log p) | bernoulli (the full "
        "entropy of each module's choice, largest at p = 0.5)",
        choices=("paper", "bernoulli"),
    )
    objective: str = _f(
        "reinforce",
        "how the controller learns: reinforce (policy gradient on "
        "the reward against the greedy child's) | imitate (each "
        "image's best of controller.candidates sampled children "
        "under the same reward is its target; binary "
        "cross-entropy)",
        choices=("reinforce", "imitate"),
    )
    candidates: int = _f(4, "imitate: children sampled and scored per image", gt=0)
    form: str = _f(
        "free",
        "what the controller outputs: free (each module's logit read from the image's "
        "features) | difficulty (one difficulty score per image, learned from whether the "
        "current greedy child gets the image wrong, and per module a start point and slope "
        "along it: reinforce objective only)",
        choices=("free", "difficulty"),
    )
    difficulty_target: str = _f(
        "wrong",
        "difficulty form: what counts as a hard image, wrong (the greedy child is wrong) | "
        "helped (the greedy child is wrong and the child with every module is right: images "
        "more modules fix; one more forward per controller step)",
        choices=("wrong", "helped"),
    )


@dataclass
class PretrainConfig:
    epochs: int = _f(
        100, "one-shot pretraining epochs (every module on until pretrain.drop_path_start)", gt=0
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(128)
    lr: float = _f(0.1, "SGD learning rate (see pretrain.schedule)", gt=0.0)
    weight_decay: float = _f(1e-4, "SGD weight decay", ge=0.0)
    schedule: str = _f(
        "step",
        "learning-rate schedule: step (x0.1 at the milestones, the paper) | cosine",
        choices=("step", "cosine"),
    )
    milestones: list = _f(
        [0.5, 0.75], "schedule step: fractions of training where the learning rate drops x0.1"
    )
    final_keep: float = _f(
        0.5, "drop-path keep probability at the end of pretraining", gt=0.0, le=1.0
    )
    drop_path_start: float = _f(
        0.5,
        "fraction of pretraining trained with every module on; drop-path follows",
        ge=0.0,
        lt=1.0,
    )


@dataclass
class SearchConfig:
    epochs: int = _f(500, "search epochs (each: a controller epoch, then a meta-graph epoch)", gt=0)
    steps: int | None = _steps()
    batch_size: int = _batch_size(32, "batch size of both alternating epochs")
    metagraph_lr: float = _f(0.01, "SGD learning rate of the meta-graph during search", gt=0.0)
    weight_decay: float = _f(1e-4, "SGD weight decay of the meta-graph during search", ge=0.0)
    recalibrate_batches: int = _f(
        8,
        "training batches used to re-estimate BatchNorm statistics "
        "for the greedy policies before validation",
        gt=0,
    )
    select_tolerance: float = _f(
        0.01,
        "checkpoint choice: the epochs whose validation accuracy is within this of the best "
        "compete (see search.select)",
        ge=0.0,
        le=1.0,
    )
    select: str = _f(
        "fastest",
        "checkpoint choice among those epochs: fastest (lowest validation latency) | latest "
        "(the meta-graph trained longest)",
        choices=("fastest", "latest"),
    )
    snapshots_per_epoch: int = _f(
        1,
        "checkpoints per search epoch: the last after the "
        "meta-graph epoch, the others evenly inside the controller "
        "epoch (candidates for variants A..E in short searches)",
        ge=1,
    )
    min_pretrain_accuracy: float | None = _f(
        None,
        "the search stops with an error when the pretrained meta-graph's validation "
        "accuracy (every module on) is below this (default: a tenth of the way from chance "
        "to perfect; 0: never, e.g. for smoke runs)",
        ge=0.0,
        le=1.0,
    )
    controller_norm: str = _f(
        "batch",
        "BatchNorm of the frozen meta-graph in controller epochs: "
        "batch (each forward's own statistics) | running "
        "(statistics re-estimated under the sampled policies at "
        "the start of each controller epoch, then fixed)",
        choices=("batch", "running"),
    )
    random_share: float = _f(
        0.0,
        "share of each meta-graph batch trained on random children "
        "(each row its own rate, uniform in [0, 1]) instead of the "
        "controller's samples, so cheap and costly children stay "
        "trained",
        ge=0.0,
        le=1.0,
    )


@dataclass
class FinetuneConfig:
    epochs: int = _f(300, "fine-tuning epochs under the frozen controller's greedy policies", gt=0)
    steps: int | None = _steps()
    batch_size: int = _batch_size(256)
    lr: float = _f(1e-3, "SGD learning rate (cosine schedule)", gt=0.0)
    weight_decay: float = _f(4e-5, "SGD weight decay", ge=0.0)


@dataclass
class BaselineConfig:
    epochs: int | None = _f(
        None,
        "epochs of the standalone MobileNetV2-path baseline "
        "(default: pretrain + search + finetune epochs)",
        gt=0,
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(256)
    lr: float = _f(0.1, "SGD learning rate (cosine schedule)", gt=0.0)
    weight_decay: float = _f(4e-5, "SGD weight decay", ge=0.0)
    widths: list = _f(
        [0.5, 0.75, 1.0, 1.4],
        "MobileNetV2-path baselines to train, as multiples "
        "of space.width (1.0 is the mbv2-path model)",
    )
    min_net: bool = _f(True, "also train the forced-default minimum network standalone")
    static_child: bool = _f(
        True,
        "also fine-tune the best static child: the controller's "
        "child closest to and not below the main model's measured "
        "latency, alone, with the fine-tuning budget",
    )
    random_policy: bool = _f(
        True,
        "also fine-tune a random-policy model of the same mean "
        "latency as the controller's children",
    )
    oracle_children: int = _f(
        16, "children sampled per test image for the oracle bound (0: no oracle)", ge=0
    )


@dataclass
class VariantsConfig:
    count: int = _f(
        5,
        "InstaNAS variants (A..E) picked from the search checkpoints on the "
        "validation Pareto front and fine-tuned (0: none)",
        ge=0,
        le=5,
    )
    metagraph: str = _f(
        "final",
        "meta-graph weights each candidate controller is scored and "
        "fine-tuned with: final (the search's last) | own (saved with "
        "it)",
        choices=("final", "own"),
    )
    score_epochs: int = _f(
        1,
        "fine-tuning epochs each candidate gets before its validation "
        "accuracy is scored (0: score the checkpoint as it is)",
        ge=0,
    )
    max_timed_children: int = _f(
        32,
        "children timed end to end per candidate (the most used; "
        "the rest are predicted by the table)",
        gt=0,
    )


@dataclass
class LatencyConfig:
    """How latency is measured: the lookup table and the batch-1 timing of every model."""

    threads: int = _f(1, "CPU threads for every latency measurement", gt=0)
    device: str = _f(
        "cpu",
        "device the latency table is profiled on: cpu, or cuda[:N] to search for a GPU "
        "deployment (synchronised timing after warm-up); batch-1 evaluation stays on the CPU",
    )
    warmup: int = _f(10, "untimed warm-up rounds before timing", ge=0)
    repeats: int = _f(50, "timed rounds per (cell, module) in the lookup table", ge=30)
    calibration_children: int = _f(
        30,
        "random whole children timed to calibrate the table's "
        "chain factor (0: plain additive table)",
        ge=0,
    )
    table: str | None = _f(
        None,
        "latency table JSON to reuse (re-profiled if its key differs); "
        "default: a per-device cache under ~/.cache/instanas",
    )
    eval_images: int | None = _f(
        None, "test images timed end to end at batch 1 (default: all)", gt=0
    )


AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class Config:
    preset: str = _f("custom", "name of the preset this config started from")
    seed: int = _f(0, "seed of every random number generator", ge=0)
    device: str = _f(
        "cpu",
        "cpu | cuda | cuda:N (under torchrun, cuda means each process's own GPU)",
    )
    amp: str = _f(
        "off",
        "mixed-precision training: bf16 | fp16 (with a gradient scaler) | off; "
        "evaluation and latency stay in float32",
        choices=AMP_MODES,
    )
    threads: int | None = _f(
        None,
        "CPU threads of training and evaluation (default: torch's "
        "choice, one per core; the run records the count it used). "
        "On the CPU a seeded run is bit-reproducible at the same "
        "thread count, machine and software",
        gt=0,
    )
    budget_images: int | None = _f(
        None,
        "training images the epoch counts were sized for: on a "
        "smaller training split, each stage not given epochs or "
        "steps on the command line keeps its number of "
        "optimiser steps (recorded as steps in config.yaml)",
        gt=0,
    )
    channels_last: bool = _f(True, "train in channels-last memory format (faster on CPU)")
    tensorboard: bool = _f(
        False,
        "also log every metrics.jsonl record as TensorBoard scalars "
        "under RUN/tensorboard (pip install 'instanas[tensorboard]')",
    )
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def baseline_epochs(self) -> int:
        if self.baseline.epochs is not None:
            return self.baseline.epochs
        return self.pretrain.epochs + self.search.epochs + self.finetune.epochs

    def search_space(self, input_channels: int, input_size: int, num_classes: int) -> SearchSpace:
        s = self.space
        return SearchSpace(
            input_channels=input_channels,
            input_size=input_size,
            num_classes=num_classes,
            width=s.width,
            stem_channels=s.stem_channels,
            stem_stride=s.stem_stride,
            stages=tuple(CellGroup(*st) for st in s.stages),
            head_channels=s.head_channels,
            scale_head=s.scale_head,
        )

    def controller_spec(self) -> ControllerSpec:
        c = self.controller
        return ControllerSpec(c.input_size, tuple(c.widths), c.form)

    def mbv2_widths(self) -> list[float]:
        """Widths of the extra MobileNetV2-path baselines (1.0 is the mbv2-path model itself)."""
        return sorted({float(w) for w in self.baseline.widths if float(w) != 1.0})


# ---------------------------------------------------------------------------------------------
# Presets and overrides


def preset_names() -> list[str]:
    folder = resources.files("instanas") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    names = preset_names()
    if name not in names:
        raise ConfigError(
            f"unknown preset {name!r}{_suggest(name, names)}; choose one of: {', '.join(names)}"
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
    sections = {f.name for f in fields(Config) if f.name in _SECTION_NAMES}
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


def all_keys() -> dict[str, Any]:
    """Every dotted key (``section.field`` or top-level ``field``) with its dataclass field."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if hints[f.name] in _SECTIONS:
            for sub in fields(hints[f.name]):
                keys[f"{f.name}.{sub.name}"] = sub
        else:
            keys[f.name] = f
    return keys


_SECTIONS = (
    DataConfig,
    SpaceConfig,
    ControllerConfig,
    PretrainConfig,
    SearchConfig,
    FinetuneConfig,
    BaselineConfig,
    VariantsConfig,
    LatencyConfig,
)
_SECTION_NAMES = (
    "data",
    "space",
    "controller",
    "pretrain",
    "search",
    "finetune",
    "baseline",
    "variants",
    "latency",
)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _owner_and_field(config: Config, key: str) -> tuple[Any, Any]:
    keys = all_keys()
    if key not in keys:
        raise ConfigError(
            f"unknown config key {key!r}{_suggest(key, list(keys))}; "
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
        raise ConfigError(
            f"{key} is {value!r}{_suggest(str(value), list(meta['choices']))}; "
            f"use one of: {', '.join(meta['choices'])}"
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


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def help_text(key: str) -> str:
    return all_keys()[key].metadata.get("help", "")


def default_value(key: str) -> Any:
    f = all_keys()[key]
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None
