"""The run's warnings about its own training: still-rising accuracy and a weak meta-graph."""

import pytest
import torch

from instanas.report.diagnostics import (
    near_chance,
    still_rising,
    undertrained,
    undertrained_sentence,
)


def test_still_rising_fires_on_a_climbing_tail_only():
    assert still_rising([0.70, 0.80, 0.85, 0.88]) == pytest.approx(8.0)
    assert still_rising([0.70, 0.85, 0.878, 0.881, 0.882]) is None  # flat tail
    assert still_rising([0.5, 0.9]) is None  # too few epochs to tell


def test_undertrained_names_the_stage_and_its_option():
    records = (
        [{"stage": "baseline", "epoch": e, "train_accuracy": 0.6 + 0.05 * e} for e in range(1, 6)]
        + [{"stage": "finetune", "epoch": e, "train_accuracy": 0.9} for e in range(1, 6)]
        + [{"stage": "pretrain", "epoch": e, "train_accuracy": 0.3 * e} for e in (1, 2, 3)]
        + [
            {"stage": "search", "epoch": e, "metagraph_train_accuracy": 0.5 + 0.1 * e}
            for e in (1, 2, 3)
        ]
    )
    flags = {f["stage"]: f for f in undertrained(records)}
    assert set(flags) == {"baseline", "search"}  # finetune is flat; pretrain is never judged
    assert flags["baseline"]["option"] == "baseline.epochs"
    assert flags["search"]["option"] == "search.epochs"
    sentence = undertrained_sentence(list(flags.values()))
    assert "--baseline.epochs" in sentence and "--search.epochs" in sentence
    assert undertrained_sentence([]) is None


def test_near_chance():
    assert near_chance(0.11, 10) and not near_chance(0.3, 10)
    assert near_chance(0.52, 2) and not near_chance(0.7, 2)
    assert not near_chance(0.11, 10, floor=0.0) and near_chance(0.5, 10, floor=0.6)


def test_search_refuses_a_metagraph_at_chance(tmp_path):
    from tiny_runs import make_folder_dataset, tiny_config

    from instanas.config import load_config_file
    from instanas.pipeline import open_run
    from instanas.stages.common import new_models
    from instanas.stages.search import refuse_weak_metagraph
    from instanas.training import TrainingError

    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config(make_folder_dataset(tmp_path / "data", classes=10)))
    ctx = open_run(load_config_file(config_path), tmp_path / "run")
    metagraph, _ = new_models(ctx)
    with torch.no_grad():  # a head that always answers class 0: exactly chance
        metagraph.head.classifier.weight.zero_()
        metagraph.head.classifier.bias.copy_(torch.eye(10)[0] * 5.0)
    with pytest.raises(TrainingError, match="near chance.*--pretrain.epochs"):
        refuse_weak_metagraph(ctx, metagraph)
