"""A few-second instanas run: a generated class-per-folder data set and a matching config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def make_folder_dataset(root: Path, classes: int = 2, per_class: int = 40, size: int = 8) -> Path:
    """PNG images whose brightness depends on the class, so the classes are learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 120 + 100 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_config(data_root: Path, epochs: int = 3, **overrides: str) -> str:
    """YAML for a 4-cell space on 8x8 images: one epoch takes a fraction of a second."""
    sections = {
        "data": f"{{dataset: folder, root: '{data_root}', image_size: 8, val_fraction: 0.25}}",
        "space": "{width: 0.25, stem_channels: 8, stages: [[8, 1, 1], [8, 2, 2], [16, 1, 2]], "
                 "head_channels: 16}",
        "controller": "{input_size: 8, widths: [4, 8]}",
        "pretrain": f"{{epochs: {epochs}, batch_size: 16}}",
        "search": f"{{epochs: {epochs}, batch_size: 16, recalibrate_batches: 2}}",
        "finetune": f"{{epochs: {epochs}, batch_size: 16}}",
        "baseline": f"{{epochs: {epochs}, batch_size: 16}}",
        "latency": "{repeats: 30, warmup: 0, eval_images: 4}",
    }
    sections.update(overrides)
    lines = ["seed: 0", "device: cpu"] + [f"{k}: {v}" for k, v in sections.items()]
    return "\n".join(lines) + "\n"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
