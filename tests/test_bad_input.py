"""Malformed input through the real command: one line naming the problem and the fix, exit code 2,
no traceback, and every file already in the run directory left exactly as it was."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from tiny_runs import make_folder_dataset, snapshot, tiny_config

from instanas.checkpoint import read_checkpoint, save_tensors
from instanas.cli import main

Case = Callable[[Path, Path, pytest.MonkeyPatch], tuple[list[str], tuple[str, ...]]]
CASES: dict[str, Case] = {}


def case(function: Case) -> Case:
    CASES[function.__name__] = function
    return function


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run directory whose pretrain stage is done (one epoch, in-process, about a second)."""
    base = tmp_path_factory.mktemp("pretrained")
    data = make_folder_dataset(base / "data")
    config = base / "tiny.yaml"
    config.write_text(tiny_config(data, epochs=1))
    run = base / "run"
    assert main(["pretrain", "--config", str(config), "--output", str(run), "--quiet"]) == 0
    return run


def _config_file(tmp: Path, text: str) -> str:
    path = tmp / "config.yaml"
    path.write_text(text)
    return str(path)


def _resume_with(run: Path, *options: str) -> list[str]:
    return ["run", "--resume", str(run), *options]


def _folder_run(run: Path, root: Path) -> list[str]:
    return _resume_with(run, "--data.root", str(root))


# --- configuration -----------------------------------------------------------------------------


@case
def unknown_option(run, tmp, mp):
    return _resume_with(run, "--pretrain.epocs", "3"), ("--pretrain.epocs", "--pretrain.epochs")


@case
def unknown_key_in_config_file(run, tmp, mp):
    path = _config_file(tmp, "pretrain: {epocs: 3}\n")
    return ["pretrain", "--config", path, "--output", str(tmp / "new")], (
        "pretrain.epocs",
        "did you mean 'pretrain.epochs'",
    )


@case
def config_file_is_a_list(run, tmp, mp):
    path = _config_file(tmp, "- 1\n- 2\n")
    return ["pretrain", "--config", path, "--output", str(tmp / "new")], ("not a mapping",)


@case
def config_file_yaml_syntax(run, tmp, mp):
    path = _config_file(tmp, "pretrain: {epochs: 3\nsearch: [\n")
    return ["pretrain", "--config", path, "--output", str(tmp / "new")], ("cannot read config",)


@case
def section_given_a_value(run, tmp, mp):
    path = _config_file(tmp, "pretrain: 3\n")
    return ["pretrain", "--config", path, "--output", str(tmp / "new")], ("pretrain is a section",)


@case
def word_for_a_number(run, tmp, mp):
    return _resume_with(run, "--pretrain.epochs", "three"), ("pretrain.epochs", "whole number")


@case
def fraction_for_a_whole_number(run, tmp, mp):
    return _resume_with(run, "--search.batch_size", "2.5"), ("search.batch_size", "whole number")


@case
def value_out_of_range(run, tmp, mp):
    return _resume_with(run, "--controller.alpha", "0.3"), ("controller.alpha", "greater than 0.5")


@case
def non_positive_epochs(run, tmp, mp):
    return _resume_with(run, "--finetune.epochs", "0"), ("finetune.epochs", "greater than 0")


@case
def misspelt_choice(run, tmp, mp):
    return _resume_with(run, "--data.dataset", "fashion_mnist"), ("did you mean 'fashion-mnist'",)


@case
def word_for_a_boolean(run, tmp, mp):
    return _resume_with(run, "--channels_last", "maybe"), ("channels_last", "true or false")


@case
def malformed_stage_table(run, tmp, mp):
    return _resume_with(run, "--space.stages", "[[16, 1]]"), (
        "space.stages",
        "[channels, cells, stride]",
    )


@case
def milestone_outside_training(run, tmp, mp):
    return _resume_with(run, "--pretrain.milestones", "[1.5]"), ("pretrain.milestones",)


@case
def drop_path_starting_at_the_end(run, tmp, mp):
    return _resume_with(run, "--pretrain.drop_path_start", "1.0"), (
        "pretrain.drop_path_start",
        "less than 1.0",
    )


@case
def unknown_pretrain_schedule(run, tmp, mp):
    return _resume_with(run, "--pretrain.schedule", "cosin"), ("pretrain.schedule", "cosine")


@case
def unknown_device(run, tmp, mp):
    return _resume_with(run, "--device", "gpu"), ("use cpu, cuda or cuda:N",)


@case
def malformed_device_index(run, tmp, mp):
    return _resume_with(run, "--device", "cuda:x"), ("use cpu, cuda or cuda:N",)


@case
def cuda_without_a_gpu(run, tmp, mp):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    return _resume_with(run, "--device", "cuda"), ("no CUDA GPU", "--device cpu")


# --- data --------------------------------------------------------------------------------------


@case
def missing_data_folder(run, tmp, mp):
    return _folder_run(run, tmp / "nowhere"), ("does not exist", "--data.root")


@case
def empty_data_folder(run, tmp, mp):
    (tmp / "empty").mkdir()
    return _folder_run(run, tmp / "empty"), ("no class folders",)


@case
def single_class_data_folder(run, tmp, mp):
    make_folder_dataset(tmp / "one", classes=1, per_class=4)
    return _folder_run(run, tmp / "one"), ("only one class folder", "at least 2")


@case
def class_folder_without_images(run, tmp, mp):
    make_folder_dataset(tmp / "data", classes=2, per_class=4)
    for image in (tmp / "data" / "class1").iterdir():
        image.unlink()
    return _folder_run(run, tmp / "data"), ("class1 has no images",)


@case
def unreadable_image(run, tmp, mp):
    make_folder_dataset(tmp / "data", classes=2, per_class=4)
    (tmp / "data" / "class0" / "000.png").write_bytes(b"\x89PNG not really")
    return _folder_run(run, tmp / "data"), ("cannot read image", "000.png", "replace or delete")


@case
def truncated_fashion_mnist_file(run, tmp, mp):
    root = tmp / "fashion"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (root / name).write_bytes(struct.pack(">IIII", 0x803, 10, 28, 28) + bytes(100))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(struct.pack(">II", 0x801, 10) + bytes(10))
    return _resume_with(run, "--data.dataset", "fashion-mnist", "--data.root", str(root)), (
        "truncated",
        "reinstall",
    )


@case
def latency_table_path_is_a_folder(run, tmp, mp):
    return ["profile", "--output", str(run), "--latency.table", str(tmp)], (
        "latency.table",
        "is a folder",
        "give a JSON file",
    )


# --- run directories ---------------------------------------------------------------------------


@case
def run_directory_under_a_file(run, tmp, mp):
    (tmp / "a-file").write_text("not a folder\n")
    path = _config_file(tmp, (run / "config.yaml").read_text())
    return ["pretrain", "--config", path, "--output", str(tmp / "a-file" / "run")], (
        "cannot write the run directory",
        "choose another --output",
    )


@case
def read_only_run_directory(run, tmp, mp):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    run.chmod(0o555)
    return ["search", "--output", str(run)], ("not writable",)


@case
def resume_of_a_folder_that_is_not_a_run(run, tmp, mp):
    (tmp / "empty").mkdir()
    return ["run", "--resume", str(tmp / "empty")], ("not a run directory",)


@case
def both_output_and_resume(run, tmp, mp):
    return ["run", "--resume", str(run), "--output", str(run)], ("either --output or --resume",)


@case
def new_run_into_an_existing_directory(run, tmp, mp):
    return ["run", "--output", str(run)], ("already exists", "--resume")


@case
def run_config_with_a_typo(run, tmp, mp):
    (run / "config.yaml").write_text("pretrain: {epocs: 1}\n")
    return ["run", "--resume", str(run)], ("pretrain.epocs",)


@case
def stage_already_done(run, tmp, mp):
    return ["pretrain", "--output", str(run)], ("already has pretrain output",)


@case
def stage_before_its_prerequisite(run, tmp, mp):
    return ["finetune", "--output", str(run)], ("no search output", "instanas search")


@case
def unfinished_stage_without_resume(run, tmp, mp):
    (run / "search" / "resume").mkdir(parents=True)
    shutil.copy(
        run / "pretrain" / "metagraph.safetensors",
        run / "search" / "resume" / "epoch_0001.safetensors",
    )
    return ["search", "--output", str(run)], ("unfinished search", "--resume")


@case
def disk_full_while_writing(run, tmp, mp):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr("instanas.pipeline.atomic_write_text", full)
    return ["search", "--output", str(run)], ("disk is full", "--resume")


# --- checkpoints -------------------------------------------------------------------------------


def _checkpoint(run: Path) -> Path:
    return run / "pretrain" / "metagraph.safetensors"


@case
def truncated_checkpoint(run, tmp, mp):
    data = _checkpoint(run).read_bytes()
    _checkpoint(run).write_bytes(data[: len(data) // 2])
    return ["search", "--output", str(run)], ("metagraph.safetensors", "corrupt or truncated")


class _Trap:
    """Unpickling this creates a file: proof that a checkpoint was (wrongly) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case
def pickle_posing_as_a_checkpoint(run, tmp, mp):
    _checkpoint(run).write_bytes(pickle.dumps({"weights": _Trap(tmp / "unpickled")}))
    return ["search", "--output", str(run)], ("is a pickle", "never loads them")


@case
def torch_save_archive_as_a_checkpoint(run, tmp, mp):
    torch.save({"weights": _Trap(tmp / "unpickled")}, _checkpoint(run))
    return ["search", "--output", str(run)], ("is a pickle", "never loads them")


@case
def checkpoint_with_a_foreign_header(run, tmp, mp):
    header = json.dumps({"__metadata__": {"instanas": "[1, 2]"}}).encode()
    _checkpoint(run).write_bytes(len(header).to_bytes(8, "little") + header)
    return ["search", "--output", str(run)], ("corrupt or truncated", "not a JSON object")


def _rewrite_meta(run: Path, change: Callable[[dict], None]) -> None:
    tensors, meta = read_checkpoint(_checkpoint(run))
    change(meta)
    save_tensors(_checkpoint(run), tensors, meta)


@case
def checkpoint_of_another_search_space(run, tmp, mp):
    _rewrite_meta(run, lambda meta: meta["space"].update(width=0.5, head_channels=32))
    return ["search", "--output", str(run)], (
        "does not match this run",
        "space.width: checkpoint 0.5, this run 0.25",
        "space.head_channels",
    )


@case
def checkpoint_of_another_preset(run, tmp, mp):
    _rewrite_meta(run, lambda meta: meta.update(preset="paper-cifar"))
    return ["search", "--output", str(run)], (
        'preset: checkpoint "paper-cifar", this run "custom"',
    )


@case
def not_enough_disk_space(run, tmp, mp):
    mp.setattr(
        "instanas.pipeline.shutil.disk_usage",
        lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 2**10, 2**10),
    )
    return ["search", "--output", str(run)], (
        "MiB free but search writes about",
        "free space or choose another --output",
    )


@case
def checkpoint_with_another_class_count(run, tmp, mp):
    _rewrite_meta(run, lambda meta: meta.update(classes=["a", "b", "c"]))
    return ["search", "--output", str(run)], ("classes: checkpoint has 3 entries, this run 2",)


@case
def unreadable_resume_states(run, tmp, mp):
    (run / "search" / "resume").mkdir(parents=True)
    for epoch in (1, 2):
        (run / "search" / "resume" / f"epoch_{epoch:04d}.safetensors").write_bytes(b"\0" * 9)
    return ["search", "--resume", str(run)], ("no readable checkpoint", "start search over")


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input(name, pretrained, tmp_path, monkeypatch, capsys, cache_dir):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    argv, words = CASES[name](run, tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("instanas: error: ") and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert snapshot(tmp_path) == before  # nothing changed, nothing added
    assert not (tmp_path / "unpickled").exists()


def test_at_least_twenty_distinct_inputs():
    assert len(CASES) >= 20


# --- failures during training and at inference -------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_epoch(pretrained, tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text((pretrained / "config.yaml").read_text())
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def diverging(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss  # epoch 1 has 3 steps

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    run = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--config",
            str(config),
            "--output",
            str(run),
            "--quiet",
            "--pretrain.epochs",
            "3",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("instanas: error: pretrain: the loss became nan")
    assert "--pretrain.lr" in err[-1] and "--resume" in err[-1]
    assert not (run / "pretrain" / "metagraph.safetensors").exists()
    _, meta = read_checkpoint(run / "pretrain" / "resume" / "epoch_0001.safetensors")
    assert meta["epoch"] == 1


def test_disk_full_during_training_keeps_the_last_saved_epoch(
    pretrained, tmp_path, monkeypatch, capsys
):
    import instanas.stages.resume as resume

    config = tmp_path / "tiny.yaml"
    config.write_text((pretrained / "config.yaml").read_text())
    real, calls = resume.save_tensors, {"n": 0}

    def fills_up(path, *args):
        calls["n"] += 1
        if calls["n"] == 2:  # the disk fills up while epoch 2 is being saved
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, *args)

    monkeypatch.setattr(resume, "save_tensors", fills_up)
    run = tmp_path / "run"
    argv = [
        "pretrain",
        "--config",
        str(config),
        "--output",
        str(run),
        "--quiet",
        "--pretrain.epochs",
        "3",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("instanas: error: the disk is full") and "--resume" in err
    states = sorted(p.name for p in (run / "pretrain" / "resume").iterdir())
    assert states == ["epoch_0001.safetensors"]  # whole, and no temp file left behind
    monkeypatch.setattr(resume, "save_tensors", real)
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    assert (run / "pretrain" / "metagraph.safetensors").exists()


def test_latency_table_of_another_torch_is_profiled_again(pretrained, tmp_path, cache_dir, caplog):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    assert main(["profile", "--output", str(run), "--quiet"]) == 0
    table = json.loads((run / "latency_table.json").read_text())
    table["key"]["torch"] = "1.0.0"
    (run / "latency_table.json").write_text(json.dumps(table))
    assert main(["profile", "--output", str(run), "--quiet"]) == 0
    assert "another setup (torch differ); profiling again" in caplog.text
    again = json.loads((run / "latency_table.json").read_text())
    assert again["key"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "images, words",
    [
        (torch.zeros(2, 3, 12, 12), "expected [N, 1, 12, 12]"),
        (torch.zeros(2, 1, 16, 16), "expected [N, 1, 12, 12]"),
        (torch.zeros(2, 1, 1, 12, 12), "expected [N, 1, 12, 12]"),
        (torch.zeros(2, 1, 12, 12, dtype=torch.int64), "pass uint8"),
        (torch.zeros(2, 1, 12, 12, dtype=torch.bool), "pass uint8"),
        (torch.full((1, 1, 12, 12), float("nan")), "NaN"),
        (torch.full((1, 1, 12, 12), float("inf")), "NaN or infinite"),
        (torch.full((1, 1, 12, 12), 255.0), "divide 0..255 values by 255"),
    ],
)
def test_inference_rejects_bad_images(tiny_space, images, words):
    from instanas.deploy.inference import InstaNASModel
    from instanas.models.controller import Controller, ControllerSpec
    from instanas.models.metagraph import MetaGraph
    from instanas.models.predictor import InstaNASPredictor

    graph = MetaGraph(tiny_space).eval()
    ctrl = Controller(1, 17, 5, ControllerSpec(12, (4, 8, 8))).eval()
    model = InstaNASModel(InstaNASPredictor(graph, ctrl), ["a", "b", "c", "d"], (0.5,), (0.25,))
    with pytest.raises(ValueError) as info:
        model.predict(images)
    assert words in str(info.value) and len(str(info.value).splitlines()) == 1
