"""Datasets as in-memory uint8 tensors (or streamed from disk), plus batched augmentation on
the training device.

containers: ImageSet, DataBundle, DataError. loading: load_dataset, which reads one of
fashion_mnist (IDX files), cifar (python pickles) or image_folders (class-per-folder trees)
and takes its limits and validation split from subsets. augmentation: normalisation and
BatchAugmenter. batching: iterate_batches, num_batches, shard. streaming: StreamingImageSet,
class-folder splits decoded per batch by DataLoader workers, and images_of, the uint8 rows of
either kind of split.
"""

from ..errors import DataError
from .augmentation import BatchAugmenter, augmenter_for, default_augmentation
from .batching import Batch, iterate_batches, num_batches, shard
from .cifar import _ArrayUnpickler as _ArrayUnpickler  # tests check what it refuses
from .containers import DataBundle, ImageSet
from .fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES
from .image_folders import DEFAULT_FOLDER_IMAGE_SIZE, IMAGE_EXTENSIONS
from .image_folders import _read_image as _read_image  # tests decode with it
from .loading import DATASETS, VAL_FRACTION_RANGE, load_configured, load_dataset
from .streaming import StreamingImageSet, images_of

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "DEFAULT_FOLDER_IMAGE_SIZE",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "VAL_FRACTION_RANGE",
    "Batch",
    "BatchAugmenter",
    "DataBundle",
    "DataError",
    "ImageSet",
    "StreamingImageSet",
    "augmenter_for",
    "default_augmentation",
    "images_of",
    "iterate_batches",
    "load_configured",
    "load_dataset",
    "num_batches",
    "shard",
]
