"""A few-second instanas run: a generated class-per-folder data set and a matching config."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_folder_dataset(
    root: Path, classes: int = 2, per_class: int = 40, size: int = 8, mode: str = "RGB"
) -> Path:
    """PNG images whose brightness depends on the class, so the classes are learnable; ``mode``
    "L" writes gray ones."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random(shape) * 120 + 100 * c).astype(np.uint8)
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
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# Only the stages the main model needs: a few seconds on 2 cores.
MAIN_MODEL_ONLY = {
    "variants": "{count: 0}",
    "baseline": "{epochs: 1, batch_size: 16, widths: [1.0], min_net: false, "
    "random_policy: false, oracle_children: 0}",
}


def tiny_main_model_run(root: Path, **overrides: str) -> Path:
    """``instanas run`` of the tiny config with only the main model and its baseline."""
    config = root / "config.yaml"
    sections = {**MAIN_MODEL_ONLY, **overrides}
    config.write_text(tiny_config(make_folder_dataset(root / "data"), **sections))
    env = {**os.environ, "INSTANAS_CACHE": str(root / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instanas",
            "run",
            "--config",
            str(config),
            "--output",
            str(root / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"
