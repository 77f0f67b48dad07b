"""Test accuracy of a run directory's MobileNetV2-path baseline, for runs that trained only the
baseline (`instanas baseline --output DIR`); `instanas evaluate` needs the three stages too.

python scripts/baseline_accuracy.py runs/b8k-s1 [runs/b8k-4x-s1 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from instanas.evaluation.test_passes import baseline_test_accuracy
from instanas.models.metagraph import mbv2_path_network
from instanas.pipeline import existing_config, open_run
from instanas.stages.common import load_stage


def baseline_accuracy(run: Path) -> float:
    config = existing_config(run)
    if config is None:
        raise SystemExit(f"{run} is not a run directory (no config.yaml): pass an --output folder")
    ctx = open_run(config, run, resume=True)
    network = mbv2_path_network(ctx.space)
    load_stage(ctx, "baseline", {"network": network})
    with torch.no_grad():
        return baseline_test_accuracy(ctx, network.eval())


def main(runs: list[str]) -> None:
    for run in runs:
        print(f"{run}: mbv2-path test accuracy {100 * baseline_accuracy(Path(run)):.2f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
