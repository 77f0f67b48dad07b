"""Every script under scripts/ and bench/ imports only names the package still has: a
restructuring that moves a function must move its callers there too."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instanas.data import DEFAULT_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py")])


def package_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from instanas... import name`` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("instanas"):
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports_resolve(path):
    for module, name in package_imports(path):
        imported = importlib.import_module(module)
        assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{path.name}: {module} has no {name}"
        )


@pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed"
)
def test_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path):
    """scripts/gpu_check.py waits for a session with a GPU: it must not rot until then."""
    out = tmp_path / "check"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu",
               "--amp", "off", "--tiny", "--output", str(out)]  # fmt: skip
    env = {**os.environ, "INSTANAS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert {"environment", "throughput", "table", "run"} <= set(results)
    assert results["throughput"]["train_sparse_images_per_s"] > 0
    assert -1 <= results["table"]["spearman"] <= 1
    assert {"pretrain", "search", "finetune"} <= set(results["run"]["images_per_s"])
    assert "instanas" in (out / "gpu_check.md").read_text()


def test_baseline_accuracy_scores_a_baseline_only_run(tmp_path):
    from tiny_runs import make_folder_dataset, tiny_config

    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(make_folder_dataset(tmp_path / "data"), epochs=1))
    run = tmp_path / "run"
    env = {**os.environ, "INSTANAS_CACHE": str(tmp_path / "cache"), "INSTANAS_NO_PROGRESS": "1"}
    trained = subprocess.run([sys.executable, "-m", "instanas", "baseline", "--config",
                              str(config), "--output", str(run)],
                             capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    script = str(ROOT / "scripts" / "baseline_accuracy.py")
    scored = subprocess.run([sys.executable, script, str(run)],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    accuracy = float(scored.stdout.split("test accuracy")[1].strip().rstrip("%"))
    assert 0.0 <= accuracy <= 100.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny main-model run with its best static child (what the routing scripts read)."""
    from tiny_runs import tiny_main_model_run

    return tiny_main_model_run(tmp_path_factory.mktemp("scripts"))


def _script(name: str, *args: str) -> str:
    env = {**os.environ, "INSTANAS_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_routing_ceiling_scores_both_references_image_by_image(tiny_run, tmp_path):
    report = json.loads(_script("routing_ceiling.py", str(tiny_run)))
    results = json.loads((tiny_run / "results.json").read_text())["models"]
    for model in ("instanas", "static-child", "mbv2-path"):
        assert report["test_accuracy"][model] == pytest.approx(results[model]["test_accuracy"])
    assert sum(part["share"] for part in report["by_route"]) == pytest.approx(1.0)
    acc = report["test_accuracy"]
    for router, curve in report["two_model_routing"].items():
        assert curve[0]["accuracy"] == pytest.approx(acc["static-child"]), router
        assert curve[-1]["accuracy"] == pytest.approx(acc["mbv2-path"]), router
    # No router beats the one that knows which network is right.
    oracle = report["two_model_routing"]["oracle"]
    for router in ("controller_expected_ms", "random"):
        for mine, best in zip(report["two_model_routing"][router], oracle):
            assert mine["accuracy"] <= best["accuracy"] + 1e-9
    saved = tmp_path / "run" / "routing-ceiling.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(report))
    assert _script("routing_ceiling.py", "--table", str(saved)).startswith("| run |")


def test_routing_signal_and_children_table_read_a_run(tiny_run):
    signal = json.loads(_script("routing_signal.py", str(tiny_run)))
    assert 0.0 <= signal["cheapest_child_test_accuracy"] <= 1.0
    assert signal["controller_probability_spread"]["max"] >= 0.0
    assert _script("children_table.py", str(tiny_run)).count("|") > 0
