import json

import pytest
import torch

from instanas.latency.flops import count_flops
from instanas.latency.table import (
    LatencyTable,
    TimingStats,
    load_or_profile,
    profile_table,
    table_key,
)
from instanas.models.controller import Controller, ControllerSpec
from instanas.models.metagraph import MetaGraph


def _models(space):
    return MetaGraph(space), Controller(
        1, space.num_cells, space.num_modules, ControllerSpec(12, (4, 8, 8))
    )


def test_profile_save_load_and_reuse(tiny_space, tmp_path, caplog):
    graph, ctrl = _models(tiny_space)
    cpu = torch.device("cpu")
    path = tmp_path / "table.json"
    table = load_or_profile(
        path, graph, ctrl, cpu, threads=1, warmup=1, repeats=30, calibration_children=2
    )
    assert path.exists()
    assert len(table.modules) == 17 and len(table.modules[0]) == 5
    assert all(s.repeats == 30 and s.median_ms > 0 for row in table.modules for s in row)
    assert set(table.fixed) == {"stem", "head", "controller"}
    key = json.loads(path.read_text())["key"]
    assert {"device", "torch", "threads", "dtype", "input_shape"} <= set(key)
    # Same setup: reused as is (no new profiling).
    again = load_or_profile(
        path, graph, ctrl, cpu, threads=1, warmup=1, repeats=30, calibration_children=2
    )
    assert again.to_dict() == table.to_dict()
    # Another thread count is another key: profiled again, with a warning.
    other = load_or_profile(
        path, graph, ctrl, cpu, threads=2, warmup=1, repeats=30, calibration_children=2
    )
    assert other.key["threads"] == 2
    assert "another setup" in caplog.text


def test_corrupt_table_is_reprofiled(tiny_space, tmp_path):
    graph, ctrl = _models(tiny_space)
    path = tmp_path / "table.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        LatencyTable.load(path)
    table = load_or_profile(
        path,
        graph,
        ctrl,
        torch.device("cpu"),
        threads=1,
        warmup=0,
        repeats=30,
        calibration_children=0,
    )
    assert LatencyTable.load(path).key == table.key


def test_table_arithmetic(tiny_space):
    graph, ctrl = _models(tiny_space)
    stat = lambda v: TimingStats(v, v, 0.0, v, v, 30)  # noqa: E731
    modules = [[stat(1.0 + m) for m in range(5)] for _ in range(17)]
    table = LatencyTable(
        table_key(graph, ctrl, torch.device("cpu"), 1),
        modules,
        {"stem": stat(0.5), "head": stat(0.25), "controller": stat(0.1)},
    )
    forced = tiny_space.forced_mask()
    bounds = table.bounds(forced)
    assert bounds.all_modules == pytest.approx(17 * 15)
    assert bounds.mbv2_path == pytest.approx(17)
    assert bounds.minimum == pytest.approx(5.0 * int(forced.sum()))
    policy = torch.zeros(2, 17, 5, dtype=torch.bool)
    policy[1, :, 0] = True
    assert table.cells_ms(policy).tolist() == pytest.approx([0.0, 17.0])
    assert table.fixed_ms() == pytest.approx(0.85)


def test_repeats_below_30_rejected(tiny_space):
    graph, ctrl = _models(tiny_space)
    with pytest.raises(ValueError, match="at least 30"):
        profile_table(graph, ctrl, torch.device("cpu"), threads=1, repeats=5)


def test_flops_table(tiny_space):
    graph, ctrl = _models(tiny_space)
    flops = count_flops(graph, ctrl)
    assert flops.modules.shape == (17, 5) and (flops.modules > 0).all()
    # Expansion 6 costs more than expansion 3 at the same kernel.
    assert (flops.modules[:, 0] > flops.modules[:, 1]).all()


def test_chain_factor_scales_predictions(tiny_space):
    graph, ctrl = _models(tiny_space)
    stat = lambda v: TimingStats(v, v, 0.0, v, v, 30)  # noqa: E731
    modules = [[stat(1.0) for m in range(5)] for _ in range(17)]
    fixed = {"stem": stat(0.5), "head": stat(0.25), "controller": stat(0.25)}
    key = table_key(graph, ctrl, torch.device("cpu"), 1)
    table = LatencyTable(key, modules, fixed, chain_factor=1.5)
    assert table.fixed_ms() == pytest.approx(1.5)
    assert table.unit_ms("stem") == pytest.approx(0.75)
    assert table.bounds(tiny_space.forced_mask()).mbv2_path == pytest.approx(17 * 1.5)
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.chain_factor == 1.5 and again.fixed_ms() == pytest.approx(1.5)


def test_profiled_table_is_calibrated(tiny_space):
    graph, ctrl = _models(tiny_space)
    table = profile_table(
        graph, ctrl, torch.device("cpu"), threads=1, warmup=1, repeats=30, calibration_children=4
    )
    assert 0.3 < table.chain_factor < 3.0 and table.chain_factor != 1.0


def test_spearman():
    from instanas.latency.validation import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_validation_compares_table_with_measured_children(tiny_space, tmp_path):
    from instanas.latency.validation import plot_validation, random_children, validate_table

    graph, ctrl = _models(tiny_space)
    table = profile_table(
        graph, ctrl, torch.device("cpu"), threads=1, warmup=1, repeats=30, calibration_children=0
    )
    children = random_children(graph, 6, seed=0)
    assert len({str(c) for c in children}) == 6
    result = validate_table(
        table, graph, ctrl, [(c, "random", 0) for c in children], threads=1, warmup=1, repeats=30
    )
    assert len(result.children) == 6
    assert all(c.measured_ms > 0 and c.predicted_ms > 0 for c in result.children)
    assert -1.0 <= result.spearman <= 1.0
    assert 0 <= result.median_relative_error <= result.p90_relative_error
    result.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["spearman"] == result.spearman
    plot_validation(result, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
