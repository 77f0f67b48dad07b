"""The fair peer: the MobileNetV2 path at the width whose deployed latency is closest to and not
below the main model's, trained standalone with the baseline's budget (``mbv2-peer``).

Candidate widths are multiples of the run's width in steps of 0.05 down to a quarter; networks
whose rounded channel counts coincide are timed once. The candidates (untrained: latency does
not depend on the weights) and the main model as deployed (routing and escalation included)
are timed side by side on validation images in the run's latency backend.
"""

from __future__ import annotations

import json
import logging

from ..latency.side_by_side import measure_per_image
from ..models.metagraph import ChildNetwork, mbv2_path_network, scaled_space
from ..run_context import RunContext
from ..utils import write_json
from .common import (
    CHOICE_TIMED_IMAGES,
    closest_not_below,
    finetuned_predictor,
    latency_backend,
    stage_path,
    validation_children,
    validation_images,
)
from .standalone import train_standalone

log = logging.getLogger("instanas")
WIDTH_FACTORS = tuple(round(0.25 + 0.05 * i, 2) for i in range(16))  # 0.25 .. 1.0


def candidates(ctx: RunContext) -> dict[float, ChildNetwork]:
    """One MobileNetV2 path per distinct channel layout, by width factor (smallest first)."""
    found: dict[tuple, float] = {}
    for factor in WIDTH_FACTORS:
        space = scaled_space(ctx.space, factor)
        layout = (space.stem_out_channels, tuple(c.out_channels for c in space.cells()))
        found.setdefault(layout, factor)
    return {f: mbv2_path_network(scaled_space(ctx.space, f)) for f in sorted(found.values())}


def choose_width(ctx: RunContext) -> tuple[float, dict]:
    """Time the main model and every candidate width; the peer's width factor and the times."""
    backend = latency_backend(ctx)
    predictor = finetuned_predictor(ctx)
    children = validation_children(ctx, predictor, ctx.config.variants.max_timed_children)
    networks = candidates(ctx)
    calls = {f"{f:g}": backend.model_image_call(n.eval()) for f, n in networks.items()}
    calls["instanas"] = backend.model_image_call(predictor, children)
    cfg = ctx.config.latency
    measured = measure_per_image(calls, validation_images(ctx, CHOICE_TIMED_IMAGES), cfg.threads,
                                 cfg.warmup, ctx.config.seed, burst=backend.burst,
                                 retries=cfg.noisy_retries)  # fmt: skip
    target = measured.pop("instanas")["mean"]
    times = {float(k): v["mean"] for k, v in measured.items()}
    factor = closest_not_below(times, target)
    info = {"width_factor": factor, "measured_ms": times[factor], "instanas_measured_ms": target,
            "candidates_ms": {f"{k:g}": v for k, v in times.items()}}  # fmt: skip
    log.info("peer: the MobileNetV2 path at %gx width, %.3f ms measured against the main "
             "model's %.3f ms", factor, times[factor], target)  # fmt: skip
    return factor, info


def run(ctx: RunContext) -> ChildNetwork:
    # The choice is kept before training: a resumed run trains the width it chose, whatever
    # a new timing would say.
    choice_path = ctx.run_dir / "baseline" / "mbv2-peer.json"
    if choice_path.exists():
        info = json.loads(choice_path.read_text())
    else:
        info = choose_width(ctx.on_cpu())[1]
        write_json(choice_path, info)
    network = mbv2_path_network(scaled_space(ctx.space, info["width_factor"]))
    return train_standalone(ctx, network, "mbv2-peer", stage_path(ctx, "peer"), extra=info)
