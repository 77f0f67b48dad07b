"""Stage 3: fine-tune the meta-graph on each image's greedy policy, controller frozen. When
the main model deploys a child set (``controller.deployed_children``), each image trains the
child of that set it will run.

The loop itself (:mod:`.policy_tuning`) also trains the variants, the random-policy model and
the best static child: only the policy function differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from ..space import ChildArchitecture
from .common import (
    children_to_finetune,
    latency_table,
    record_finetuned_children,
    searched_models,
    stage_path,
)
from .policy_tuning import finetune_under_controller


def finetune(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    table: LatencyTable,
    *,
    stage: str = "finetune",
    output: Path | None = None,
    children: Sequence[ChildArchitecture] | None = None,
) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``.
    ``children``: the deployed child set, trained alone (None: every child the controller
    picks)."""
    output = output or stage_path(ctx, "finetune")
    return finetune_under_controller(
        ctx, metagraph, controller, table, stage=stage, output=output, children=children
    )


def run(ctx: RunContext) -> MetaGraph:
    metagraph, controller = searched_models(ctx)
    children = children_to_finetune(ctx, controller)
    tuned = finetune(ctx, metagraph, controller, latency_table(ctx), children=children)
    if children is not None:
        record_finetuned_children(ctx)
    return tuned
