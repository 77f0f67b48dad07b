"""The run configuration's schema: one dataclass per section, each field declared with its
default, help text and checks (:func:`setting`); ``Config`` holds the sections.

Every field has a help text; the command line exposes each one as ``--section.field VALUE``.
How values are read, converted and checked is in ``values.py``; presets and files in
``files.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..data import DATASETS, VAL_FRACTION_RANGE
from ..latency.backends import BACKENDS as LATENCY_BACKENDS
from ..space import CellGroup, ControllerSpec, SearchSpace


def setting(default: Any, help: str, **checks: Any) -> Any:
    """One configuration field: its built-in default, its help text (shown by `instanas run
    --help`) and its checks (``gt``, ``ge``, ``le``, ``lt``, ``choices``), which ``values.py``
    applies to every value set from a preset, a file or the command line."""
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks}
        )
    return field(default=default, metadata={"help": help, **checks})


def _steps() -> Any:
    """The ``steps`` field of every training stage's section."""
    return setting(
        None,
        "optimiser steps instead of epochs (rounded up to whole epochs; config.yaml shows both)",
        gt=0,
    )


def _batch_size(default: int, help: str = "batch size") -> Any:
    """The ``batch_size`` field of a training stage's section."""
    return setting(default, help, gt=0)


@dataclass
class DataConfig:
    dataset: str = setting("fashion-mnist", " | ".join(DATASETS), choices=DATASETS)
    root: str | None = setting(
        None,
        "folder holding the data set (fashion-mnist: the four IDX files; "
        "cifar: the python-batch folder; folder: class-per-folder tree)",
    )
    val_fraction: float = setting(
        0.1,
        "share of the training data held out for validation",
        gt=VAL_FRACTION_RANGE[0],
        le=VAL_FRACTION_RANGE[1],
    )
    image_size: int | None = setting(
        None,
        "side images are resized to (default: the data set's own; folder trees: the most "
        "common shorter side of a sample of the images)",
        gt=0,
    )
    channels: int | None = setting(
        None,
        "1 (gray) or 3 (colour): how folder trees are decoded (default: 1 when every image of "
        "a sample is gray, else 3; other data sets keep their own)",
        choices=(1, 3),
    )
    flip: bool | None = setting(
        None,
        "random horizontal flips in training (default: on for every "
        "data set); turn off where orientation carries the class: "
        "digits, text, documents, many medical images",
    )
    crop_padding: int | None = setting(
        None,
        "random crops from images zero-padded by this many "
        "pixels in training (default: 2 for fashion-mnist, 4 "
        "for cifar, image_size / 8 for folder trees; 0: none)",
        ge=0,
    )
    cutout: int | None = setting(
        None,
        "side of the square cutout in training (default: 16 for "
        "cifar10, 8 for cifar100, 0 = none otherwise)",
        ge=0,
    )
    limit_train: int | None = setting(None, "use only this many training images (smoke runs)", gt=1)
    limit_test: int | None = setting(None, "use only this many test images (smoke runs)", gt=0)
    stream: bool | None = setting(
        None,
        "stream images from disk through DataLoader workers (default: automatic, when the "
        "decoded training split would not fit a quarter of the memory); folder data sets only",
    )
    workers: int | None = setting(
        None,
        "DataLoader worker processes decoding streamed images (default: min(8, CPU count); "
        "0: decode in the training process)",
        ge=0,
    )


@dataclass
class SpaceConfig:
    """The meta-graph's shape: MobileNetV2's channel groups, widths and strides by default
    (``stages``: [channels, cells, stride] per group)."""

    width: float = setting(1.0, "width multiplier of all channels", gt=0.0)
    stem_channels: int = setting(32, "stem output channels before the width multiplier", gt=0)
    stem_stride: int = setting(1, "stride of the stem convolution", ge=1)
    stages: list = setting(
        [[16, 1, 1], [24, 2, 1], [32, 3, 2], [64, 4, 2], [96, 3, 1], [160, 3, 2], [320, 1, 1]],
        "MobileNetV2 stage table: [channels, cells, stride] per stage",
    )
    head_channels: int = setting(1280, "channels of the 1x1 head convolution", gt=0)
    scale_head: bool = setting(False, "apply the width multiplier to the head as well")
    forced_module: int = setting(
        4,
        "module an empty shape-changing cell runs (the empty-cell rule): 4, the basic block, "
        "is the paper's; pick the cheapest module of your latency backend's table "
        "(`instanas profile` names it)",
        ge=0,
        le=4,
    )


@dataclass
class ControllerConfig:
    input_size: int = setting(32, "side the controller's input image is resized to", gt=0)
    widths: list = setting(
        [16, 32, 64],
        "channels of the controller's residual stages, one per "
        "entry; [] makes a linear controller on the thumbnail",
    )
    alpha: float = setting(0.8, "probability bounding a: p~ = a*p + (1-a)*(1-p)", gt=0.5, le=1.0)
    beta: float = setting(0.8, "weight of the entropy bonus", ge=0.0)
    lr: float = setting(5e-4, "Adam learning rate of the controller", gt=0.0)
    pos_w: float = setting(30.0, "reward of a correct prediction at the window's centre", gt=0.0)
    neg_w: float = setting(0.0, "reward of a wrong prediction")
    window: str = setting(
        "dynamic", "latency window: dynamic (UB shrinks) | static", choices=("dynamic", "static")
    )
    reward: str = setting(
        "window",
        "per-image reward: window (the paper's parabola between the "
        "latency bounds) | budget (correctness minus a latency penalty "
        "whose weight a dual variable adapts so that the batch's mean "
        "latency meets controller.budget)",
        choices=("window", "budget"),
    )
    budget: float = setting(
        0.4,
        "budget reward: target mean cell latency of the greedy children, as "
        "a fraction of the MobileNetV2 path's cell latency",
        gt=0.0,
    )
    signal: str = setting(
        "correct",
        "budget reward: what a child's prediction scores, correct "
        "(pos_w if right, neg_w if wrong) | log_prob (pos_w x log "
        "p(true class), graded)",
        choices=("correct", "log_prob"),
    )
    usage_floor: float = setting(
        0.0,
        "share of a batch every module should be chosen by, and "
        "not chosen by (0: off); a hinge penalty on each module's mean "
        "probability keeps choices from becoming the same for every "
        "image",
        ge=0.0,
        le=0.45,
    )
    budget_warmup: float = setting(
        0.5,
        "budget reward: share of the search over which the target "
        "falls from 0.7 x L_all to the budget",
        ge=0.0,
        le=1.0,
    )
    dual_lr: float = setting(
        0.05,
        "budget reward: step of the latency weight per controller step, "
        "per unit of relative budget overshoot",
        ge=0.0,
    )
    dual_kp: float = setting(
        0.0,
        "budget reward: proportional gain of the latency weight, which is then the integral "
        "of the overshoot (dual_lr) plus dual_kp x the last batch's relative overshoot; damps "
        "overshooting the budget (0: integral only)",
        ge=0.0,
    )
    entropy: str = setting(
        "paper",
        "entropy bonus: paper (sum of -p log p) | bernoulli (the full "
        "entropy of each module's choice, largest at p = 0.5)",
        choices=("paper", "bernoulli"),
    )
    objective: str = setting(
        "reinforce",
        "how the controller learns: reinforce (policy gradient on "
        "the reward against the greedy child's) | imitate (each "
        "image's best of controller.candidates sampled children "
        "under the same reward is its target; binary "
        "cross-entropy)",
        choices=("reinforce", "imitate"),
    )
    candidates: int = setting(4, "imitate: children sampled and scored per image", gt=0)
    form: str = setting(
        "free",
        "what the controller outputs: free (each module's logit read from the image's "
        "features) | difficulty (one difficulty score per image, learned from whether the "
        "current greedy child gets the image wrong, and per module a start point and slope "
        "along it: reinforce objective only)",
        choices=("free", "difficulty"),
    )
    difficulty_target: str = setting(
        "wrong",
        "difficulty form: what counts as a hard image, wrong (the greedy child is wrong) | "
        "helped (the greedy child is wrong and the child with every module is right: images "
        "more modules fix; one more forward per controller step)",
        choices=("wrong", "helped"),
    )
    deployed_children: int = setting(
        0,
        "children the main model deploys: the most used on the validation split after "
        "fine-tuning; an image whose policy is none of them runs the nearest (fewest differing "
        "modules). Fewer children keep each one's weights warm in the cache between images "
        "(0: every child the controller picks)",
        ge=0,
    )


@dataclass
class PretrainConfig:
    epochs: int = setting(
        100, "one-shot pretraining epochs (every module on until pretrain.drop_path_start)", gt=0
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(128)
    lr: float = setting(0.1, "SGD learning rate (see pretrain.schedule)", gt=0.0)
    weight_decay: float = setting(1e-4, "SGD weight decay", ge=0.0)
    schedule: str = setting(
        "step",
        "learning-rate schedule: step (x0.1 at the milestones, the paper) | cosine",
        choices=("step", "cosine"),
    )
    milestones: list = setting(
        [0.5, 0.75], "schedule step: fractions of training where the learning rate drops x0.1"
    )
    final_keep: float = setting(
        0.5, "drop-path keep probability at the end of pretraining", gt=0.0, le=1.0
    )
    drop_path_start: float = setting(
        0.5,
        "fraction of pretraining trained with every module on; drop-path follows",
        ge=0.0,
        lt=1.0,
    )


@dataclass
class SearchConfig:
    epochs: int = setting(
        500, "search epochs (each: a controller epoch, then a meta-graph epoch)", gt=0
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(32, "batch size of both alternating epochs")
    metagraph_lr: float = setting(0.01, "SGD learning rate of the meta-graph during search", gt=0.0)
    weight_decay: float = setting(1e-4, "SGD weight decay of the meta-graph during search", ge=0.0)
    recalibrate_batches: int = setting(
        8,
        "training batches used to re-estimate BatchNorm statistics "
        "for the greedy policies before validation (they go through the network as one batch)",
        gt=0,
    )
    select_tolerance: float = setting(
        0.01,
        "checkpoint choice: the epochs whose validation accuracy is within this of the best "
        "compete (see search.select)",
        ge=0.0,
        le=1.0,
    )
    select: str = setting(
        "fastest",
        "checkpoint choice among those epochs: fastest (lowest validation latency) | latest "
        "(the meta-graph trained longest)",
        choices=("fastest", "latest"),
    )
    snapshots_per_epoch: int = setting(
        1,
        "checkpoints per search epoch: the last after the "
        "meta-graph epoch, the others evenly inside the controller "
        "epoch (candidates for variants A..E in short searches)",
        ge=1,
    )
    min_pretrain_accuracy: float | None = setting(
        None,
        "the search stops with an error when the pretrained meta-graph's validation "
        "accuracy (every module on) is below this (default: a tenth of the way from chance "
        "to perfect; 0: never, e.g. for smoke runs)",
        ge=0.0,
        le=1.0,
    )
    controller_norm: str = setting(
        "batch",
        "BatchNorm of the frozen meta-graph in controller epochs: "
        "batch (each forward's own statistics) | running "
        "(statistics re-estimated under the sampled policies at "
        "the start of each controller epoch, then fixed)",
        choices=("batch", "running"),
    )
    random_share: float = setting(
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
    epochs: int = setting(
        300, "fine-tuning epochs under the frozen controller's greedy policies", gt=0
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(256)
    lr: float = setting(1e-3, "SGD learning rate (cosine schedule)", gt=0.0)
    weight_decay: float = setting(4e-5, "SGD weight decay", ge=0.0)


@dataclass
class BaselineConfig:
    epochs: int | None = setting(
        None,
        "epochs of the standalone MobileNetV2-path baseline "
        "(default: pretrain + search + finetune epochs)",
        gt=0,
    )
    steps: int | None = _steps()
    batch_size: int = _batch_size(256)
    lr: float = setting(0.1, "SGD learning rate (cosine schedule)", gt=0.0)
    weight_decay: float = setting(4e-5, "SGD weight decay", ge=0.0)
    widths: list = setting(
        [0.5, 0.75, 1.0, 1.4],
        "MobileNetV2-path baselines to train, as multiples "
        "of space.width (1.0 is the mbv2-path model)",
    )
    min_net: bool = setting(True, "also train the forced-default minimum network standalone")
    static_child: bool = setting(
        True,
        "also fine-tune the best static child: the controller's "
        "child closest to and not below the main model's measured "
        "latency, alone, with the fine-tuning budget",
    )
    random_policy: bool = setting(
        True,
        "also fine-tune a random-policy model of the same mean "
        "latency as the controller's children",
    )
    peer: bool = setting(
        False,
        "also train the fair peer: the MobileNetV2 path at the width whose deployed latency is "
        "closest to and not below the main model's, with the baseline's budget",
    )
    oracle_children: int = setting(
        16, "children sampled per test image for the oracle bound (0: no oracle)", ge=0
    )


@dataclass
class VariantsConfig:
    count: int = setting(
        5,
        "InstaNAS variants (A..E) picked from the search checkpoints on the "
        "validation Pareto front and fine-tuned (0: none)",
        ge=0,
        le=5,
    )
    metagraph: str = setting(
        "final",
        "meta-graph weights each candidate controller is scored and "
        "fine-tuned with: final (the search's last) | own (saved with "
        "it)",
        choices=("final", "own"),
    )
    score_epochs: int = setting(
        1,
        "fine-tuning epochs each candidate gets before its validation "
        "accuracy is scored (0: score the checkpoint as it is)",
        ge=0,
    )
    max_timed_children: int = setting(
        32,
        "children timed end to end per candidate (the most used; "
        "the rest are predicted by the table)",
        gt=0,
    )


@dataclass
class LatencyConfig:
    """How latency is measured: the lookup table and the batch-1 timing of every model."""

    backend: str = setting(
        "onnxruntime",
        "runtime every latency is measured in: onnxruntime (the exported model's runtime, "
        "CPU provider) | eager (PyTorch modules called directly, as the paper timed them); "
        "eager timings are kept beside onnxruntime ones as a second figure",
        choices=LATENCY_BACKENDS,
    )
    threads: int = setting(1, "CPU threads for every latency measurement", gt=0)
    device: str = setting(
        "cpu",
        "device the latency table is profiled on: cpu, or cuda[:N] to search for a GPU "
        "deployment (synchronised timing after warm-up); batch-1 evaluation stays on the CPU",
    )
    warmup: int = setting(10, "untimed warm-up rounds before timing", ge=0)
    repeats: int = setting(50, "timed rounds per (cell, module) in the lookup table", ge=30)
    calibration_children: int = setting(
        30,
        "random whole children timed to calibrate the table's "
        "chain factor (0: plain additive table)",
        ge=0,
    )
    table: str | None = setting(
        None,
        "latency table JSON to reuse (re-profiled if its key differs); "
        "default: a per-device cache under ~/.cache/instanas",
    )
    eval_images: int | None = setting(
        None, "test images timed end to end at batch 1 (default: all)", gt=0
    )
    noisy_retries: int = setting(
        2,
        "times a side-by-side batch-1 timing is repeated when it was disturbed (the models' "
        "median per-image std/mean above 0.5: other work shared the machine); the quietest "
        "pass is kept and every pass recorded",
        ge=0,
    )
    eager_images: int | None = setting(
        500,
        "of those, images timed again in eager PyTorch for the second figure beside the "
        "deployed one (null: all of them)",
        gt=0,
    )


@dataclass
class EscalationConfig:
    """The second decision: after the routed child answers, an image it is unsure of (top
    softmax probability below a threshold chosen on the validation split) runs a larger
    network instead."""

    network: str = setting(
        "off",
        "the larger network unsure images escalate to: mbv2-path (the run's trained "
        "MobileNetV2 path) | off (the paper's model: the routed child answers every image)",
        choices=("off", "mbv2-path"),
    )
    budget: float = setting(
        0.6,
        "mean deployed latency the main model may reach with escalation, as a fraction of the "
        "MobileNetV2 path's deployed latency; the most accurate threshold on the validation "
        "split within it is chosen",
        gt=0.0,
    )
    timed_images: int = setting(
        1000, "validation images the deployed latencies of the threshold choice are timed on", gt=0
    )


AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class Config:
    preset: str = setting("custom", "name of the preset this config started from")
    seed: int = setting(0, "seed of every random number generator", ge=0)
    device: str = setting(
        "cpu",
        "cpu | cuda | cuda:N (under torchrun, cuda means each process's own GPU)",
    )
    amp: str = setting(
        "off",
        "mixed-precision training: bf16 | fp16 (with a gradient scaler) | off; "
        "evaluation and latency stay in float32",
        choices=AMP_MODES,
    )
    threads: int | None = setting(
        None,
        "CPU threads of training and evaluation (default: torch's "
        "choice, one per core; the run records the count it used). "
        "On the CPU a seeded run is bit-reproducible at the same "
        "thread count, machine and software",
        gt=0,
    )
    budget_images: int | None = setting(
        None,
        "training images the epoch counts were sized for: on a "
        "smaller training split, each stage not given epochs or "
        "steps on the command line keeps its number of "
        "optimiser steps (recorded as steps in config.yaml)",
        gt=0,
    )
    channels_last: bool = setting(True, "train in channels-last memory format (faster on CPU)")
    tensorboard: bool = setting(
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
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
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
            forced_module=s.forced_module,
        )

    def controller_spec(self) -> ControllerSpec:
        c = self.controller
        return ControllerSpec(c.input_size, tuple(c.widths), c.form)

    def mbv2_path_widths(self) -> list[float]:
        """Widths of the extra MobileNetV2-path baselines (1.0 is the mbv2-path model itself)."""
        return sorted({float(w) for w in self.baseline.widths if float(w) != 1.0})


# The section types and names, in the order of Config's fields.
SECTIONS = (
    DataConfig,
    SpaceConfig,
    ControllerConfig,
    PretrainConfig,
    SearchConfig,
    FinetuneConfig,
    BaselineConfig,
    VariantsConfig,
    EscalationConfig,
    LatencyConfig,
)


SECTION_NAMES = (
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
