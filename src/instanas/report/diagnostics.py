"""Warnings a run gives about its own training: models still improving when their budget ended,
and a meta-graph too weak to search on."""

from __future__ import annotations

from typing import Iterable

from .. import stage_specs

# Stage name in metrics.jsonl -> (training-accuracy field, the option that extends it). The
# stage specs leave pretraining out: its drop-path schedule makes later epochs harder by design,
# so its training accuracy does not show convergence.
_TRAINED = {
    stage.name: (stage.accuracy_field, f"{stage.budget}.epochs")
    for stage in stage_specs.STAGES
    if stage.accuracy_field
}
# Training accuracy that rose by more than this over the last epochs counts as still rising.
RISING_POINTS = 0.5


def still_rising(accuracies: list[float], threshold_points: float = RISING_POINTS) -> float | None:
    """Points gained over the last fifth of the epochs (at least the last two), when more than
    ``threshold_points``; None otherwise or with fewer than three epochs."""
    if len(accuracies) < 3:
        return None
    tail = max(2, len(accuracies) // 5)
    gain = 100.0 * (accuracies[-1] - accuracies[-1 - tail])
    return gain if gain > threshold_points else None


def undertrained(records: Iterable[dict]) -> list[dict]:
    """Stages whose training accuracy was still rising when they ended.

    ``records``: the lines of metrics.jsonl.
    """
    series: dict[str, list[float]] = {}
    for record in records:
        stage = record.get("stage")
        if stage in _TRAINED:
            value = record.get(_TRAINED[stage][0])
            if isinstance(value, (int, float)):
                series.setdefault(stage, []).append(float(value))
    flags = []
    for stage, values in series.items():
        gain = still_rising(values)
        if gain is not None:
            flags.append(
                {
                    "stage": stage,
                    "epochs": len(values),
                    "last_epochs_gain_points": round(gain, 2),
                    "option": _TRAINED[stage][1],
                }
            )
    return flags


def undertrained_sentence(flags: list[dict]) -> str | None:
    if not flags:
        return None
    parts = [
        f"{f['stage']} (+{f['last_epochs_gain_points']:.1f} points in its last epochs; "
        f"raise --{f['option']})"
        for f in flags
    ]
    return (
        "Possibly undertrained — training accuracy was still rising when the budget ended: "
        + "; ".join(parts)
        + "."
    )


def near_chance(accuracy: float, num_classes: int, floor: float | None = None) -> bool:
    """Below ``floor``, by default a tenth of the way from chance to perfect: too weak to
    search on."""
    if floor is None:
        chance = 1.0 / num_classes
        floor = chance + 0.1 * (1.0 - chance)
    return accuracy < floor
