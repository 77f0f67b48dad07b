"""The latency table in either backend: profiling, reuse by key, the arithmetic of prices and
predictions, the calibration curve, FLOPs and the check against whole children."""

import json
import math
import time

import pytest
import torch

from instanas.latency.backends import EagerBackend, OnnxRuntimeBackend, make_backend
from instanas.latency.calibration import fit_power_law, random_children
from instanas.latency.flops import count_flops
from instanas.latency.profiling import load_or_profile, profile_table
from instanas.latency.table import LatencyTable, table_key
from instanas.latency.timing import TimingStats
from instanas.models.controller import Controller, ControllerSpec
from instanas.models.metagraph import MetaGraph

BACKENDS = [EagerBackend(), OnnxRuntimeBackend(1)]


def _models(space):
    return MetaGraph(space), Controller(
        1, space.num_cells, space.num_modules, ControllerSpec(12, (4, 8, 8))
    )


def _stat(value: float) -> TimingStats:
    return TimingStats(value, value, 0.0, value, value, 30)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_profile_save_load_and_reuse(tiny_space, tmp_path, caplog, backend):
    graph, ctrl = _models(tiny_space)
    path = tmp_path / "table.json"
    options = {"warmup": 1, "repeats": 30, "calibration_children": 3}
    table = load_or_profile(path, graph, ctrl, backend, threads=1, **options)
    assert path.exists()
    assert len(table.modules) == 17 and len(table.modules[0]) == 5
    assert all(s.repeats >= 30 and s.median_ms >= 0 for row in table.modules for s in row)
    expected = {"stem", "head", "controller"} | ({"call"} if backend.name != "eager" else set())
    assert set(table.fixed) == expected
    key = json.loads(path.read_text())["key"]
    assert {"device", "torch", "threads", "dtype", "input_shape", "backend", "runtime"} <= set(key)
    assert key["backend"] == backend.name
    # Same setup: reused as is (no new profiling).
    again = load_or_profile(path, graph, ctrl, backend, threads=1, **options)
    assert again.to_dict() == table.to_dict()
    # Another thread count is another key: profiled again, with a warning.
    other = load_or_profile(path, graph, ctrl, backend, threads=2, **options)
    assert other.key["threads"] == 2
    assert "another setup" in caplog.text


def test_a_table_of_another_backend_is_profiled_again(tiny_space, tmp_path, caplog):
    graph, ctrl = _models(tiny_space)
    path = tmp_path / "table.json"
    options = {"threads": 1, "warmup": 0, "repeats": 30, "calibration_children": 0}
    load_or_profile(path, graph, ctrl, EagerBackend(), **options)
    table = load_or_profile(path, graph, ctrl, OnnxRuntimeBackend(1), **options)
    assert table.backend == "onnxruntime" and "backend" in caplog.text


def test_corrupt_table_is_reprofiled(tiny_space, tmp_path):
    graph, ctrl = _models(tiny_space)
    path = tmp_path / "table.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        LatencyTable.load(path)
    table = load_or_profile(
        path, graph, ctrl, EagerBackend(), threads=1, warmup=0, repeats=30, calibration_children=0
    )
    assert LatencyTable.load(path).key == table.key


def test_table_arithmetic(tiny_space):
    graph, ctrl = _models(tiny_space)
    modules = [[_stat(1.0 + m) for m in range(5)] for _ in range(17)]
    fixed = {"stem": _stat(0.5), "head": _stat(0.25), "controller": _stat(0.1)}
    table = LatencyTable(table_key(graph, ctrl, EagerBackend(), 1), modules, fixed)
    bounds = table.bounds(tiny_space)
    forced = tiny_space.forced_mask()
    assert bounds.all_modules == pytest.approx(17 * 15)
    assert bounds.mbv2_path == pytest.approx(17)
    assert bounds.minimum == pytest.approx(5.0 * int(forced.sum()))
    policy = torch.zeros(2, 17, 5, dtype=torch.bool)
    policy[1, :, 0] = True
    assert table.cells_ms(policy).tolist() == pytest.approx([0.0, 17.0])
    assert table.fixed_ms() == pytest.approx(0.85)
    # A plain table (factor and exponent 1) predicts the sum.
    assert table.predict_ms(policy).tolist() == pytest.approx([0.85, 17.85])
    assert table.predict_ms(policy, include_controller=False)[1] == pytest.approx(17.75)


def test_the_calibration_curve_prices_and_predicts(tiny_space):
    """Modules are priced at the factor; whole networks follow the curve, exact at the
    reference and bending away from it; the per-call cost is added once."""
    graph, ctrl = _models(tiny_space)
    modules = [[_stat(1.0) for _ in range(5)] for _ in range(17)]
    fixed = {"stem": _stat(0.5), "head": _stat(0.25), "controller": _stat(0.25), "call": _stat(2)}
    key = table_key(graph, ctrl, EagerBackend(), 1)
    table = LatencyTable(key, modules, fixed, chain_factor=1.5, chain_exponent=1.2)
    table.reference_ms = 18.0  # the MobileNetV2 path with the controller
    assert table.unit_ms("stem") == pytest.approx(0.75)
    assert table.fixed_ms() == pytest.approx(2 + 1.5)
    assert table.bounds(tiny_space).mbv2_path == pytest.approx(17 * 1.5)
    mbv2 = torch.zeros(1, 17, 5, dtype=torch.bool)
    mbv2[0, :, 0] = True
    assert float(table.predict_ms(mbv2)[0]) == pytest.approx(2 + 1.5 * 18.0, rel=1e-5)
    everything = torch.ones(1, 17, 5, dtype=torch.bool)
    units = 85 + 1.0
    bent = 2 + 1.5 * units * (units / 18.0) ** 0.2
    assert float(table.predict_ms(everything)[0]) == pytest.approx(bent, rel=1e-5)
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.to_dict() == table.to_dict()


def test_power_law_fit_recovers_the_curve():
    units = [1.0, 2.0, 4.0, 8.0, 16.0]
    work = [3.0 * u * (u / 4.0) ** 0.25 for u in units]
    exponent, factor = fit_power_law(units, work, reference=4.0)
    assert exponent == pytest.approx(1.25) and factor == pytest.approx(3.0)
    assert fit_power_law([2.0, 2.0], [4.0, 6.0], 2.0)[0] == 1.0  # no spread: a plain factor


def test_repeats_below_30_rejected(tiny_space):
    graph, ctrl = _models(tiny_space)
    with pytest.raises(ValueError, match="at least 30"):
        profile_table(graph, ctrl, EagerBackend(), threads=1, repeats=5)


def test_unknown_backend_and_onnxruntime_on_a_gpu_are_one_line_errors():
    with pytest.raises(ValueError, match="use one of onnxruntime, eager"):
        make_backend("tflite", 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="--latency.backend eager"):
        make_backend("onnxruntime", 1, torch.device("cuda"))


def test_flops_table(tiny_space):
    graph, ctrl = _models(tiny_space)
    flops = count_flops(graph, ctrl)
    assert flops.modules.shape == (17, 5) and (flops.modules > 0).all()
    # Expansion 6 costs more than expansion 3 at the same kernel.
    assert (flops.modules[:, 0] > flops.modules[:, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_profiled_table_is_calibrated(tiny_space, backend):
    graph, ctrl = _models(tiny_space)
    table = profile_table(
        graph, ctrl, backend, threads=1, warmup=1, repeats=30, calibration_children=4
    )
    assert 0.1 < table.chain_factor < 10.0 and table.chain_factor != 1.0
    assert 0.3 < table.chain_exponent < 3.0 and math.isfinite(table.reference_ms)


def test_spearman():
    from instanas.latency.validation import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_validation_compares_table_with_measured_children(tiny_space, tmp_path, backend):
    from instanas.latency.validation import plot_validation, validate_table

    graph, ctrl = _models(tiny_space)
    table = profile_table(
        graph, ctrl, backend, threads=1, warmup=1, repeats=30, calibration_children=3
    )
    children = random_children(graph, 6, seed=0)
    assert len({str(c) for c in children}) == 6
    result = validate_table(
        table, graph, ctrl, [(c, "random", 0) for c in children], backend,
        threads=1, warmup=1, repeats=30,
    )  # fmt: skip
    assert len(result.children) == 6
    assert all(c.measured_ms > 0 and c.predicted_ms > 0 for c in result.children)
    assert -1.0 <= result.spearman <= 1.0
    assert 0 <= result.median_relative_error <= result.p90_relative_error
    assert result.device["backend"] == backend.name
    result.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["spearman"] == result.spearman
    plot_validation(result, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("burst", [1, 3])
def test_side_by_side_timing_runs_each_model_on_a_stream_of_images(burst):
    """Every image is timed once per model; with warm-up runs each model first answers the
    images just before its block, then the block's consecutive images (a routed model pays
    for switching children as a service does), never the same image twice in a row."""
    from instanas.latency.side_by_side import STREAM_BLOCK, measure_per_image

    images = torch.arange(70, dtype=torch.float32).view(70, 1, 1, 1)
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def model(name):
        return lambda x: seen[name].append(int(x.item()))

    samples: dict[str, list[float]] = {}
    stats = measure_per_image({n: model(n) for n in seen}, images, 1, 0, 0, samples, burst)
    assert [len(samples[n]) for n in seen] == [70, 70] and stats["a"]["images"] == 70
    block = STREAM_BLOCK if burst > 1 else 1
    expected = []
    for start in range(0, 70, block):
        expected += [(start - k) % 70 for k in range(burst - 1, 0, -1)]
        expected += list(range(start, min(start + block, 70)))
    assert seen["a"] == seen["b"] == expected


def _paced_model(times_ms: list[float]):
    """A model whose n-th call sleeps ``times_ms[n]`` (then the last value)."""
    calls = iter(times_ms)

    def run(x):
        time.sleep(next(calls, times_ms[-1]) / 1000)

    return run


def test_a_disturbed_timing_pass_is_timed_again_and_the_quiet_one_kept():
    """A pass whose models' per-image times spread widely (std/mean above 0.5) is repeated;
    the figures are the quiet pass's, and every pass is recorded."""
    from instanas.latency.side_by_side import measure_per_image

    images = torch.zeros(12, 1, 1, 1)
    erratic = [0.2, 6.0] * 6  # the first pass: std about the mean
    model = _paced_model(erratic + [2.0] * 12)
    samples: dict[str, list[float]] = {}
    passes: list[dict] = []
    stats = measure_per_image({"m": model}, images, 1, 0, 0, samples, 1, 2, passes)
    assert [(p["disturbed"], p["kept"]) for p in passes] == [(True, False), (False, True)]
    assert passes[0]["disturbance"] > 0.5 > passes[1]["disturbance"]
    assert 1.9 < stats["m"]["mean"] < 4.0 and min(samples["m"]) > 1.9
    assert stats["m"]["mean"] == pytest.approx(passes[1]["mean_ms"]["m"])


def test_without_retries_a_disturbed_pass_is_kept_and_says_so():
    from instanas.latency.side_by_side import measure_per_image

    passes: list[dict] = []
    model = _paced_model([0.2, 6.0] * 6)
    measure_per_image({"m": model}, torch.zeros(12, 1, 1, 1), 1, 0, 0, passes_out=passes)
    assert [(p["disturbed"], p["kept"]) for p in passes] == [(True, True)]
