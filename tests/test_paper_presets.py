"""The paper presets end to end on CPU, one epoch per stage at reduced width, on generated data
in the formats they are published in: CIFAR-10 python batches and a Tiny ImageNet tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_data import make_cifar10

from instanas.data import load_dataset

# One epoch of every stage with small batches, a quarter of the width, only the main model.
SHORT = [
    "--space.width",
    "0.25",
    "--space.head_channels",
    "64",
    "--device",
    "cpu",
    "--controller.widths",
    "[4, 8]",
    "--pretrain.epochs",
    "1",
    "--search.epochs",
    "1",
    "--finetune.epochs",
    "1",
    "--baseline.epochs",
    "1",
    "--pretrain.batch_size",
    "16",
    "--search.batch_size",
    "16",
    "--finetune.batch_size",
    "16",
    "--baseline.batch_size",
    "16",
    "--baseline.widths",
    "[1.0]",
    "--baseline.min_net",
    "false",
    "--baseline.random_policy",
    "false",
    "--baseline.static_child",
    "false",
    "--baseline.oracle_children",
    "0",
    "--variants.count",
    "0",
    "--latency.repeats",
    "30",
    "--latency.warmup",
    "1",
    "--latency.eval_images",
    "4",
    "--latency.calibration_children",
    "2",
    "--search.min_pretrain_accuracy",
    "0",
    "--search.recalibrate_batches",
    "1",
    "--quiet",
]


def make_tiny_imagenet(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    """train/<wnid>/images/*.JPEG and val/images/ with val_annotations.txt, 64 px."""
    rng = np.random.default_rng(0)
    wnids = [f"n0{i}" for i in range(classes)]
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((64, 64, 3)) * 100 + 70 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    notes = []
    for i in range(2 * classes):
        pixels = (rng.random((64, 64, 3)) * 100 + 70 * (i % classes)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "val" / "images" / f"val_{i}.JPEG")
        notes.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    return root


def test_tiny_imagenet_layout_reads_as_shipped(tmp_path):
    bundle = load_dataset(
        "folder", make_tiny_imagenet(tmp_path / "tiny"), image_size=64, val_fraction=0.25
    )
    assert list(bundle.classes) == ["n00", "n01", "n02"]
    assert len(bundle.test) == 6 and len(bundle.train) + len(bundle.val) == 24
    assert sorted(bundle.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def _run(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "INSTANAS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "instanas", "run", "--output", str(run), *args, *SHORT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run / "results.json").read_text())


def test_paper_cifar_runs_end_to_end_on_cifar_batches(tmp_path):
    make_cifar10(tmp_path / "data", per_batch=8)
    results = _run(tmp_path, "--preset", "paper-cifar", "--data.root", str(tmp_path / "data"))
    assert results["preset"] == "paper-cifar" and len(results["classes"]) == 10
    assert {"instanas", "mbv2-path"} <= set(results["models"])


def test_paper_tiny_runs_end_to_end_on_a_tiny_imagenet_tree(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny")
    results = _run(tmp_path, "--preset", "paper-tiny", "--data.root", str(root))
    assert results["preset"] == "paper-tiny" and results["classes"] == ["n00", "n01", "n02"]
    assert results["test_images"] == 6
