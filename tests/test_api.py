"""The Python API (``instanas.load`` as an nn.Module) and the results.json contract."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_main_model_run

import instanas

try:
    import jsonschema
except ImportError:  # only the results.json contract tests need it
    jsonschema = None
needs_jsonschema = pytest.mark.skipif(
    jsonschema is None, reason="jsonschema is not installed (pip install 'instanas[test]')"
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return tiny_main_model_run(tmp_path_factory.mktemp("api"))


def _pngs(folder: Path, count: int = 5) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (8 + 3 * i, 8 + 5 * i)  # any size: preprocess crops and resizes
        paths.append(folder / f"{i}.png")
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(paths[-1])
    return paths


def test_load_is_an_nn_module_and_round_trips(tiny_run, tmp_path):
    from PIL import Image

    model = instanas.load(tiny_run)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.to("cpu").eval() is model
    paths = _pngs(tmp_path)
    x = model.preprocess(paths)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    # Paths, PIL images and a single path give the same input.
    pil = [Image.open(p) for p in paths]
    assert torch.equal(model.preprocess(pil), x)
    assert torch.equal(model.preprocess(paths[0]), x[:1])
    logits = model(x)
    assert logits.shape == (5, 2)
    assert torch.equal(model.predict(paths), logits.argmax(1))
    probs = model.predict_proba(paths, batch_size=2)  # chunked like a whole batch
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(5))
    routes = model.route(paths, batch_size=3)
    assert len(routes) == 5 and all(len(r.split("-")) == model.space.num_cells for r in routes)
    policies = model.policies(paths)
    assert routes == [str(instanas.ChildArchitecture.from_policy(p)) for p in policies]
    # uint8 tensors at the model's size go the same way as the decoded files.
    from instanas.runtime import read_image

    raw = torch.from_numpy(np.stack([read_image(p, 3, 8) for p in paths]))
    assert torch.equal(model.predict(raw), model.predict(paths))
    assert model.metrics["kind"] == "instanas" and model.results["schema_version"] == 2
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(paths, batch_size=0)


def test_load_chooses_a_variant(tiny_run, tmp_path):
    from instanas.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="has no model 'B': choose one of instanas"):
        instanas.load(tiny_run, model="B")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "variants").mkdir(exist_ok=True)
    (run / "variants" / "variants.json").write_text(
        json.dumps({"A": {"model": "finetune/model.safetensors"}})
    )
    for name in ("A", "instanas-A"):
        variant = instanas.load(run, model=name)
        assert variant.name == "A"
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(variant.predict(images), instanas.load(run).predict(images))


def test_building_blocks_at_the_top_level():
    for name in (
        "SearchSpace",
        "ChildArchitecture",
        "MetaGraph",
        "Controller",
        "export",
        "load",
        "InstaNASModel",
    ):
        obj = getattr(instanas, name)
        assert obj.__doc__ and name in instanas.__all__, name
    space = instanas.SearchSpace(
        input_channels=1,
        input_size=8,
        num_classes=3,
        width=0.25,
        stem_channels=8,
        stages=[[8, 1, 1], [16, 1, 2]],
        head_channels=16,
    )
    graph = instanas.MetaGraph(space).eval()
    child = instanas.ChildArchitecture.from_string("0-4")
    assert graph.forward_child(torch.zeros(1, 1, 8, 8), child).shape == (1, 3)


# --------------------------------------------------------------------------- results.json


@needs_jsonschema
def test_results_of_a_run_validate_against_the_shipped_schema(tiny_run):
    from instanas.report.schema import results_schema, validate_results

    results = json.loads((tiny_run / "results.json").read_text())
    validate_results(results)
    assert results["instanas_version"] == instanas.__version__
    assert results["created_at"] >= results["evaluation_started_at"]
    if (REPO / ".git").exists():  # the tests run from a checkout: the commit is recorded
        assert len(results["code"]["commit"]) == 40
    for broken in (
        _without(results, "schema_version"),
        _with(results, "schema_version", 3),
        _with(results, "created_at", "yesterday"),
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_results(broken)
    wrong = copy.deepcopy(results)
    wrong["models"]["instanas"]["test_accuracy"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        validate_results(wrong)
    assert results_schema()["properties"]["schema_version"]["enum"] == [1, 2]


@needs_jsonschema
def test_checked_in_results_validate():
    """Every results.json under docs/runs written under the contract validates; the main job's,
    written before the contract existed, validates once its metadata fields are set aside
    (the schema describes the real 13-model file)."""
    from instanas.report.schema import results_schema

    files = sorted((REPO / "docs" / "runs").glob("*/results.json"))
    for path in files:
        results = json.loads(path.read_text())
        if "schema_version" in results:
            jsonschema.validate(results, results_schema(), cls=jsonschema.Draft202012Validator)
    main_job = REPO / "docs" / "runs" / "main-job" / "results.json"
    if main_job.exists():
        results = json.loads(main_job.read_text())
        schema = results_schema()
        schema["required"] = [k for k in schema["required"] if k in results]
        jsonschema.validate(results, schema, cls=jsonschema.Draft202012Validator)


def _without(data: dict, key: str) -> dict:
    return {k: v for k, v in data.items() if k != key}


def _with(data: dict, key: str, value: object) -> dict:
    return {**data, key: value}
