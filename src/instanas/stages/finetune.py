"""Stage 3: fine-tune the meta-graph on each image's greedy policy, controller frozen.

The loop itself (:mod:`.policy_tuning`) also trains the variants, the random-policy model and
the best static child: only the policy function differs.
"""

from __future__ import annotations

from pathlib import Path

from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from .common import latency_table, searched_models, stage_path
from .policy_tuning import finetune_under_controller


def finetune(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    table: LatencyTable,
    *,
    stage: str = "finetune",
    output: Path | None = None,
) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``."""
    return finetune_under_controller(
        ctx, metagraph, controller, table, stage=stage, output=output or stage_path(ctx, "finetune")
    )


def run(ctx: RunContext) -> MetaGraph:
    metagraph, controller = searched_models(ctx)
    return finetune(ctx, metagraph, controller, latency_table(ctx))
