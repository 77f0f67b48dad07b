"""The MobileNetV2 path (module 0 in every cell) at the preset's width, trained standalone for as
many epochs as the meta-graph gets in all three stages together: ``mbv2-path``."""

from __future__ import annotations

from ..models.metagraph import ChildNetwork, mbv2_path_network
from ..run_context import RunContext
from .common import stage_path
from .standalone import train_standalone


def run(ctx: RunContext) -> ChildNetwork:
    return train_standalone(
        ctx, mbv2_path_network(ctx.space), "mbv2-path", stage_path(ctx, "baseline")
    )
