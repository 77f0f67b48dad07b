"""`instanas report`: every plot is a real PNG, the HTML is self-contained, every number of
results.json is in both reports, and bad run directories fail in one line touching nothing."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instanas.cli import main
from instanas.report.document import write_report
from instanas.report.plots import PLOTS, write_plots

ALL_PLOTS = [name for name, _, _ in PLOTS]
CLASSES, CELLS, MODULES, N, K = 4, 6, 5, 60, 3


def _latency(mean: float) -> dict:
    return {"mean": mean, "std": 0.1 * mean, "p50": 0.97 * mean, "p90": 1.2 * mean, "images": N}


def _model(kind: str, accuracy: float, ms: float, **extra) -> dict:
    return {
        "kind": kind,
        "test_accuracy": accuracy,
        "latency_ms": _latency(ms),
        "latency_source": "measured",
        "table_latency_ms": 0.9 * ms,
        "flops": 1.5e6 * ms,
        "distinct_children": 7,
        "mean_active_modules": 11.25,
        **extra,
    }


def _results() -> dict:
    models = {"instanas": _model("instanas", 0.8906, 1.53, controller_ms=0.325)}
    for i, letter in enumerate("ABCDE"):
        models[f"instanas-{letter}"] = _model("variant", 0.85 + 0.01 * i, 1.1 + 0.3 * i)
    for width, name in (
        (0.5, "mbv2-0.5x"),
        (0.75, "mbv2-0.75x"),
        (1.0, "mbv2-path"),
        (1.4, "mbv2-1.4x"),
    ):
        models[name] = _model("mbv2", 0.80 + 0.07 * width, 1.2 + 2.0 * width, width=width)
    models["min-net"] = _model("min-net", 0.71, 0.9)
    models["random-policy"] = _model("random-policy", 0.83, 1.7)
    models["oracle"] = {**_model("oracle", 0.97, 1.2), "latency_source": "table"}
    candidates = [
        {
            "name": f"c{i}",
            "val_accuracy": 0.8 + 0.013 * i,
            "val_latency_ms": 1.0 + 0.21 * i,
            "pareto": i % 2 == 0,
            "variant": "ABCDE"[i // 2] if i % 2 == 0 else None,
        }
        for i in range(9)
    ]
    return {
        "preset": "fashion-cpu",
        "dataset": "fashion-mnist",
        "seed": 3,
        "classes": ["T-shirt", "Trouser", "Pull<over>", "Dress & co"],
        "device": {
            "type": "cpu",
            "name": "Test <CPU> & co",
            "threads": 1,
            "torch": "2.0",
            "python": "3.11",
            "platform": "Linux",
        },
        "models": models,
        "comparison": {
            "latency_reduction": 0.5813787324159378,
            "accuracy_delta_points": -0.48000000000000265,
        },
        "variants": {"candidates": candidates},
        "latency_table": {
            "stem_ms": 0.03004942721606323,
            "head_ms": 0.1442727420865713,
            "controller_ms": 0.3251822867896084,
            "chain_factor": 1.16,
        },
        "test_images": N,
        "epochs": {"pretrain": 2, "search": 3, "finetune": 9},
        "wall_time_s": {"pretrain": 165.73048180099977, "total": 898.8691158479996},
    }


def _per_image(identical: bool = False) -> dict:
    rng = np.random.default_rng(0)
    policies = rng.integers(0, 2, (N, CELLS, MODULES)).astype(np.uint8)
    if identical:
        policies[:] = policies[0]
    gallery = rng.integers(0, 256, (CLASSES, 2, K, 1, 8, 8)).astype(np.uint8)
    return {
        "labels": np.arange(N, dtype=np.int64) % CLASSES,
        "predicted_ms": rng.uniform(1.0, 2.0, N).astype(np.float32),
        "correct": rng.random(N) < 0.9,
        "policies": policies,
        "measured_index": np.arange(20, dtype=np.int64),
        "measured_ms": rng.uniform(1.0, 2.5, 20).astype(np.float32),
        "gallery_images": gallery,
        "gallery_ms": np.sort(rng.uniform(1, 2, (CLASSES, 2, K)), axis=None)
        .reshape(CLASSES, 2, K)
        .astype(np.float32),
        "gallery_index": rng.integers(0, N, (CLASSES, 2, K)).astype(np.int64),
        "random_measured_ms": rng.uniform(1.2, 2.8, 20).astype(np.float32),
    }


def _make_run(root: Path, results: dict, per_image: dict | None) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results, indent=2))
    (run / "config.yaml").write_text("preset: fashion-cpu\nsearch:\n  epochs: 3  # `x` <y>\n")
    if per_image is not None:
        np.savez(run / "test_per_image.npz", **per_image)
    return run


def _numbers(value, path=""):
    """Every numeric leaf, formatted as the report promises: ints as they are, floats by repr."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool):
        yield path, str(value)
    elif isinstance(value, float):
        yield path, repr(value)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = _make_run(tmp_path_factory.mktemp("full"), _results(), _per_image())
    return run, write_report(run)


def test_every_plot_is_a_real_png(full_report):
    run, _ = full_report
    for name in ALL_PLOTS:
        path = run / "plots" / name
        assert path.stat().st_size > 10_000, name
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 400, (name, image.size)


def test_every_number_is_in_both_reports(full_report):
    run, (md_path, html_path) = full_report
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    markdown, page = md_path.read_text(), html_path.read_text()
    numbers = list(_numbers(json.loads((run / "results.json").read_text())))
    assert len(numbers) > 150
    for path, text in numbers:
        assert f"| {path} | {text} |" in markdown, path
        assert f"<td>{path}</td><td>{text}</td>" in page, path


def test_report_content(full_report):
    run, (md_path, html_path) = full_report
    markdown, page = md_path.read_text(), html_path.read_text()
    for name in ALL_PLOTS:
        assert f"(plots/{name})" in markdown
    assert "search:\n  epochs: 3  # `x` <y>" in markdown  # config verbatim
    assert "epochs: 3  # `x` &lt;y&gt;" in page  # verbatim and escaped
    assert "Test &lt;CPU&gt; &amp; co" in page and "<CPU>" not in page
    assert "58.1% lower than the MobileNetV2 path" in markdown
    assert "random policies" in markdown and "a bound" in markdown
    assert "beats mbv2" in markdown  # variant A: 1.1 ms at 85%, mbv2-0.5x: 2.2 ms at 83.5%


def test_html_is_self_contained(full_report):
    _, (_, html_path) = full_report
    page = html_path.read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE)
    assert len(links) == len(ALL_PLOTS)
    assert all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "url(" not in page


def test_identical_policies_and_missing_gallery(tmp_path):
    per_image = _per_image(identical=True)
    del per_image["gallery_images"]
    run = _make_run(tmp_path, _results(), per_image)
    written = {p.name for p in write_plots(run)}
    assert written == set(ALL_PLOTS) - {"gallery.png"}


def test_without_per_image_data_only_the_tradeoff_plot(tmp_path):
    run = _make_run(tmp_path, _results(), None)
    assert [p.name for p in write_plots(run)] == ["error_vs_latency.png"]


def test_old_results_without_kind(tmp_path):
    old = {
        name: {k: v for k, v in model.items() if k not in ("kind", "latency_source")}
        for name, model in _results()["models"].items()
        if name in ("instanas", "mbv2-path")
    }
    results = {k: v for k, v in _results().items() if k not in ("variants", "classes")}
    run = _make_run(tmp_path, {**results, "models": old}, None)
    md_path, _ = write_report(run)
    markdown = md_path.read_text()
    assert "| instanas | instanas |" in markdown and "| mbv2-path | mbv2 | 1 |" in markdown
    for path, text in _numbers(json.loads((run / "results.json").read_text())):
        assert f"| {path} | {text} |" in markdown, path


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_fails(capsys, run: Path) -> str:
    assert main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_missing_run_dir(capsys, tmp_path):
    err = _cli_fails(capsys, tmp_path / "nope")
    assert "does not exist" in err
    assert not (tmp_path / "nope").exists()


def test_cli_no_results(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    err = _cli_fails(capsys, tmp_path)
    assert "has no results.json" in err and "instanas evaluate" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_cli_corrupt_results_touches_nothing(capsys, tmp_path):
    run = _make_run(tmp_path, _results(), None)
    (run / "results.json").write_text('{"models": {')
    (run / "report.md").write_text("old report\n")
    before = _snapshot(run)
    err = _cli_fails(capsys, run)
    assert "not valid JSON" in err
    assert _snapshot(run) == before


def test_cli_writes_both_reports(capsys, tmp_path):
    run = _make_run(tmp_path, _results(), None)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(run / "report.md"), str(run / "report.html")]


def test_cli_interrupted_report_says_how_to_redo_it(capsys, tmp_path, monkeypatch):
    run = _make_run(tmp_path, _results(), None)

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr("instanas.cli.commands.write_report", interrupted)
    assert main(["report", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"instanas report {run}` again" in err and "--resume" not in err


def test_tensorboard_mirrors_the_metrics_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from instanas.report.live import TensorBoardMirror

    mirror = TensorBoardMirror(tmp_path / "tb")
    mirror.write(
        {
            "time": "t",
            "stage": "pretrain",
            "epoch": 1,
            "train_loss": 2.5,
            "train_accuracy": 0.25,
            "checkpoint": "x.safetensors",
            "flag": True,
        }
    )
    mirror.write({"stage": "pretrain", "epoch": 2, "train_loss": 1.5, "train_accuracy": 0.5})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["pretrain/train_accuracy", "pretrain/train_loss"]
    losses = [(e.step, e.value) for e in events.Scalars("pretrain/train_loss")]
    assert losses == [(1, 2.5), (2, 1.5)]


def test_tensorboard_without_the_package_is_a_one_line_error(monkeypatch):
    import builtins

    from instanas.config import ConfigError
    from instanas.report.live import require_tensorboard

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="instanas\\[tensorboard\\]"):
        require_tensorboard()


def test_without_matplotlib_the_report_is_written_without_plots(tmp_path, monkeypatch):
    """A missing optional package never costs a finished run: report.md and report.html are
    written, say why there are no plots, and no plot file appears."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = _make_run(tmp_path, _results(), _per_image())
    md_path, html_path = write_report(run)
    assert "matplotlib is not installed" in md_path.read_text()
    assert "matplotlib is not installed" in html_path.read_text()
    assert not (run / "plots").exists()


def _passes(*scores: float, kept: int) -> list[dict]:
    return [{"disturbance": s, "disturbed": s > 0.5, "kept": i == kept, "mean_ms": {"m": 1.0}}
            for i, s in enumerate(scores)]  # fmt: skip


def test_results_say_when_the_timing_was_repeated_or_disturbed():
    from instanas.report.document import results_markdown

    quiet = results_markdown({**_results(), "timing_passes": _passes(0.3, kept=0)})
    assert "timing loop" not in quiet and "disturbed" not in quiet
    repeated = results_markdown({**_results(), "timing_passes": _passes(0.8, 0.3, kept=1)})
    assert "ran 2 times" in repeated and "quiet pass's (0.30)" in repeated
    noisy = results_markdown({**_results(), "timing_passes": _passes(0.8, 0.7, 0.9, kept=1)})
    assert "disturbed in every pass (3;" in noisy and "instanas evaluate --output RUN" in noisy
