"""Class-folder trees streamed from disk (data.streaming): the same rows, order and labels as
the in-memory path, per-rank shards of each global batch, transforms that do not depend on the
worker count, the automatic choice, and short pretrain runs that stream."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import make_folder_dataset, tiny_config

from instanas.cli import main
from instanas.config import Config, ConfigError, set_value
from instanas.data import (
    DataError,
    ImageSet,
    StreamingImageSet,
    images_of,
    iterate_batches,
    load_dataset,
    loading,
)

BATCH = {"device": "cpu", "drop_last": False, "shard": None}


def write_image(path: Path, rng: np.random.Generator, shape=(30, 40)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(path)


def make_tiny_imagenet(root: Path, classes: int = 3, train: int = 6, val: int = 2) -> Path:
    """Tiny ImageNet's layout: train/<wnid>/images/*.JPEG, val/images/ + val_annotations.txt."""
    rng = np.random.default_rng(1)
    notes = []
    for c in range(classes):
        wnid = f"n0{c:07d}"
        for i in range(train):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng)
        for i in range(val):
            name = f"val_{c * val + i}.JPEG"
            write_image(root / "val" / "images" / name, rng)
            notes.append(f"{name}\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    return root


def make_split_tree(root: Path, classes: int = 3, train: int = 6, val: int = 2) -> Path:
    """ImageNet's layout: train/<class>/*.JPEG and val/<class>/*.JPEG, 40x30 px images."""
    rng = np.random.default_rng(2)
    for c in range(classes):
        for split, count in (("train", train), ("val", val)):
            for i in range(count):
                write_image(root / split / f"n0{c:07d}" / f"{i}.JPEG", rng)
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("streaming")
    return {
        "folder": make_folder_dataset(base / "folder", classes=3, per_class=12, size=10),
        "tiny-imagenet": make_tiny_imagenet(base / "tiny"),
        "imagenet": make_split_tree(base / "imagenet"),
    }


def stream(data: StreamingImageSet, batch_size: int, seed: int | None = None, **kw) -> list:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    options = {**BATCH, "shuffle": seed is not None, "train": seed is not None, **kw}
    return list(data.stream_batches(batch_size, generator=gen, **options))


@pytest.mark.parametrize("layout", ["folder", "tiny-imagenet", "imagenet"])
def test_same_rows_order_and_labels_as_in_memory(trees, layout) -> None:
    memory = load_dataset("folder", trees[layout], image_size=8, stream=False)
    streamed = load_dataset("folder", trees[layout], image_size=8, stream=True, workers=0)
    assert isinstance(streamed.train, StreamingImageSet) and isinstance(memory.train, ImageSet)
    assert streamed.classes == memory.classes and streamed.num_classes >= 3
    assert (streamed.channels, streamed.image_size) == (3, 8)
    for split in ("train", "val", "test"):
        mem, st = getattr(memory, split), getattr(streamed, split)
        assert torch.equal(mem.labels, st.labels)
        ours = stream(st, 5)
        theirs = list(iterate_batches(mem, 5, shuffle=False))
        assert [b.indices.tolist() for b in ours] == [b.indices.tolist() for b in theirs]
        assert all(torch.equal(a.labels, b.labels) for a, b in zip(ours, theirs, strict=True))
    # A shuffled epoch draws the same permutation as iterate_batches from the same seed.
    mem_order = iterate_batches(
        memory.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    st_order = stream(streamed.train, 4, seed=0)
    assert [b.indices.tolist() for b in st_order] == [b.indices.tolist() for b in mem_order]
    # The sampled statistics are close to the exact ones.
    assert np.allclose(streamed.mean, memory.mean, atol=0.05)


def test_shards_split_each_trimmed_global_batch(trees) -> None:
    data = load_dataset("folder", trees["folder"], stream=True, workers=0).train
    whole = stream(data, 7, seed=3)
    ranks = [stream(data, 7, seed=3, shard=(rank, 2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for full, r0, r1 in zip(whole, *ranks, strict=True):
        a, b = r0.indices.tolist(), r1.indices.tolist()
        trimmed = full.indices[: len(full.indices) // 2 * 2].tolist()
        assert not set(a) & set(b) and a + b == trimmed
        assert torch.equal(r0.labels, data.labels[r0.indices])
        # Each rank's rows are transformed exactly as one process transforms them.
        assert torch.equal(torch.cat([r0.images, r1.images]), full.images[: len(trimmed)])


def test_training_images_do_not_depend_on_the_worker_count(trees) -> None:
    tree = trees["tiny-imagenet"]
    data = load_dataset("folder", tree, image_size=16, stream=True, workers=0).train
    runs = [stream(data, 6, seed=5), stream(replace(data, workers=2), 6, seed=5)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    # Another seed crops the same rows differently.
    first = {r: x for b in runs[0] for r, x in zip(b.indices.tolist(), b.images, strict=True)}
    other = {r: x for b in stream(data, 6, seed=6) for r, x in zip(b.indices.tolist(), b.images)}
    assert any(not torch.equal(first[r], other[r]) for r in first)
    shapes = {tuple(b.images.shape[1:]) for b in runs[0]}
    assert shapes == {(3, 16, 16)} and runs[0][0].images.dtype == torch.float32


def test_evaluation_transform_is_deterministic(trees) -> None:
    data = load_dataset("folder", trees["tiny-imagenet"], image_size=16, stream=True, workers=0)
    test = data.test
    first, second = stream(test, 4), stream(test, 4)
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, second, strict=True))
    rows = images_of(test)
    assert rows.dtype == torch.uint8 and rows.shape == (len(test), 3, 16, 16)
    mean = torch.tensor(test.mean).view(1, -1, 1, 1)
    std = torch.tensor(test.std).view(1, -1, 1, 1)
    expected = (rows.float() / 255 - mean) / std
    assert torch.allclose(torch.cat([b.images for b in first]), expected, atol=1e-4)
    assert torch.equal(images_of(test, torch.tensor([2, 0])), rows[[2, 0]])


def test_automatic_choice(trees, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="instanas.data.loading")
    small = load_dataset("folder", trees["folder"], stream=None)
    assert isinstance(small.train, ImageSet) and "decoding into memory" in caplog.text
    # A machine where a quarter of the memory cannot hold the decoded training split streams.
    monkeypatch.setattr(loading, "physical_memory", lambda: 1000)
    big = load_dataset("folder", trees["folder"], stream=None, workers=0)
    assert isinstance(big.train, StreamingImageSet) and "streaming images" in caplog.text


def test_stream_needs_a_folder_data_set(tmp_path, capsys) -> None:
    with pytest.raises(DataError, match="data.stream"):
        load_dataset("cifar10", tmp_path, stream=True)
    config = Config()
    set_value(config, "data.stream", "true")
    assert config.data.stream is True
    with pytest.raises(ConfigError):
        set_value(config, "data.stream", "sometimes")
    argv = ["pretrain", "--data.stream", "true", "--output", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data.dataset folder" in err


def test_pretrain_streams_a_tiny_tree(tmp_path, cache_dir) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(make_folder_dataset(tmp_path / "data"), epochs=1))
    run = tmp_path / "run"
    argv = ["pretrain", "--config", str(config), "--output", str(run), "--quiet"]
    assert main([*argv, "--data.stream", "true", "--data.workers", "2"]) == 0
    assert (run / "pretrain" / "metagraph.safetensors").is_file()
    assert "stream: true" in (run / "config.yaml").read_text()


def test_paper_imagenet_preset_streams(trees, tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    argv = ["pretrain", "--preset", "paper-imagenet", "--device", "cpu", "--output", str(run)]
    small = ["--data.image_size", "32", "--space.width", "0.25", "--pretrain.epochs", "1"]
    small += ["--pretrain.batch_size", "8", "--data.workers", "0", "--quiet"]
    tree = ["--data.root", str(trees["imagenet"]), "--data.stream", "true"]
    assert main([*argv, *tree, *small]) == 0
    assert (run / "pretrain" / "metagraph.safetensors").is_file()


def test_gallery_reads_rows_of_a_streamed_test_split(trees) -> None:
    from types import SimpleNamespace

    from instanas.evaluation.results import galleries

    data = load_dataset("folder", trees["imagenet"], image_size=8, stream=True, workers=0)
    n = len(data.test)
    out = galleries(SimpleNamespace(data=data), torch.arange(n).float(), torch.zeros(n), 3)
    index, images = out["gallery_index"], out["gallery_images"]
    assert images.shape == (*index.shape, 3, 8, 8) and images.dtype == np.uint8
    filled = index >= 0
    assert np.array_equal(images[filled], images_of(data.test, torch.from_numpy(index[filled])))
    assert not images[~filled].any()
