"""Kill a real run mid-stage (SIGKILL, or Ctrl-C), resume it, and get exactly the uninterrupted
run's result: same weights byte for byte, same metrics for every epoch (CPU, two threads, as
the runs of users on two or more cores)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import make_folder_dataset, tiny_config

EPOCHS = 4


def _env(base: Path) -> dict[str, str]:
    # Two threads: sums split across threads must still come out the same (issue 17).
    return {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "INSTANAS_NO_PROGRESS": "1",
        "INSTANAS_CACHE": str(base / "cache"),
    }


def _instanas(base: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "instanas", *args, "--quiet"],
        env=_env(base),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _interrupt(
    base: Path, marker: Path, *args: str, sig: int = signal.SIGKILL
) -> subprocess.CompletedProcess:
    """Start the command, send ``sig`` as soon as ``marker`` (an epoch checkpoint) exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "instanas", *args, "--quiet"],
        env=_env(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "the stage ended before it could be interrupted"
        assert time.monotonic() < deadline, "no epoch checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _metrics(run: Path, stage: str) -> list[dict]:
    """The stage's metric records without wall-clock fields."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k != "time" and not k.endswith("seconds")}
        for r in records
        if r["stage"] == stage
    ]


def _copy(reference: Path, run: Path, *names: str) -> None:
    run.mkdir()
    for name in ("config.yaml", "latency_table.json", *names):
        source = reference / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, run / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Every training stage run uninterrupted, one command each."""
    base = tmp_path_factory.mktemp("resume")
    data = make_folder_dataset(base / "data")
    (base / "tiny.yaml").write_text(tiny_config(data, epochs=EPOCHS))
    run = base / "reference"
    _instanas(base, "pretrain", "--config", str(base / "tiny.yaml"), "--output", str(run))
    for stage in ("search", "finetune", "baseline"):
        _instanas(base, stage, "--output", str(run))
    return run


def test_two_seeded_runs_of_every_training_stage_are_byte_identical(reference):
    base, run = reference.parent, reference.parent / "again"
    _instanas(base, "pretrain", "--config", str(base / "tiny.yaml"), "--output", str(run))
    for stage in ("search", "finetune", "baseline"):
        _instanas(base, stage, "--output", str(run))
    files = {
        "pretrain": ["metagraph.safetensors"],
        "finetune": ["model.safetensors"],
        "baseline": ["mbv2.safetensors"],
        "search": [f"epoch_{e:03d}.safetensors" for e in range(1, EPOCHS + 1)],
    }
    for stage, names in files.items():
        for name in names:
            assert (run / stage / name).read_bytes() == (reference / stage / name).read_bytes(), (
                f"{stage}/{name}"
            )
        assert _metrics(run, stage) == _metrics(reference, stage), stage
    assert "threads: 2" in (run / "config.yaml").read_text()


def test_one_command_equals_the_stages_one_at_a_time(reference):
    base, run = reference.parent, reference.parent / "one-command"
    config = base / "only-main.yaml"
    config.write_text(
        (base / "tiny.yaml")
        .read_text()
        .replace(
            "baseline: {",
            "variants: {count: 0}\nbaseline: {widths: [1.0], min_net: false, "
            "random_policy: false, static_child: false, oracle_children: 0, ",
        )
    )
    _instanas(base, "run", "--config", str(config), "--output", str(run))
    for name in (
        "pretrain/metagraph.safetensors",
        "search/selected.safetensors",
        "finetune/model.safetensors",
        "baseline/mbv2.safetensors",
    ):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name


def test_pretrain_killed_resumes_exactly_even_from_a_torn_checkpoint(reference):
    base, run = reference.parent, reference.parent / "pretrain-killed"
    folder = run / "pretrain" / "resume"
    killed = _interrupt(
        base,
        folder / "epoch_0002.safetensors",
        "pretrain",
        "--config",
        str(base / "tiny.yaml"),
        "--output",
        str(run),
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "pretrain" / "metagraph.safetensors").exists()
    states = sorted(folder.glob("epoch_*.safetensors"))
    assert len(states) >= 2  # the last two are kept
    # A crash while the disk was failing: the newest state is torn; the one before must serve.
    states[-1].write_bytes(states[-1].read_bytes()[:1000])
    resumed = _instanas(base, "pretrain", "--resume", str(run))
    assert "corrupt or truncated; resuming from" in resumed.stderr
    assert (run / "pretrain" / "metagraph.safetensors").read_bytes() == (
        reference / "pretrain" / "metagraph.safetensors"
    ).read_bytes()
    assert _metrics(run, "pretrain") == _metrics(reference, "pretrain")
    assert not folder.exists()  # the finished stage no longer needs its epoch states


def test_search_killed_resumes_exactly(reference):
    base, run = reference.parent, reference.parent / "search-killed"
    _copy(reference, run, "pretrain")
    killed = _interrupt(
        base, run / "search" / "resume" / "epoch_0001.safetensors", "search", "--output", str(run)
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "search" / "selected.safetensors").exists()
    _instanas(base, "search", "--resume", str(run))
    names = [f"epoch_{e:03d}.safetensors" for e in range(1, EPOCHS + 1)] + ["selected.safetensors"]
    for name in names:
        assert (run / "search" / name).read_bytes() == (reference / "search" / name).read_bytes(), (
            name
        )
    assert _metrics(run, "search") == _metrics(reference, "search")
    chosen = json.loads((run / "search" / "selected.json").read_text())["chosen"]
    assert (
        chosen["epoch"]
        == json.loads((reference / "search" / "selected.json").read_text())["chosen"]["epoch"]
    )


def test_finetune_killed_resumes_exactly_through_run_resume(reference):
    base, run = reference.parent, reference.parent / "finetune-killed"
    _copy(reference, run, "pretrain", "search", "baseline")
    killed = _interrupt(
        base,
        run / "finetune" / "resume" / "epoch_0001.safetensors",
        "finetune",
        "--output",
        str(run),
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "finetune" / "model.safetensors").exists()
    # `run --resume` skips the finished stages, continues fine-tuning, then evaluates.
    _instanas(base, "run", "--resume", str(run))
    assert (run / "finetune" / "model.safetensors").read_bytes() == (
        reference / "finetune" / "model.safetensors"
    ).read_bytes()
    assert _metrics(run, "finetune") == _metrics(reference, "finetune")
    assert json.loads((run / "results.json").read_text())["models"]["instanas"]


def test_ctrl_c_saves_the_epoch_and_exits_cleanly(reference):
    base, run = reference.parent, reference.parent / "baseline-interrupted"
    folder = run / "baseline" / "resume"
    stopped = _interrupt(
        base,
        folder / "epoch_0001.safetensors",
        "baseline",
        "--config",
        str(base / "tiny.yaml"),
        "--output",
        str(run),
        sig=signal.SIGINT,
    )
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("instanas: interrupted")
    assert not (run / "baseline" / "mbv2.safetensors").exists()
    assert list(folder.glob("epoch_*.safetensors"))
    _instanas(base, "baseline", "--resume", str(run))
    assert (run / "baseline" / "mbv2.safetensors").read_bytes() == (
        reference / "baseline" / "mbv2.safetensors"
    ).read_bytes()
    assert _metrics(run, "baseline") == _metrics(reference, "baseline")


def test_two_pretraining_epochs_of_the_main_preset_are_reproducible_at_two_threads():
    """Large enough for the tiny-map matrix forms and oneDNN to split work across threads."""
    script = Path(__file__).parents[1] / "scripts" / "check_reproducible.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--preset",
            "fashion-cpu",
            "--threads",
            "2",
            "--limit-train",
            "800",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "pretrain/metagraph.safetensors: identical" in proc.stdout
