"""Run one training stage twice with the same seed and say whether the results are identical.

    .venv/bin/python scripts/check_reproducible.py [--preset fashion-cpu] [--stage pretrain]
        [--threads 2] [--limit-train 1500] [--epochs 2] [--keep DIR]

Each run is a fresh process (`instanas pretrain`, or `instanas baseline`) in its own run
directory. The script compares the stage's weights byte for byte and its metrics.jsonl records
(wall-clock fields left out), prints one line per file, and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUTPUTS = {"pretrain": "pretrain/metagraph.safetensors", "baseline": "baseline/mbv2.safetensors"}


def run_stage(run_dir: Path, args: argparse.Namespace) -> None:
    command = [
        sys.executable,
        "-m",
        "instanas",
        args.stage,
        "--preset",
        args.preset,
        "--output",
        str(run_dir),
        "--threads",
        str(args.threads),
        "--quiet",
        "--data.limit_train",
        str(args.limit_train),
        f"--{args.stage}.epochs",
        str(args.epochs),
    ]
    env = {**os.environ, "INSTANAS_NO_PROGRESS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"check_reproducible: {' '.join(command)} failed: {proc.stderr.strip()[-500:]}")


def metrics(run_dir: Path, stage: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k != "time" and not k.endswith("seconds")}
        for r in records
        if r.get("stage") == stage
    ]


def compare(first: Path, second: Path, stage: str) -> bool:
    digests = [
        hashlib.sha256((run / OUTPUTS[stage]).read_bytes()).hexdigest() for run in (first, second)
    ]
    same_weights = digests[0] == digests[1]
    same_metrics = metrics(first, stage) == metrics(second, stage)
    print(
        f"{OUTPUTS[stage]}: {'identical' if same_weights else 'DIFFERENT'} "
        f"(sha256 {digests[0][:16]} / {digests[1][:16]})"
    )
    print(f"metrics.jsonl ({stage}): {'identical' if same_metrics else 'DIFFERENT'}")
    return same_weights and same_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-cpu")
    parser.add_argument("--stage", choices=sorted(OUTPUTS), default="pretrain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep both runs under DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = args.keep or Path(scratch)
        runs = [base / "first", base / "second"]
        for run in runs:
            run_stage(run, args)
        same = compare(*runs, args.stage)
    print(
        f"{args.stage}, preset {args.preset}, {args.threads} threads, "
        f"{args.limit_train} images, {args.epochs} epochs: "
        f"{'reproducible' if same else 'NOT reproducible'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
