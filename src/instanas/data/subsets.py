"""Seeded choices of rows: limits to a random subset, and the validation split.

Every choice is a sorted list of row indices drawn from a torch.Generator, so a seed always
picks the same rows and the kept rows stay in their source order. The splits may be ImageSets
or streaming.StreamingImageSets: only len() and subset() are used.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .containers import ImageSet

# Test rows (folder hold-out, limit_test subsets) use a fixed seed rather than `seed`, so
# runs that vary `seed` are still scored on the same test images.
TEST_SEED = 20190104


def pick_rows(n: int, limit: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted seeded random `limit` of range(n), or None when nothing is dropped."""
    if limit is None or limit >= n:
        return None
    # Sorting keeps the source order (e.g. folder rows grouped by class) stable.
    return torch.randperm(n, generator=generator)[:limit].sort().values


def limit_rows(data: ImageSet, limit: int | None, generator: torch.Generator) -> ImageSet:
    """A seeded random `limit` of the rows (all of them when limit is None or not below)."""
    idx = pick_rows(len(data), limit, generator)
    return data if idx is None else data.subset(idx)


def split_validation(
    data: ImageSet, val_fraction: float, generator: torch.Generator, name: str
) -> tuple[ImageSet, ImageSet]:
    """(train, val): a seeded `val_fraction` of the rows (at least one, not all) held out."""
    n = len(data)
    if n < 2:
        raise DataError(
            f"{name} has {n} training rows, need at least 2: add data or raise limit_train"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return data.subset(perm[n_val:].sort().values), data.subset(perm[:n_val].sort().values)
