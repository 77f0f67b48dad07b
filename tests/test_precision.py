"""Mixed precision (``amp``): bf16 and fp16 training run on the CPU too, stay finite, and leave
float32 runs untouched."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import MAIN_MODEL_ONLY, make_folder_dataset, tiny_config

from instanas.cli import main
from instanas.config import Config, ConfigError, apply_overrides


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_every_training_stage(tmp_path, cache_dir, amp) -> None:
    config = tmp_path / "tiny.yaml"
    data = make_folder_dataset(tmp_path / "data")
    config.write_text(tiny_config(data, epochs=1, **MAIN_MODEL_ONLY))
    run = tmp_path / "run"
    assert (
        main(["run", "--config", str(config), "--output", str(run), "--amp", amp, "--quiet"]) == 0
    )
    records = _records(run)
    losses = [r.get("train_loss", r.get("metagraph_loss")) for r in records]
    assert {"baseline", "pretrain", "search", "finetune"} <= {r["stage"] for r in records}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert f"amp: {amp}" in (run / "config.yaml").read_text()
    assert (run / "results.json").is_file()


def test_autocast_runs_the_forward_in_the_chosen_precision(tmp_path) -> None:
    from types import SimpleNamespace

    from instanas.run_context import RunContext

    layer = torch.nn.Linear(4, 2)
    for amp, dtype in (("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ctx = SimpleNamespace(config=SimpleNamespace(amp=amp), device=torch.device("cpu"))
        with RunContext.autocast(ctx):
            assert layer(torch.ones(1, 4)).dtype == dtype


def test_amp_rejects_unknown_modes() -> None:
    assert apply_overrides(Config(), {"amp": "bf16"}).amp == "bf16"
    with pytest.raises(ConfigError, match="amp"):
        apply_overrides(Config(), {"amp": "fp8"})
