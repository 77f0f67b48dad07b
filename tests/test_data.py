"""Tests for instanas.data: loaders on tiny files in the real on-disk formats, augmentation,
batching."""

from __future__ import annotations

import gzip
import pickle
import struct
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instanas.data import (
    DATASETS,
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    Batch,
    BatchAugmenter,
    DataBundle,
    DataError,
    ImageSet,
    augmenter_for,
    iterate_batches,
    load_dataset,
    num_batches,
    shard,
)

# --------------------------------------------------------------------------- helpers


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def id_images(n: int, size: int = 28, channels: int = 1) -> np.ndarray:
    """Images whose pixel [0, 0, 0] is their row id and whose content is asymmetric."""
    base = np.arange(channels * size * size).reshape(channels, size, size)
    images = (base[None] * 7 + np.arange(n)[:, None, None, None] * 3) % 256
    images[:, 0, 0, 0] = np.arange(n)
    return images.astype(np.uint8)


def make_fashion(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """Train files gzipped, test files plain: both encodings are accepted."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, ext in (("train", n_train, ".gz"), ("t10k", n_test, "")):
        images = id_images(n)[:, 0]
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, 0x803)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10, 0x801)
    return root


def row_ids(data: ImageSet) -> list[int]:
    return data.images[:, 0, 0, 0].tolist()


CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def cifar_batch(n: int, labels_key: str, offset: int, num_classes: int, as_bytes: bool) -> dict:
    data = id_images(n, 32, 3).reshape(n, -1)
    data[:, 0] = (np.arange(n) + offset) % 256  # row id survives as pixel [0, 0, 0]
    batch = {
        "batch_label": "training batch",
        labels_key: [int(i) for i in (np.arange(n) + offset) % num_classes],
        "data": data,
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    return {k.encode(): v for k, v in batch.items()} if as_bytes else batch


def dump(path: Path, obj: object) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def make_cifar10(parent: Path, as_bytes: bool = True, per_batch: int = 6) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", cifar_batch(per_batch, "labels", 10 * i, 10, as_bytes))
    dump(folder / "test_batch", cifar_batch(5, "labels", 0, 10, as_bytes))
    names = [n.encode() for n in CIFAR10_NAMES] if as_bytes else CIFAR10_NAMES
    meta = {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
    dump(folder / "batches.meta", {k.encode(): v for k, v in meta.items()} if as_bytes else meta)
    return folder


def make_cifar100(parent: Path) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", 30), ("test", 7)):
        batch = cifar_batch(n, "fine_labels", 0, 100, as_bytes=True)
        batch[b"coarse_labels"] = [0] * n
        dump(folder / split, batch)
    fine = [f"class_{i:02d}".encode() for i in range(100)]
    coarse = [f"super_{i:02d}".encode() for i in range(20)]
    dump(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    return folder


COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cow": (0, 0, 255)}


def write_images(folder: Path, colour: tuple[int, int, int], count: int, ext: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(40, 30), (24, 24), (17, 50), (64, 48)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        Image.new("RGB", (w, h), colour).save(folder / f"img_{i:03d}{ext}")


def make_tree(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for cls, count in counts.items():
        write_images(root / cls, COLOURS[cls], count, ext)
    return root


def tiny_bundle(name: str, size: int = 8, channels: int = 3) -> DataBundle:
    data = ImageSet(torch.from_numpy(id_images(4, size, channels)), torch.arange(4))
    mean, std = (0.5,) * channels, (0.25,) * channels
    return DataBundle(name, ["a", "b", "c", "d"], data, data, data, mean, std)


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_reads_gz_and_plain_idx(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    bundle = load_dataset("fashion-mnist", str(root), val_fraction=0.25)
    assert bundle.name == "fashion-mnist"
    assert bundle.classes == list(FASHION_MNIST_CLASSES)
    assert (bundle.channels, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 12)
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        # Labels were written as row id % 10: the pairing must survive the split.
        assert torch.equal(split.labels, split.images[:, 0, 0, 0].long() % 10)
    ids = row_ids(bundle.train) + row_ids(bundle.val)
    assert sorted(ids) == list(range(40))  # disjoint and complete
    assert row_ids(bundle.test) == list(range(12))
    # The pixel payload is stored row-major after the header.
    expected = torch.from_numpy(id_images(12)[:, :, 1:, :])
    assert torch.equal(bundle.test.images[:, :, 1:, :], expected)


def test_fashion_mnist_mean_std_from_train_split(tmp_path: Path) -> None:
    bundle = load_dataset("fashion-mnist", make_fashion(tmp_path / "fm"))
    x = bundle.train.images.double() / 255
    assert bundle.mean == pytest.approx((x.mean().item(),), abs=1e-9)
    assert bundle.std == pytest.approx((x.std(unbiased=False).item(),), abs=1e-9)


def test_validation_split_is_seeded(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    first = load_dataset("fashion-mnist", root, seed=3, val_fraction=0.25)
    again = load_dataset("fashion-mnist", root, seed=3, val_fraction=0.25)
    other = load_dataset("fashion-mnist", root, seed=4, val_fraction=0.25)
    assert row_ids(first.val) == row_ids(again.val)
    assert torch.equal(first.train.images, again.train.images)
    assert row_ids(first.val) != row_ids(other.val)
    assert row_ids(first.test) == row_ids(other.test)  # test rows never depend on seed


def test_limits_and_resize(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    bundle = load_dataset("fashion-mnist", root, limit_train=20, limit_test=5, image_size=32)
    assert len(bundle.train) + len(bundle.val) == 20
    assert len(bundle.val) == 2
    assert len(bundle.test) == 5
    assert bundle.image_size == 32 and bundle.test.images.shape == (5, 1, 32, 32)
    again = load_dataset("fashion-mnist", root, limit_train=20, limit_test=5)
    assert sorted(row_ids(again.train) + row_ids(again.val)) == sorted(
        row_ids(bundle.train) + row_ids(bundle.val)
    )


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.6])
def test_bad_val_fraction(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("fashion-mnist", make_fashion(tmp_path / "fm"), val_fraction=fraction)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="fashion-mnist"):
        load_dataset("imagenet")
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "folder")


def test_fashion_mnist_bad_magic(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(12) % 10, 0x803)
    with pytest.raises(DataError, match="magic") as excinfo:
        load_dataset("fashion-mnist", root)
    assert "t10k-labels-idx1-ubyte" in one_line_error(excinfo)


def test_fashion_mnist_truncated_file(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", root)


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    message = one_line_error(excinfo)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message and "--data.root" in message


@pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed"
)
def test_real_fashion_mnist_loads_fast() -> None:
    start = time.perf_counter()
    bundle = load_dataset("fashion-mnist")
    elapsed = time.perf_counter() - start
    assert len(bundle.train) + len(bundle.val) == 60000
    assert len(bundle.val) == 6000 and len(bundle.test) == 10000
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10
    assert 0.2 < bundle.mean[0] < 0.4 and 0.25 < bundle.std[0] < 0.45
    assert elapsed < 10.0


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("as_bytes", [True, False])
def test_cifar10_python_batches(tmp_path: Path, as_bytes: bool) -> None:
    folder = make_cifar10(tmp_path, as_bytes=as_bytes)
    for root in (tmp_path, folder):  # the folder itself or its parent
        bundle = load_dataset("cifar10", root, val_fraction=0.2)
        assert bundle.classes == CIFAR10_NAMES
        assert (bundle.channels, bundle.image_size, bundle.num_classes) == (3, 32, 10)
        assert len(bundle.train) + len(bundle.val) == 30 and len(bundle.val) == 6
        assert len(bundle.test) == 5
        assert bundle.test.labels.tolist() == [0, 1, 2, 3, 4]
        assert len(bundle.mean) == len(bundle.std) == 3
    # Rows are 1024 red values, then green, then blue, each row-major.
    raw = cifar_batch(5, "labels", 0, 10, as_bytes=False)["data"]
    assert torch.equal(bundle.test.images, torch.from_numpy(raw.reshape(5, 3, 32, 32)))


def test_cifar100_python_files(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    bundle = load_dataset("cifar100", tmp_path, limit_test=4)
    assert bundle.num_classes == 100 and bundle.classes[7] == "class_07"
    assert len(bundle.train) + len(bundle.val) == 30 and len(bundle.test) == 4
    assert bundle.train.images.shape[1:] == (3, 32, 32)
    assert set(bundle.test.labels.tolist()) <= set(range(7))


def test_cifar_missing_batch_names_file(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", tmp_path)
    message = one_line_error(excinfo)
    assert "data_batch_3" in message and str(folder) in message
    assert "cifar-10-python.tar.gz" in message


def test_cifar_needs_root() -> None:
    with pytest.raises(DataError, match="--data.root"):
        load_dataset("cifar100")


def test_cifar_refuses_unexpected_pickle_globals(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    # An OrderedDict pickles as a call to collections.OrderedDict: not an array, so refused.
    dump(folder / "test_batch", OrderedDict(cifar_batch(5, "labels", 0, 10, as_bytes=True)))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", folder)


# --------------------------------------------------------------------------- image folders


def test_folder_train_test_layout(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"cow": 6, "ant": 5, "bee": 5})
    make_tree(tmp_path / "test", {"bee": 2, "cow": 3}, ext=".JPG")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    bundle = load_dataset("folder", tmp_path, image_size=16, val_fraction=0.25)
    assert bundle.name == "folder"
    assert bundle.classes == ["ant", "bee", "cow"]  # sorted folder names
    assert (bundle.channels, bundle.image_size, bundle.num_classes) == (3, 16, 3)
    assert len(bundle.train) + len(bundle.val) == 16 and len(bundle.val) == 4
    assert bundle.test.labels.tolist() == [1, 1, 2, 2, 2]  # indices into train classes
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.shape[1:] == (3, 16, 16)
        # Every image is one solid colour; its channel order must match its class (RGB).
        colours = torch.tensor([COLOURS[c] for c in bundle.classes], dtype=torch.float32)
        mean_rgb = split.images.float().mean(dim=(2, 3))
        assert torch.allclose(mean_rgb, colours[split.labels], atol=6)


def test_folder_val_subfolder_used_as_test(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"ant": 4, "bee": 4})
    make_tree(tmp_path / "val", {"ant": 1, "bee": 2})
    bundle = load_dataset("folder", tmp_path, val_fraction=0.5)
    # Inferred: shorter sides 30, 24, 17 and 48 twice each; a tie goes to the larger.
    assert (bundle.channels, bundle.image_size) == (3, 48)
    assert bundle.test.labels.tolist() == [0, 1, 1]


def test_folder_single_tree_holds_out_test(tmp_path: Path) -> None:
    make_tree(tmp_path, {"ant": 10, "bee": 20, "cow": 1})
    first = load_dataset("folder", tmp_path, image_size=8, seed=0)
    other = load_dataset("folder", tmp_path, image_size=8, seed=1)
    # 10% per class (at least one for classes with 2+ images), fixed whatever the seed.
    assert first.test.labels.tolist() == [0, 1, 1]
    assert torch.equal(first.test.images, other.test.images)
    assert len(first.train) + len(first.val) == 28


def test_folder_centre_crop_then_resize(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall
    img[:, :10] = (0, 255, 0)  # cropped away by the centre square (x in [10, 30))
    img[:, 10:30] = (200, 0, 0)
    img[:, 30:] = (0, 255, 0)
    (tmp_path / "ant").mkdir()
    (tmp_path / "bee").mkdir()
    Image.fromarray(img).save(tmp_path / "ant" / "wide.png")
    Image.fromarray(img).save(tmp_path / "ant" / "wide2.png")
    Image.new("L", (12, 12), 90).save(tmp_path / "bee" / "grey.bmp")
    Image.new("L", (9, 9), 90).save(tmp_path / "bee" / "grey2.bmp")
    bundle = load_dataset("folder", tmp_path, image_size=10, val_fraction=0.5)
    everything = torch.cat([bundle.train.images, bundle.val.images, bundle.test.images])
    labels = torch.cat([bundle.train.labels, bundle.val.labels, bundle.test.labels])
    assert torch.all(everything[labels == 0, 0] == 200)
    assert torch.all(everything[labels == 0, 1:] == 0)
    assert torch.all(everything[labels == 1] == 90)  # greyscale becomes 3 equal channels


def test_folder_limit_train(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"ant": 8, "bee": 8})
    make_tree(tmp_path / "test", {"ant": 3, "bee": 3})
    bundle = load_dataset("folder", tmp_path, image_size=8, limit_train=6, limit_test=2)
    assert len(bundle.train) + len(bundle.val) == 6 and len(bundle.test) == 2


def test_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data.root"):
        load_dataset("folder")


def test_folder_without_class_folders(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("folder", tmp_path)


def test_folder_empty_class(tmp_path: Path) -> None:
    make_tree(tmp_path, {"ant": 3})
    (tmp_path / "bee").mkdir()
    (tmp_path / "bee" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as excinfo:
        load_dataset("folder", tmp_path)
    assert "bee" in one_line_error(excinfo) and "no images" in str(excinfo.value)


def test_folder_single_class(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"ant": 3})
    make_tree(tmp_path / "test", {"ant": 1})
    with pytest.raises(DataError, match="at least 2"):
        load_dataset("folder", tmp_path)


def test_folder_corrupt_image(tmp_path: Path) -> None:
    make_tree(tmp_path, {"ant": 3, "bee": 3})
    (tmp_path / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError) as excinfo:
        load_dataset("folder", tmp_path)
    assert "broken.png" in one_line_error(excinfo)


def test_folder_test_classes_must_be_in_train(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"ant": 3, "bee": 3})
    make_tree(tmp_path / "test", {"ant": 1, "cow": 1})
    with pytest.raises(DataError, match="cow"):
        load_dataset("folder", tmp_path)


# --------------------------------------------------------------------------- augmentation

PLAIN = ((0.0,), (1.0,))  # mean/std that leave x/255 unchanged: easy to compare


def random_batch(n: int = 64, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding (distinct pixel values differ by 1/255)."""
    return torch.allclose(a, b, rtol=0, atol=1e-5)


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = image[y + dy, x + dx], zero outside: what a padded crop produces."""
    h, w = image.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(image, (p, p, p, p))
    return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]


def test_eval_mode_only_normalises() -> None:
    images = random_batch(channels=3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    aug = BatchAugmenter(mean, std, crop_padding=4, flip=True, cutout=4)
    out = aug(images, torch.Generator().manual_seed(0), train=False)
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(BatchAugmenter(mean, std)(images), expected, atol=1e-5)


def test_flip_mirrors_some_images_and_is_seeded() -> None:
    images = random_batch()
    aug = BatchAugmenter(*PLAIN, flip=True)
    out = aug(images, torch.Generator().manual_seed(1))
    plain, mirrored = images.float() / 255, images.flip(3).float() / 255
    is_plain = torch.tensor([same(o, p) for o, p in zip(out, plain, strict=True)])
    is_mirrored = torch.tensor([same(o, m) for o, m in zip(out, mirrored, strict=True)])
    assert torch.all(is_plain | is_mirrored)
    assert is_plain.any() and is_mirrored.any()
    assert torch.equal(out, aug(images, torch.Generator().manual_seed(1)))


def test_crop_shifts_content_with_zero_padding() -> None:
    images = random_batch(n=32)
    out = BatchAugmenter(*PLAIN, crop_padding=2)(images, torch.Generator().manual_seed(2))
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if same(out[i], shifted(images[i], dy, dx).float() / 255)
        ]
        assert matches, f"image {i} is not a padded crop of its input"
        offsets.add(matches[0])
    assert len(offsets) > 3  # offsets really vary across the batch


def test_crop_and_flip_together() -> None:
    images = random_batch(n=32, size=6)
    out = BatchAugmenter(*PLAIN, crop_padding=1, flip=True)(
        images, torch.Generator().manual_seed(3)
    )
    for i in range(len(images)):
        candidates = [
            shifted(src, dy, dx).float() / 255
            for src in (images[i], images[i].flip(2))
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert any(same(out[i], c) for c in candidates)


def test_cutout_zeroes_a_clipped_square() -> None:
    images = torch.full((64, 2, 12, 12), 255, dtype=torch.uint8)
    aug = BatchAugmenter((0.0, 0.0), (1.0, 1.0), cutout=4)
    out = aug(images, torch.Generator().manual_seed(4))
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1])  # same patch in every channel
    assert torch.allclose(out[~zero], torch.ones(()), atol=1e-6)
    sides = set()
    for mask in zero[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 2 <= len(rows) <= 4 and 2 <= len(cols) <= 4  # clipped at the borders
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert int(mask.sum()) == len(rows) * len(cols)  # one solid rectangle
        sides.add((len(rows), len(cols)))
    assert (4, 4) in sides


def test_cutout_value_is_zero_after_normalisation() -> None:
    images = torch.full((16, 1, 8, 8), 128, dtype=torch.uint8)
    out = BatchAugmenter((0.3,), (0.2,), cutout=3)(images, torch.Generator().manual_seed(5))
    normalised = (128 / 255 - 0.3) / 0.2
    assert torch.unique(out).tolist() == pytest.approx([0.0, normalised], abs=1e-5)


def test_augmenter_rejects_bad_input() -> None:
    aug = BatchAugmenter((0.5,), (0.5,))
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 4, 4))  # float, not uint8
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # wrong channel count
    with pytest.raises(ValueError):
        BatchAugmenter((0.5,), (0.0,))


def test_augmenter_for_defaults() -> None:
    fm = augmenter_for(tiny_bundle("fashion-mnist", 28, 1), train=True)
    assert (fm.crop_padding, fm.flip, fm.cutout) == (2, True, 0)
    c10 = augmenter_for(tiny_bundle("cifar10", 32), train=True)
    assert (c10.crop_padding, c10.flip, c10.cutout) == (4, True, 16)
    c100 = augmenter_for(tiny_bundle("cifar100", 32), train=True)
    assert (c100.crop_padding, c100.flip, c100.cutout) == (4, True, 8)
    folder = augmenter_for(tiny_bundle("folder", 64), train=True)
    assert (folder.crop_padding, folder.flip, folder.cutout) == (8, True, 0)
    evaluation = augmenter_for(tiny_bundle("cifar10", 32), train=False)
    assert not evaluation.augments and evaluation.mean == (0.5, 0.5, 0.5)


def test_augmentation_options_override_the_data_set_defaults() -> None:
    folder = augmenter_for(
        tiny_bundle("folder", 64), train=True, flip=False, crop_padding=0, cutout=4
    )
    assert (folder.crop_padding, folder.flip, folder.cutout) == (0, False, 4)
    unflipped = augmenter_for(tiny_bundle("folder", 64), train=True, flip=False, crop_padding=0)
    images = torch.from_numpy(id_images(16, 64, 3))
    generator = torch.Generator().manual_seed(0)
    identity = augmenter_for(tiny_bundle("folder", 64), train=False)
    assert torch.equal(unflipped(images, generator=generator), identity(images))


# --------------------------------------------------------------------------- batching


def small_set(n: int = 23) -> ImageSet:
    return ImageSet(torch.from_numpy(id_images(n, 6, 1)), torch.arange(n) % 4)


def test_shuffled_epoch_covers_every_row_once() -> None:
    data = small_set()
    batches = list(
        iterate_batches(data, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    )
    assert [len(b.labels) for b in batches] == [5, 5, 5, 5, 3]
    assert len(batches) == num_batches(len(data), 5, drop_last=False)
    order = torch.cat([b.indices for b in batches])
    assert sorted(order.tolist()) == list(range(len(data)))
    assert order.tolist() != list(range(len(data)))
    for batch in batches:
        assert isinstance(batch, Batch) and batch.indices.dtype == torch.int64
        assert torch.equal(batch.labels, data.labels[batch.indices])
        # augment=None: float in [0, 1], not normalised.
        assert torch.equal(batch.images, data.images[batch.indices].float() / 255)


def test_drop_last_and_sequential_order() -> None:
    data = small_set()
    batches = list(iterate_batches(data, 5, shuffle=False, drop_last=True))
    assert len(batches) == num_batches(23, 5, drop_last=True) == 4
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(20))


def test_augmented_batches_keep_labels() -> None:
    data = small_set(40)
    aug = BatchAugmenter((0.5,), (0.25,), crop_padding=1, flip=True, cutout=2)
    g = torch.Generator().manual_seed(7)
    for batch in iterate_batches(data, 16, shuffle=True, generator=g, augment=aug):
        assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (1, 6, 6)
        assert torch.equal(batch.labels, data.labels[batch.indices])


def test_data_already_on_device_is_sliced_there() -> None:
    data = small_set().to("cpu")
    batch = next(iterate_batches(data, 4, shuffle=True, device=torch.device("cpu")))
    assert batch.images.device.type == "cpu" and batch.indices.device.type == "cpu"


def test_num_batches_and_shard() -> None:
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(10, 3, drop_last=True) == 3
    assert num_batches(0, 3, drop_last=False) == 0
    with pytest.raises(ValueError):
        num_batches(10, 0, drop_last=False)
    data = small_set(11)
    parts = [shard(data, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    ids = [i for p in parts for i in row_ids(p)]
    assert len(set(ids)) == 9
    with pytest.raises(ValueError):
        shard(data, 3, 3)


def test_imageset_validates() -> None:
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    data = ImageSet(
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([1, 0], dtype=torch.int32)
    )
    assert data.labels.dtype == torch.int64 and len(data) == 2
