"""The other standalone baselines: the MobileNetV2 path at ``baseline.widths`` and the minimum
network, each trained like ``mbv2-path``."""

from __future__ import annotations

import logging

from ..run_context import RunContext
from ..utils import write_json
from .common import stage_path
from .standalone import reference_networks, reference_path, train_standalone

log = logging.getLogger("instanas")


def run(ctx: RunContext) -> dict[str, str]:
    """Every extra baseline not trained yet; the list of their files marks the stage as done."""
    done = {}
    for name, net in reference_networks(ctx).items():
        path = reference_path(ctx, name)
        if path.exists():
            log.info("baseline %s already trained, skipping", name)
        else:
            log.info("training baseline %s (%s)", name, net.child)
            train_standalone(ctx, net, name, path)
        done[name] = str(path.relative_to(ctx.run_dir))
    write_json(stage_path(ctx, "baselines"), done)
    return done
