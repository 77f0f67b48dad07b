"""One process against two under torchrun, on one pretraining epoch of the main job.

    .venv/bin/python bench/data_parallel.py [--images 12000] [--preset fashion-cpu]

Runs ``instanas pretrain`` for one epoch of the preset's pretraining (its batch size, its
drop-path schedule) on the first ``--images`` training images (0: the whole training split)
three ways, one after the other: one process with every core's threads, one process with one
thread, and ``torchrun --nproc_per_node 2`` with one thread per process (same global batch,
same number of steps). Prints the machine, each epoch's training seconds as the run records
them (data loading and start-up excluded) and the ratios. Nothing is asserted: on a 2-core
machine two processes compete with each other for the same cores that one process's threads
share, and the ratio says how much the collective operations cost there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from instanas.latency.timing import processor_name

ROOT = Path(__file__).resolve().parents[1]


def pretrain_epoch(work: Path, name: str, ranks: int, threads: int, args) -> dict:
    """The pretraining epoch's metrics record of one run."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    limit = ["--data.limit_train", str(args.images)] if args.images else []
    command = [*launcher, "-m", "instanas", "pretrain", "--preset", args.preset,
               "--output", str(work / name), "--pretrain.epochs", "1", "--threads", str(threads),
               "--quiet", *limit]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "INSTANAS_CACHE": str(work / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    lines = (work / name / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r.get("stage") == "pretrain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12000, help="training images (0: all)")
    parser.add_argument("--preset", default="fashion-cpu")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{processor_name()}, {cores} cores, torch {torch.__version__}")
    runs = {"1 process x %d threads" % cores: (1, cores), "1 process x 1 thread": (1, 1),
            "2 processes x 1 thread (torchrun)": (2, 1)}  # fmt: skip
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (ranks, threads)) in enumerate(runs.items()):
            record = pretrain_epoch(Path(tmp), f"run{i}", ranks, threads, args)
            seconds[name] = record["seconds"]
            print(f"{name:36s} {record['steps']:4d} steps  {record['seconds']:7.1f} s  "
                  f"train loss {record['train_loss']:.4f}", flush=True)  # fmt: skip
    reference = seconds["1 process x %d threads" % cores]
    for name, value in seconds.items():
        print(f"{name:36s} time ratio vs 1 process x {cores} threads: {value / reference:.2f}")


if __name__ == "__main__":
    main()
