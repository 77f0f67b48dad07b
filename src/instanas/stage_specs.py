"""Every stage of a run, in the order `instanas run` takes them, as data: one declaration each.

The facts a reader of a run directory needs: the file that marks each stage done, what it
needs, whether the config switches it on, how it is budgeted and resumed. The pipeline, the
command line, resume, budgets, the report's undertrained check and ``instanas.load`` read them
here, below everything that trains, so that none of them imports the stages. A stage's
behaviour is a function ``run(ctx)`` in its module under ``stages/``; ``stages/registry.py``
maps each name declared here to that module. Adding a stage means one entry here, one module
and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import Config
from .errors import ConfigError


def _always(config: Config) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage: its command, what marks it done, what it needs, and how it is budgeted."""

    name: str
    help: str
    output: str  # file in the run directory whose existence marks the stage as done
    needs: tuple[str, ...] = ()  # stages whose outputs it reads
    enabled: Callable[[Config], bool] = _always  # False: `instanas run` skips it
    resumable: bool = True  # trains epoch by epoch; `--resume` continues it
    budget: str | None = None  # config section whose epochs/steps/batch size it trains with
    accuracy_field: str | None = None  # metrics.jsonl field that shows it still learning
    refresh: bool = False  # `run --resume` redoes it whenever an earlier stage ran
    # Under torchrun every rank trains on its share of each batch; False: rank 0 runs it alone
    # while the others wait (it times models, and timing needs the machine to itself).
    data_parallel: bool = True


def _policy_tuned(
    name: str, help: str, enabled: Callable[[Config], bool], data_parallel: bool = True
) -> StageSpec:
    """A model fine-tuned from the search like the main model, with the same budget, that the
    config can switch off (written to NAME/model.safetensors)."""
    output = f"{name}/model.safetensors"
    return StageSpec(name, help, output, ("search",), enabled, budget="finetune",
                 accuracy_field="train_accuracy", data_parallel=data_parallel)  # fmt: skip


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "baseline",
        "train the MobileNetV2-path baseline standalone",
        "baseline/mbv2.safetensors",
        budget="baseline",
        accuracy_field="train_accuracy",
    ),
    StageSpec(
        "pretrain",
        "stage 1: one-shot pretraining of the meta-graph",
        "pretrain/metagraph.safetensors",
        budget="pretrain",
    ),
    StageSpec(
        "search",
        "stage 2: alternate controller and meta-graph epochs (needs pretrain)",
        "search/selected.safetensors",
        needs=("pretrain",),
        budget="search",
        accuracy_field="metagraph_train_accuracy",
    ),
    StageSpec(
        "finetune",
        "stage 3: fine-tune under the frozen controller (needs search)",
        "finetune/model.safetensors",
        needs=("search",),
        budget="finetune",
        accuracy_field="train_accuracy",
    ),
    StageSpec(
        "escalation",
        "choose on the validation split the confidence threshold below which the larger "
        "network answers, within escalation.budget (needs finetune and baseline)",
        "escalation/rule.json",
        needs=("finetune", "baseline"),
        enabled=lambda c: c.escalation.network != "off",
        resumable=False,
        refresh=True,
        data_parallel=False,
    ),
    _policy_tuned(
        "random-policy",
        "fine-tune the searched meta-graph on random policies of the controller's mean latency "
        "(needs search)",
        lambda c: c.baseline.random_policy,
    ),
    _policy_tuned(
        "static-child",
        "fine-tune the searched meta-graph on the one child of the controller's closest to and "
        "not below the main model's measured latency (needs search)",
        lambda c: c.baseline.static_child,
        data_parallel=False,
    ),
    StageSpec(
        "variants",
        "pick variants A..E on the validation Pareto front of the search "
        "checkpoints and fine-tune each (needs search)",
        "variants/variants.json",
        needs=("search",),
        enabled=lambda c: c.variants.count > 0,
        data_parallel=False,
    ),
    StageSpec(
        "baselines",
        "train the other baselines standalone: MobileNetV2 path at "
        "baseline.widths, minimum network",
        "baseline/references.json",
        enabled=lambda c: bool(c.mbv2_path_widths()) or c.baseline.min_net,
    ),
    StageSpec(
        "peer",
        "train the MobileNetV2 path at the width whose deployed latency is closest to and not "
        "below the main model's (needs finetune)",
        "baseline/mbv2-peer.safetensors",
        needs=("finetune",),
        enabled=lambda c: c.baseline.peer,
        budget="baseline",
        accuracy_field="train_accuracy",
        data_parallel=False,
    ),
    StageSpec(
        "evaluate",
        "test accuracy and measured batch-1 latency of every trained model "
        "(needs finetune and baseline)",
        "results.json",
        needs=("finetune", "baseline"),
        resumable=False,
        refresh=True,
        data_parallel=False,
    ),
)
_BY_NAME = {stage.name: stage for stage in STAGES}


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get(name: str) -> StageSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}: use one of {', '.join(_BY_NAME)}") from None


def training_stages() -> tuple[StageSpec, ...]:
    """The stages that train and checkpoint epoch by epoch (every one but evaluation)."""
    return tuple(stage for stage in STAGES if stage.resumable)
