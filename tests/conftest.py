import os

import pytest
import torch

os.environ.setdefault("INSTANAS_NO_PROGRESS", "1")

from instanas.space import CellGroup, SearchSpace  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_space() -> SearchSpace:
    """17 cells x 5 modules like the paper, but narrow and small so tests run in milliseconds."""
    return SearchSpace(
        input_channels=1,
        input_size=12,
        num_classes=4,
        width=0.25,
        stem_channels=16,
        stem_stride=1,
        stages=(
            CellGroup(16, 1, 1),
            CellGroup(24, 2, 2),
            CellGroup(32, 3, 2),
            CellGroup(64, 4, 1),
            CellGroup(96, 3, 1),
            CellGroup(160, 3, 1),
            CellGroup(320, 1, 1),
        ),
        head_channels=32,
    )


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
