"""Train on one machine, profile on another: a table written by `instanas profile` on the
target and passed with --latency.table drives another run's search and evaluation as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import MAIN_MODEL_ONLY, make_folder_dataset, tiny_config

from instanas.latency.table import LatencyTable


def _instanas(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INSTANAS_CACHE": str(tmp / "cache"), "INSTANAS_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "instanas", *args, "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _scaled(table: dict, factor: float) -> dict:
    """The table with every timing multiplied: a slower device."""

    def scale(stats: dict) -> dict:
        return {k: v * factor if k.endswith("_ms") else v for k, v in stats.items()}

    table["modules"] = [[scale(m) for m in cell] for cell in table["modules"]]
    table["fixed"] = {name: scale(stats) for name, stats in table["fixed"].items()}
    return table


def _profile_on_target(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny config, and the folder where `instanas profile` wrote its table."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        tiny_config(make_folder_dataset(tmp_path / "data"), epochs=1, **MAIN_MODEL_ONLY)
    )
    target = tmp_path / "on-target"
    proc = _instanas(tmp_path, "profile", "--config", str(config), "--output", str(target))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return config, target


def test_a_table_profiled_on_the_target_drives_search_and_evaluation(tmp_path):
    config, target = _profile_on_target(tmp_path)
    table = _scaled(json.loads((target / "latency_table.json").read_text()), 10.0)
    table["key"].update(device="target-cpu", threads=1, torch="0.0-target")
    given = tmp_path / "target_table.json"
    given.write_text(json.dumps(table))
    before = given.read_bytes()

    run = tmp_path / "run"
    proc = _instanas(
        tmp_path,
        "run",
        "--config",
        str(config),
        "--output",
        str(run),
        "--latency.table",
        str(given),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profiling again" not in proc.stderr
    assert given.read_bytes() == before  # the user's table is never overwritten
    assert json.loads((run / "latency_table.json").read_text())["key"]["device"] == "target-cpu"
    results = json.loads((run / "results.json").read_text())
    profiled_on = results["latency_table"]["profiled_on"]
    assert {k: profiled_on[k] for k in ("device", "threads", "torch", "backend")} == {
        "device": "target-cpu",
        "threads": 1,
        "torch": "0.0-target",
        "backend": "onnxruntime",
    }
    assert profiled_on["runtime"].startswith("onnxruntime ")
    slow = LatencyTable.load(given)
    assert results["latency_table"]["stem_ms"] == pytest.approx(slow.unit_ms("stem"))
    # Evaluation predicts with the target's (10x) costs: at least its fixed part.
    assert results["models"]["instanas"]["table_latency_ms"] >= slow.fixed_ms()
    # So did the search: its greedy children's cells cost at least the target's cheapest module.
    history = json.loads((run / "search" / "selected.json").read_text())["history"]
    cheapest = float(slow.module_ms()[slow.module_ms() > 0].min())
    assert all(h["val_cells_ms"] >= cheapest for h in history)


def test_a_table_of_another_model_is_refused_in_one_line(tmp_path):
    config, target = _profile_on_target(tmp_path)
    table = json.loads((target / "latency_table.json").read_text())
    table["key"]["space"] = "another-space"
    given = tmp_path / "other.json"
    given.write_text(json.dumps(table))
    run = tmp_path / "run"
    proc = _instanas(
        tmp_path,
        "pretrain",
        "--config",
        str(config),
        "--output",
        str(run),
        "--latency.table",
        str(given),
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "another model (space differ)" in line and "instanas profile" in line
    assert not run.exists()  # nothing written
    missing = _instanas(
        tmp_path,
        "pretrain",
        "--config",
        str(config),
        "--output",
        str(run),
        "--latency.table",
        str(tmp_path / "nope.json"),
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_profile_with_a_shape_reads_no_data_and_fits_the_run(tmp_path):
    """A device without the data set profiles from the shape alone; the table's key is the one
    a profile with the data writes, so a run accepts it."""
    config, target = _profile_on_target(tmp_path)
    gone = tmp_path / "data-elsewhere"
    (tmp_path / "data").rename(gone)  # the device has no data
    on_device = tmp_path / "shape-only"
    proc = _instanas(tmp_path, "profile", "--config", str(config), "--output", str(on_device),
                     "--shape", "3x8x8", "--classes", "2", "--fresh")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no data read" in (on_device / "log.txt").read_text()
    with_data = json.loads((target / "latency_table.json").read_text())["key"]
    assert json.loads((on_device / "latency_table.json").read_text())["key"] == with_data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "28x28"], "is not CxSxS"),
        (["--shape", "1x28x20"], "images are square"),
        (["--shape", "1x28x28", "--classes", "1"], "at least 2 classes"),
        (["--classes", "5"], "goes with --shape"),
    ],
)
def test_profile_refuses_a_bad_shape_in_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    proc = _instanas(tmp_path, "profile", "--output", str(out), *args)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()
