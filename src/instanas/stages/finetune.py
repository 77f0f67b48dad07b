"""Stage 3: fine-tune the meta-graph on each image's greedy policy, controller frozen.

The loop itself (``stages.common.train_under_policy``) also trains the variants and the
random-policy baseline: only the policy function differs.
"""

from __future__ import annotations

from pathlib import Path

from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..training import RunContext
from .common import finetune_under_controller, stage_path


def finetune(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
             table: LatencyTable, *, stage: str = "finetune",
             output: Path | None = None) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``."""
    return finetune_under_controller(ctx, metagraph, controller, table, stage=stage,
                                     output=output or stage_path(ctx, "finetune"))
