"""The command line: errors are one line with exit code 2 and touch nothing; a tiny run works."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_runs import snapshot

from instanas.cli import main
from instanas.space import ChildArchitecture

TINY = [
    "--preset",
    "fashion-cpu-full",
    "--data.limit_train",
    "600",
    "--data.limit_test",
    "200",
    "--pretrain.epochs",
    "1",
    "--search.epochs",
    "1",
    "--finetune.epochs",
    "1",
    "--baseline.epochs",
    "1",
    "--pretrain.batch_size",
    "100",
    "--search.batch_size",
    "100",
    "--finetune.batch_size",
    "100",
    "--baseline.batch_size",
    "100",
    "--latency.repeats",
    "30",
    "--latency.warmup",
    "2",
    "--latency.eval_images",
    "20",
    "--latency.calibration_children",
    "3",
    "--search.min_pretrain_accuracy",
    "0",
    # The preset's stages and comparisons at a quarter of its width: the same code, a fraction
    # of the time.
    "--space.width",
    "0.25",
    "--variants.max_timed_children",
    "8",
    "--escalation.timed_images",
    "50",
    "--quiet",
]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("preset: fashion-cpu\n")
    (run / "results.json").write_text("{}\n")
    return run


def _fail(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_preset(capsys, tmp_path):
    err = _fail(capsys, ["run", "--preset", "fashion-gpu", "--output", str(tmp_path / "r")])
    assert "unknown preset" in err and "fashion-cpu" in err
    assert not (tmp_path / "r").exists()


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  epocs: 3\n")
    err = _fail(capsys, ["run", "--config", str(cfg), "--output", str(tmp_path / "r")])
    assert "pretrain.epocs" in err and "pretrain.epochs" in err


@pytest.mark.parametrize("stage", ["pretrain", "search", "finetune", "baseline"])
def test_non_positive_epochs(capsys, tmp_path, stage):
    err = _fail(capsys, ["run", f"--{stage}.epochs", "0", "--output", str(tmp_path / "r")])
    assert f"{stage}.epochs" in err
    assert not (tmp_path / "r").exists()


def test_missing_dataset(capsys, tmp_path):
    err = _fail(
        capsys, ["run", "--data.root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "r")]
    )
    assert "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "r").exists()


def test_cifar_missing_batch(capsys, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    import pickle

    rows = np.zeros((4, 3072), dtype=np.uint8)
    for name in ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    err = _fail(
        capsys,
        [
            "run",
            "--preset",
            "paper-cifar",
            "--device",
            "cpu",
            "--data.root",
            str(folder),
            "--output",
            str(tmp_path / "r"),
        ],
    )
    assert "data_batch_3" in err


def test_errors_leave_existing_run_untouched(capsys, existing_run):
    before = _snapshot(existing_run)
    _fail(capsys, ["run", "--output", str(existing_run)])  # exists, no --resume
    _fail(capsys, ["run", "--resume", str(existing_run), "--pretrain.epochs", "0"])
    _fail(capsys, ["search", "--output", str(existing_run)])  # no pretrain output
    _fail(capsys, ["run", "--resume", str(existing_run), "--data.root", "/nowhere"])
    assert _snapshot(existing_run) == before


def test_help_explains_options():
    out = subprocess.run(
        [sys.executable, "-m", "instanas", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for key in (
        "--pretrain.epochs",
        "--search.batch_size",
        "--latency.threads",
        "--resume",
        "--controller.alpha",
    ):
        assert key in out


def _assert_finetune_trained_only(run: Path, child: ChildArchitecture) -> None:
    """Fine-tuning under a one-child set trains that child's modules and leaves every other
    module's weights and statistics as the search left them."""
    searched = load_file(run / "search" / "selected.safetensors")
    tuned = load_file(run / "finetune" / "model.safetensors")
    changed: dict[tuple[int, int], bool] = {}
    for key, value in tuned.items():
        found = re.match(r"metagraph\.cells\.(\d+)\.candidates\.(\d+)\.", key)
        if found and not key.endswith("num_batches_tracked"):  # recalibration resets them all
            module = (int(found[1]), int(found[2]))
            changed[module] = changed.get(module, False) or not torch.equal(value, searched[key])
    assert {m for m, c in changed.items() if c} == set(child.module_pairs())


def test_end_to_end_tiny_run(tmp_path, cache_dir):
    """The whole pipeline on a Fashion-MNIST subset, through the real command (< 2 minutes)."""
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path / "run"
    env = {**os.environ, "INSTANAS_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "instanas", "run", "--output", str(run), *TINY],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    models = results["models"]
    assert {
        "instanas",
        "mbv2-path",
        "mbv2-0.5x",
        "mbv2-0.75x",
        "mbv2-1.4x",
        "min-net",
        "random-policy",
        "static-child",
        "oracle",
        "instanas-A",
    } <= set(models)
    assert results["device"]["torch"] and results["device"]["threads"] == 1
    assert results["reproducibility"]["training_threads"] == torch.get_num_threads()
    assert results["reproducibility"]["bitwise"] is True
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["threads"] >= 1  # every run records what it ran with
    assert {k: resolved["data"][k] for k in ("flip", "crop_padding", "cutout")} == {
        "flip": True,
        "crop_padding": 2,
        "cutout": 0,
    }
    assert results["device"]["backend"] == "onnxruntime"
    for name, model in models.items():
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert {"mean", "std", "p50", "p90"} <= set(model["latency_ms"])
        assert model["latency_ms"]["mean"] > 0
        if model["kind"] == "oracle":
            continue
        assert model["flops"] > 0 and model["latency_ms_eager"]["mean"] > 0
        # Every model with a deployed form is timed as deployed; the random-policy model
        # draws a child per image at random and has none, so the table predicts it.
        source = "table" if model["kind"] == "random-policy" else "measured"
        assert model["latency_source"] == source, name
        # The table covers the run's own space; other widths are only measured.
        assert ("table_latency_ms" in model) == (model.get("width", 1.0) == 1.0), name
    # An empty child still runs the forced defaults: more than stem and head alone.
    fixed = results["latency_table"]["stem_ms"] + results["latency_table"]["head_ms"]
    assert models["min-net"]["table_latency_ms"] > fixed * 1.01
    widths = [models[f"mbv2-{w}"]["flops"] for w in ("0.5x", "0.75x", "path", "1.4x")]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    main = models["instanas"]
    # The preset deploys the child the controller picks most on the validation split.
    deployed = json.loads((run / "finetune" / "children.json").read_text())
    assert deployed["count"] == 1 and len(deployed["children"]) == 1
    assert {"search_sha256", "model_sha256"} <= set(deployed)
    _assert_finetune_trained_only(run, ChildArchitecture.from_string(deployed["children"][0]))
    assert 1 <= main["distinct_children"] <= len(deployed["children"])
    assert results["deployed_overhead"]["exported_children"] == len(deployed["children"])
    assert 1.0 <= main["effective_children"] <= main["distinct_children"]
    assert 0.0 < main["top_child_share"] <= 1.0
    assert 0.0 <= main["shuffled_routing_accuracy"] <= 1.0
    comparison = results["comparison"]
    assert comparison["routing_gain_points"] == pytest.approx(
        100 * (main["test_accuracy"] - main["shuffled_routing_accuracy"])
    )
    assert comparison["static_child_latency_ratio"] > 0
    # The fashion-cpu presets escalate unsure images and train the peer.
    escalation = main["escalation"]
    timing = json.loads((run / "escalation" / "rule.json").read_text())["timing"]
    # Escalation is priced by shares timed on a stream, from never (0) to always (1).
    shares = sorted(share for share, _ in timing["share_points"])
    assert len(shares) == 5 and shares[0] == 0.0 and shares[-1] == 1.0
    assert escalation["network"] == "mbv2-path" and 0.0 <= escalation["share"] <= 1.0
    assert len(escalation["test_curve"]) == len(escalation["validation_curve"]) > 1
    assert "escalation_gain_points" in comparison and "peer_points" in comparison
    assert models["mbv2-peer"]["peer"] and 0 < results["deployed_overhead"]["routed_ms"]
    assert models["static-child"]["distinct_children"] == 1
    # The oracle picks, per image, the cheapest correct of children that include the greedy one.
    assert models["oracle"]["test_accuracy"] >= models["instanas"]["test_accuracy"]
    candidates = results["variants"]["candidates"]
    assert len(candidates) == 3  # one search epoch, three checkpoints (fashion-cpu-full)
    letters = sorted(c["variant"] for c in candidates if c["variant"])
    assert letters and letters == list("ABCDE"[: len(letters)])
    assert all(c["pareto"] for c in candidates if c["variant"])
    for name in [
        "config.yaml",
        "latency_table.json",
        "metrics.jsonl",
        "results.md",
        "pretrain/metagraph.safetensors",
        "search/epoch_001.safetensors",
        "search/epoch_001_part1.safetensors",
        "search/selected.json",
        "finetune/model.safetensors",
        "baseline/mbv2.safetensors",
        "baseline/mbv2-0.5x.safetensors",
        "baseline/min-net.safetensors",
        "random-policy/model.safetensors",
        "static-child/model.safetensors",
        "variants/A/model.safetensors",
        "test_per_image.npz",
        "report.md",
        "report.html",
        "plots/error_vs_latency.png",
        "plots/gallery.png",
    ]:
        assert (run / name).exists(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    stages = {json.loads(line)["stage"] for line in lines}
    assert {
        "baseline",
        "pretrain",
        "search",
        "finetune",
        "random-policy",
        "static-child",
        "baseline/min-net",
        "baseline/mbv2-0.5x",
    } <= stages
    # Each variant was fine-tuned, unless it is the main model's own start (then reused).
    selected = json.loads((run / "search" / "selected.json").read_text())["chosen"]
    for letter, variant in json.loads((run / "variants" / "variants.json").read_text()).items():
        reused = variant["checkpoint"] == selected["checkpoint"] == variant["weights"]
        assert reused or f"variants/{letter}" in stages, letter

    # The result loads in Python and predicts.

    import instanas

    model = instanas.load(run)
    assert [str(c) for c in model.predictor.child_set] == deployed["children"]
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert model.predict(images).shape == (3,)
    assert model.policies(images).shape == (3, 17, 5)
    x = model.normalise(images)
    dense, policy = model.predictor.logits(x, execution="dense")
    for execution in ("sparse", "grouped"):
        logits, again = model.predictor.logits(x, execution=execution)
        assert torch.equal(policy, again)
        assert torch.allclose(logits, dense, rtol=1e-4, atol=1e-4)

    # A torn results.json is reported in one line, not as a JSON traceback.
    from instanas.checkpoint import CheckpointError

    text = (run / "results.json").read_text()
    (run / "results.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="results.json is not valid JSON"):
        instanas.load(run)
    (run / "results.json").write_text(text)

    # Resuming a finished run does nothing and rewrites nothing (the log gains its lines).
    before = snapshot(run)
    before.pop("log.txt")
    proc = subprocess.run(
        [sys.executable, "-m", "instanas", "run", "--resume", str(run), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to do" in proc.stdout
    after = snapshot(run)
    after.pop("log.txt")
    assert after == before

    # The table is checked against whole children, the controller's among them.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instanas",
            "profile",
            "--output",
            str(run),
            "--validate",
            "--children",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Spearman" in proc.stdout
    check = json.loads((run / "latency_validation.json").read_text())
    sources = [c["source"] for c in check["children"]]
    assert sources.count("random") == 4 and "controller" in sources
    assert (run / "latency_validation.png").read_bytes()[:4] == b"\x89PNG"


def test_load_rejects_a_folder_that_is_not_a_run(tmp_path):
    import instanas
    from instanas.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not an instanas run directory"):
        instanas.load(tmp_path)


def test_predict_rejects_bad_images(tiny_space):
    import torch

    from instanas.deploy.inference import InstaNASModel
    from instanas.models.controller import Controller, ControllerSpec
    from instanas.models.metagraph import MetaGraph
    from instanas.models.predictor import InstaNASPredictor

    graph = MetaGraph(tiny_space).eval()
    ctrl = Controller(1, 17, 5, ControllerSpec(12, (4, 8, 8))).eval()
    model = InstaNASModel(InstaNASPredictor(graph, ctrl), ["a", "b", "c", "d"], (0.5,), (0.25,))
    assert model.predict(torch.zeros(2, 1, 12, 12, dtype=torch.uint8)).shape == (2,)
    with pytest.raises(ValueError, match="expected"):
        model.predict(torch.zeros(2, 3, 12, 12))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(torch.full((1, 1, 12, 12), float("nan")))
