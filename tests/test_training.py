import pytest
import torch

from instanas.config import PretrainConfig
from instanas.models.metagraph import MetaGraph
from instanas.nn.batchnorm import batch_statistics, recalibrate_batchnorm
from instanas.stages.pretrain import lr_schedule
from instanas.stages.search import select_epoch
from instanas.training import cosine, step_decay


def test_recalibration_matches_the_policy_distribution(tiny_space):
    graph = MetaGraph(tiny_space)
    x = torch.randn(64, 1, 12, 12)
    sparse = torch.zeros(64, tiny_space.num_cells, tiny_space.num_modules, dtype=torch.bool)
    sparse[:, :, 1] = True
    # Statistics gathered with every module on are wrong for the sparse child ...
    graph.train()
    with torch.no_grad():
        for _ in range(20):
            graph(x)
    graph.eval()
    with torch.no_grad():
        reference = graph(x, sparse, execution="dense")  # eval mode, stale statistics
        with batch_statistics(graph):
            batch_stats = graph(x, sparse)
    # ... and after recalibration on the same images eval mode matches batch statistics.
    recalibrate_batchnorm(graph, lambda images: graph(images, sparse), [x])
    with torch.no_grad():
        recalibrated = graph(x, sparse)
    assert (recalibrated - batch_stats).abs().max() < (reference - batch_stats).abs().max()
    # Not exact: running variance is the unbiased estimate, batch normalisation the biased one,
    # and the small difference compounds over ~50 BatchNorm layers.
    assert (recalibrated - batch_stats).norm() / batch_stats.norm() < 0.1
    assert not graph.training


def test_batch_statistics_leaves_running_stats_alone(tiny_space):
    graph = MetaGraph(tiny_space).eval()
    before = {k: v.clone() for k, v in graph.state_dict().items() if "running" in k}
    with torch.no_grad(), batch_statistics(graph):
        graph(torch.randn(8, 1, 12, 12) * 5 + 3)
    after = {k: v for k, v in graph.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in graph.modules())


def test_select_epoch_prefers_fast_within_tolerance():
    history = [
        {"epoch": 1, "val_accuracy": 0.90, "val_total_ms": 3.0},
        {"epoch": 2, "val_accuracy": 0.895, "val_total_ms": 2.0},
        {"epoch": 3, "val_accuracy": 0.85, "val_total_ms": 1.0},
    ]
    assert select_epoch(history, 0.01)["epoch"] == 2
    assert select_epoch(history, 0.0)["epoch"] == 1
    assert select_epoch(history, 0.1)["epoch"] == 3


def test_select_epoch_under_a_budget_keeps_to_it():
    history = [
        {"epoch": 1, "val_accuracy": 0.90, "val_total_ms": 3.0, "val_cells_ms": 2.5},
        {"epoch": 2, "val_accuracy": 0.86, "val_total_ms": 1.2, "val_cells_ms": 0.9},
        {"epoch": 3, "val_accuracy": 0.88, "val_total_ms": 1.3, "val_cells_ms": 1.02},
    ]
    assert select_epoch(history, 0.01, budget_cells_ms=1.0)["epoch"] == 3
    assert select_epoch(history, 0.01, budget_cells_ms=0.5)["epoch"] == 2  # none within: fastest


def test_select_latest_takes_the_longest_trained_near_best_epoch():
    # Epochs 2 and 4 tie on a small validation split; 3 is out of tolerance, 5 over the budget.
    history = [
        {"epoch": 1, "val_accuracy": 0.80, "val_total_ms": 2.0, "val_cells_ms": 0.9},
        {"epoch": 2, "val_accuracy": 0.86, "val_total_ms": 1.0, "val_cells_ms": 0.5},
        {"epoch": 3, "val_accuracy": 0.84, "val_total_ms": 1.1, "val_cells_ms": 0.6},
        {"epoch": 4, "val_accuracy": 0.86, "val_total_ms": 1.4, "val_cells_ms": 0.9},
        {"epoch": 5, "val_accuracy": 0.90, "val_total_ms": 3.0, "val_cells_ms": 2.0},
    ]
    assert select_epoch(history, 0.01, 1.0)["epoch"] == 2
    assert select_epoch(history, 0.01, 1.0, prefer="latest")["epoch"] == 4
    assert select_epoch(history, 0.0, None, prefer="latest")["epoch"] == 5


def test_schedules():
    decay = step_decay([0.5, 0.75])
    assert decay(0.0) == 1.0 and abs(decay(0.6) - 0.1) < 1e-12 and abs(decay(0.8) - 0.01) < 1e-12
    assert cosine(0.0) == 1.0 and abs(cosine(1.0)) < 1e-12


def test_pretrain_schedule_option():
    paper = PretrainConfig()
    assert lr_schedule(paper)(0.6) == pytest.approx(0.1)  # the paper's step decay by default
    smooth = PretrainConfig(schedule="cosine")
    assert [lr_schedule(smooth)(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])
