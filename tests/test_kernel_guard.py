"""Native-kernel guard: every convolution shape of every shipped preset, of the tests' tiny
config and of their controllers runs forward and backward on the AVX2 code paths, with glibc
checking the heap, in a fresh process. A native abort fails the test that names the shape."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import tiny_config

from instanas.config import preset_names
from instanas.nn.kernel_guard import AVX2_ENV


def _guard(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **AVX2_ENV}
    return subprocess.run(
        [sys.executable, "-m", "instanas.kernel_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _failure(proc: subprocess.CompletedProcess) -> str:
    checking = [line for line in proc.stdout.splitlines() if line.startswith("checking")]
    last = checking[-1] if checking else "(before the first shape)"
    return f"exit {proc.returncode} while {last}; stderr: {proc.stderr[-1500:]}"


@pytest.mark.parametrize("preset", preset_names())
def test_every_convolution_of_a_preset_runs_clean_on_avx2_paths(preset):
    proc = _guard("--preset", preset)
    assert proc.returncode == 0, _failure(proc)
    assert f"done: {preset}" in proc.stdout


def test_every_convolution_of_the_tiny_test_config_runs_clean(tmp_path: Path):
    # Its controller's shortcut is exactly the 4->8 1x1 stride-2 convolution on 8x8 maps
    # that aborts as a plain nn.Conv2d.
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(tmp_path / "data"))
    proc = _guard("--config", str(config))
    assert proc.returncode == 0, _failure(proc)
    assert "conv 4->8 k1 s2 g1 on 8x8" in proc.stdout


def test_the_guard_names_a_shape_that_aborts():
    proc = _guard("--raw-pattern", "--isolate")
    if proc.returncode == 0:
        pytest.skip("this CPU runs the raw strided 1x1 pattern clean on its AVX2 paths")
    assert proc.returncode == 1, _failure(proc)
    assert (
        "died: raw-pattern: conv 4->8 k1 s2 g1 on 8x8 (raw nn.Conv2d): killed by signal"
        in proc.stdout
    )
