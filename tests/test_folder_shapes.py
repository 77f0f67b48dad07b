"""A class-folder tree is trained at its own shape: gray images stay one channel, the side is the
most common one of a sample of image headers, and data.channels / data.image_size override
both (issue 27, point 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFile
from test_data import make_fashion
from tiny_runs import make_folder_dataset, tiny_config

from instanas.config import apply_overrides, from_dict, load_preset, to_yaml
from instanas.data import (
    DataError,
    ImageSet,
    StreamingImageSet,
    image_folders,
    load_configured,
    load_dataset,
)
from instanas.data.image_folders import _read_image, infer_shape, list_folder
from instanas.data.streaming import eval_transform
from instanas.deploy.source import run_data
from instanas.errors import ConfigError
from instanas.pipeline import open_run
from instanas.runtime import read_image


@pytest.fixture(scope="module")
def gray_tree(tmp_path_factory) -> Path:
    """Two classes of 28 px gray PNGs, as scripts/fashion_folder_tree.py writes Fashion-MNIST."""
    return make_folder_dataset(tmp_path_factory.mktemp("gray"), per_class=6, size=28, mode="L")


def write(path: Path, mode: str, size: tuple[int, int], fill: int | tuple = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, fill).save(path)
    return path


def test_a_gray_tree_is_one_channel_at_its_own_side(gray_tree, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="instanas"):
        data = load_dataset("folder", gray_tree, val_fraction=0.25)
    assert (data.channels, data.image_size) == (1, 28)
    assert isinstance(data.train, ImageSet) and data.train.images.shape[1:] == (1, 28, 28)
    assert data.test.images.shape[1:] == (1, 28, 28)
    assert len(data.mean) == len(data.std) == 1  # the statistics follow the channels
    assert (
        "folder data: 1 channel (every inspected image is grayscale), 28 px (the most common "
        "side of 10 inspected images); override with --data.channels / --data.image_size"
    ) in caplog.text


def test_a_colour_tree_of_mixed_sizes_takes_three_channels_and_the_most_common_side(
    tmp_path,
) -> None:
    # Shorter sides 20 five times, 48 three times with the gray one, per class; one image of
    # each class is held out for the test split.
    sizes = [(40, 20), (20, 20), (20, 64), (25, 20), (20, 30), (48, 48), (48, 60)]
    for c in ("a", "b"):
        for i, size in enumerate(sizes):
            write(tmp_path / c / f"{i}.png", "RGB", size, (200, 10, 10))
        write(tmp_path / c / "gray.png", "L", (48, 48))  # one gray image does not make it gray
    data = load_dataset("folder", tmp_path, val_fraction=0.25)
    assert (data.channels, data.image_size) == (3, 20)
    assert data.train.images.shape[1:] == (3, 20, 20) and len(data.mean) == 3


def test_a_tie_goes_to_the_larger_side_and_gray_palettes_count_as_gray(tmp_path) -> None:
    gray_palette = Image.new("L", (16, 16), 40).convert("P")
    colour_palette = Image.new("RGB", (16, 16), (200, 10, 10)).convert("P")
    for c in ("a", "b"):
        write(tmp_path / c / "small.png", "LA", (12, 30), (50, 255))
        write(tmp_path / c / "wide.png", "I;16", (40, 16), 500)
        gray_palette.save(tmp_path / c / "palette.png")
    rows = list_folder(tmp_path)[1] + list_folder(tmp_path)[2]
    assert (infer_shape(rows).channels, infer_shape(rows).size) == (1, 16)  # 16 x4, 12 x2
    colour_palette.save(tmp_path / "a" / "colour.png")
    rows.append((tmp_path / "a" / "colour.png", 0))
    assert infer_shape(rows).channels == 3


def test_only_headers_of_a_bounded_sample_spread_over_classes_are_read(
    gray_tree, monkeypatch
) -> None:
    def no_decoding(self):
        raise AssertionError("infer_shape decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    rows = list_folder(gray_tree)[1]
    assert (infer_shape(rows).channels, infer_shape(rows).size) == (1, 28)
    many = [(Path(f"c{label}/{i}.png"), label) for label in range(3) for i in range(400)]
    sample = image_folders._shape_sample(many)
    assert len(sample) == image_folders.SHAPE_SAMPLE
    counts = [sum(p.parent.name == f"c{label}" for p in sample) for label in range(3)]
    assert max(counts) - min(counts) <= 1
    assert sample == image_folders._shape_sample(many)  # fixed seed: the same every time


def test_no_readable_header_falls_back_to_colour_at_the_default_side(tmp_path) -> None:
    rows = [(write(tmp_path / "x.png", "L", (8, 8)).with_name("gone.png"), 0)]
    shape = infer_shape(rows)
    assert (shape.channels, shape.size) == (3, image_folders.DEFAULT_FOLDER_IMAGE_SIZE)
    assert "no image header could be read" in shape.describe()


def test_the_options_override_what_is_inferred(gray_tree, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="instanas"):
        both = load_dataset("folder", gray_tree, channels=3, image_size=16)
    assert both.train.images.shape[1:] == (3, 16, 16) and len(both.mean) == 3
    assert "folder data: 3 channels (data.channels), 16 px (data.image_size)\n" in caplog.text
    size_only = load_dataset("folder", gray_tree, image_size=16)
    assert (size_only.channels, size_only.image_size) == (1, 16)
    channels_only = load_dataset("folder", gray_tree, channels=3)
    assert (channels_only.channels, channels_only.image_size) == (3, 28)
    # The RGB decode of a gray tree repeats the gray decode's pixels three times.
    gray, rgb = load_dataset("folder", gray_tree).train.images, channels_only.train.images
    assert torch.equal(rgb, gray.expand_as(rgb))


def test_a_bad_channels_value_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_overrides(load_preset("fashion-cpu"), {"data.channels": "2"})
    message = str(excinfo.value)
    assert "\n" not in message and "data.channels" in message and "1, 3" in message
    with pytest.raises(DataError, match="1 .gray. or 3"):
        load_dataset("folder", tmp_path, channels=2)


def test_other_data_sets_keep_their_own_channels(tmp_path, caplog) -> None:
    plain = load_dataset("fashion-mnist", make_fashion(tmp_path))
    with caplog.at_level(logging.WARNING, logger="instanas"):
        data = load_dataset("fashion-mnist", tmp_path, channels=3)
    assert torch.equal(data.train.images, plain.train.images) and data.channels == 1
    assert "data.channels 3 ignored: fashion-mnist images have 1" in caplog.text


def test_streaming_agrees_with_memory_on_a_gray_tree(gray_tree) -> None:
    memory = load_dataset("folder", gray_tree, stream=False)
    streamed = load_dataset("folder", gray_tree, stream=True, workers=0)
    assert isinstance(streamed.train, StreamingImageSet)
    assert (streamed.channels, streamed.image_size) == (memory.channels, memory.image_size)
    assert len(streamed.mean) == len(streamed.std) == 1
    assert np.allclose(streamed.mean, memory.mean, atol=0.05)
    rows = streamed.test.rows(range(len(streamed.test)))
    assert rows.shape == memory.test.images.shape
    first = Path(streamed.test.files[0].decode())
    with Image.open(first) as image:
        assert np.array_equal(rows[0, 0].numpy(), eval_transform(image.convert("L"), 28))
    batch = next(iter(streamed.train.stream_batches(4, shuffle=False, generator=None,
                                                    train=False, device="cpu", drop_last=False,
                                                    shard=None)))  # fmt: skip
    assert batch.images.shape == (4, 1, 28, 28)


def test_deployment_preprocesses_as_training_decodes(tmp_path) -> None:
    files = {
        "gray": write(tmp_path / "gray.png", "L", (40, 30), 77),
        "alpha": write(tmp_path / "alpha.png", "LA", (30, 44), (120, 30)),
        "16bit": write(tmp_path / "deep.png", "I;16", (28, 28), 200),
        "colour": write(tmp_path / "colour.png", "RGB", (50, 36), (200, 30, 90)),
    }
    Image.new("L", (33, 29), 150).convert("P").save(tmp_path / "palette.png")
    files["palette"] = tmp_path / "palette.png"
    for key, path in files.items():
        expected = _read_image(path, 28, channels=1).transpose(2, 0, 1)
        assert expected.shape == (1, 28, 28)
        assert np.array_equal(read_image(path, 1, 28), expected), key


def test_a_run_records_the_inferred_shape_and_builds_its_model_with_it(gray_tree, tmp_path):
    config = from_dict(yaml.safe_load(tiny_config(gray_tree, epochs=1)))
    config.data.image_size = None
    ctx = open_run(config, tmp_path / "run")
    assert (ctx.space.input_channels, ctx.space.input_size) == (1, 28)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["channels"], saved["image_size"]) == (1, 28)
    # A stage command or an export reads config.yaml and decodes the tree alike.
    again = load_configured(
        from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    )
    assert again.train.images.shape[1:] == (1, 28, 28)


def test_an_export_reads_an_older_run_at_its_model_shape(gray_tree, tmp_path) -> None:
    """A folder run made before config.yaml recorded the inferred shape (3 x 32 then)."""
    config = from_dict(yaml.safe_load(tiny_config(gray_tree, epochs=1)))
    config.data.image_size = None
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    _, data = run_data(tmp_path, config.search_space(3, 32, 2))
    assert data.train.images.shape[1:] == (3, 32, 32)
