"""Fingerprint a full run of the tiny test config: weights and metrics, wall-clock left out.

    .venv/bin/python scripts/fingerprint_run.py WORK_DIR [--compare OTHER.json]

Writes WORK_DIR/fingerprint.json: the SHA-256 of every checkpoint the run keeps, and its
metrics.jsonl records and results.json accuracies with every wall-clock and measured-latency
field removed. The latency table is cached under WORK_DIR, so a second call on the same
WORK_DIR (e.g. from a checkout before and after a restructuring) searches against the same
table. With ``--compare`` the new fingerprint is checked against an earlier one; the script
prints what differs and exits 1 if anything does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_runs import make_folder_dataset, tiny_config  # noqa: E402

# Fields that hold wall-clock times or measured latencies: they differ between any two runs.
_TIMED = ("time", "seconds", "_ms", "ms_", "latency", "speed", "wall")


def _timed(key: str) -> bool:
    return any(part in key for part in _TIMED)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def run_tiny(work: Path) -> Path:
    data = work / "data"
    if not data.exists():
        make_folder_dataset(data)
    config = work / "tiny.yaml"
    config.write_text(tiny_config(data, epochs=2))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "INSTANAS_NO_PROGRESS": "1",
        "INSTANAS_CACHE": str(work / "cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instanas",
            "run",
            "--config",
            str(config),
            "--output",
            str(run),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"fingerprint_run: the tiny run failed: {proc.stderr.strip()[-800:]}")
    return run


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of the tensors and of the metadata without measured times."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = {
        k: _untimed(json.loads(v)) if v[:1] in "[{" else v
        for k, v in header.pop("__metadata__", {}).items()
        if not _timed(k)
    }
    digest = hashlib.sha256(json.dumps([header, meta], sort_keys=True).encode())
    digest.update(raw[8 + size :])
    return digest.hexdigest()


def fingerprint(run: Path) -> dict:
    weights = {
        str(p.relative_to(run)): checkpoint_digest(p) for p in sorted(run.rglob("*.safetensors"))
    }
    records = [
        _untimed(json.loads(line))
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    results = json.loads((run / "results.json").read_text())
    accuracy = {name: model.get("accuracy") for name, model in results["models"].items()}
    return {"weights": weights, "metrics": records, "accuracy": accuracy}


def differences(old: dict, new: dict) -> list[str]:
    found = []
    for name in sorted(set(old["weights"]) | set(new["weights"])):
        if old["weights"].get(name) != new["weights"].get(name):
            found.append(f"weights {name}")
    old_m, new_m = old["metrics"], new["metrics"]
    if len(old_m) != len(new_m):
        found.append(f"metrics: {len(old_m)} records before, {len(new_m)} now")
    found += [
        f"metrics record {i}: {a} != {b}" for i, (a, b) in enumerate(zip(old_m, new_m)) if a != b
    ]
    if old["accuracy"] != new["accuracy"]:
        found.append(f"accuracy {old['accuracy']} != {new['accuracy']}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--compare", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # Read first: --compare may name the fingerprint.json this run is about to replace.
    old = json.loads(args.compare.read_text()) if args.compare else None
    current = fingerprint(run_tiny(args.work))
    (args.work / "fingerprint.json").write_text(json.dumps(current, indent=1))
    print(f"{len(current['weights'])} checkpoints, {len(current['metrics'])} metric records")
    if old is None:
        return 0
    found = differences(old, current)
    for line in found:
        print("DIFFERENT", line[:300])
    print("identical" if not found else f"{len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
