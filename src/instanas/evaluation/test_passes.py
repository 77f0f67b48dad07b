"""Each kind of model on the test split: per-image correctness and, for dynamic models, the
resolved policies; the table latency, FLOPs and routing figures of its entry in results.json;
and the batch-1 function that the side-by-side timing runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..latency.flops import FlopsTable, network_flops
from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import ChildNetwork, MetaGraph
from ..models.predictor import InstaNASPredictor
from ..run_context import RunContext
from ..search.policy import RandomPolicy, shuffled_routing_accuracy
from ..space import ChildArchitecture, routing_summary


@dataclass
class Evaluated:
    """One model's test-set outcome before timing."""

    kind: str
    accuracy: float
    batch_one: Callable[[torch.Tensor], object]
    entry: dict = field(default_factory=dict)
    policies: torch.Tensor | None = None  # resolved [N, cells, modules], dynamic models only
    correct: torch.Tensor | None = None


@torch.no_grad()
def instanas_test_pass(
    ctx: RunContext, predictor: InstaNASPredictor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched greedy evaluation: per-image correctness [N] and resolved policies."""
    correct, policies = [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        logits, policy = predictor.logits(batch.images.contiguous())
        correct.append((logits.argmax(1) == batch.labels).cpu())
        policies.append(policy.cpu())
    return torch.cat(correct), torch.cat(policies)


@torch.no_grad()
def baseline_test_accuracy(ctx: RunContext, network: torch.nn.Module) -> float:
    correct = 0
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        correct += int((network(batch.images.contiguous()).argmax(1) == batch.labels).sum())
    return correct / len(ctx.data.test)


def policy_entry(
    policies: torch.Tensor,
    table: LatencyTable,
    flops_per_image: torch.Tensor,
    include_controller: bool,
) -> dict:
    return {
        "table_latency_ms": float(table.predict_ms(policies, include_controller).mean()),
        "flops": float(flops_per_image.mean()),
        **routing_summary(policies),
        "mean_active_modules": float(policies.sum(dim=(1, 2)).float().mean()),
    }


def evaluate_instanas(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    table: LatencyTable,
    flops_table: FlopsTable,
    kind: str,
) -> Evaluated:
    predictor = InstaNASPredictor(metagraph.cpu().eval(), controller.cpu().eval())
    correct, policies = instanas_test_pass(ctx, predictor)
    flops = flops_table.per_image(policies)
    entry = policy_entry(policies, table, flops, include_controller=True)
    entry["shuffled_routing_accuracy"] = shuffled_routing_accuracy(
        ctx, predictor.metagraph, policies, ctx.data.test, ctx.config.seed + 4
    )
    return Evaluated(
        kind, int(correct.sum()) / len(correct), predictor.logits_one, entry, policies, correct
    )


def evaluate_static(
    ctx: RunContext,
    network: ChildNetwork,
    table: LatencyTable,
    kind: str,
    width: float | None = None,
) -> Evaluated:
    """A standalone network; its table latency is known only in the run's own space."""
    deployed = network.cpu().eval().deploy()
    space = network.space
    entry = {
        "flops": network_flops(
            deployed, (space.input_channels, space.input_size, space.input_size)
        ),
        "distinct_children": 1,
        "mean_active_modules": float(sum(len(m) for m in network.cell_modules)),
    }
    if width is not None:
        entry["width"] = width
    if space == ctx.space:
        # The cells it really runs: an empty child still runs the forced defaults.
        resolved = ChildArchitecture(network.cell_modules, space.num_modules)
        policy = resolved.to_policy().unsqueeze(0)
        entry["table_latency_ms"] = float(table.predict_ms(policy, include_controller=False)[0])
    return Evaluated(kind, baseline_test_accuracy(ctx, deployed), deployed, entry)


class RandomChildRunner:
    """Batch-1 path of the random-policy model: the next pre-drawn child, only its modules."""

    def __init__(self, metagraph: MetaGraph, policies: torch.Tensor) -> None:
        self.graph = metagraph
        self.children = [ChildArchitecture.from_policy(p).cells for p in policies]
        self.next = 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        cells = self.children[self.next % len(self.children)]
        self.next += 1
        return self.graph.forward_resolved(image, cells)


@torch.no_grad()
def evaluate_random_policy(
    ctx: RunContext, metagraph: MetaGraph, rate: float, table: LatencyTable, flops_table: FlopsTable
) -> Evaluated:
    """Random policies drawn per test image (seeded apart from the training draws)."""
    graph = metagraph.cpu().eval().deploy()
    draw = RandomPolicy(ctx.space, rate, ctx.config.seed + 2)
    correct, policies = [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        policy = graph.resolve(draw(batch.images))
        correct.append((graph(batch.images.contiguous(), policy).argmax(1) == batch.labels).cpu())
        policies.append(policy.cpu())
    policies = torch.cat(policies)
    correct = torch.cat(correct)
    flops = flops_table.per_image(policies, include_controller=False)
    entry = policy_entry(policies, table, flops, include_controller=False)
    entry["selection_rate"] = rate
    return Evaluated(
        "random-policy",
        int(correct.sum()) / len(correct),
        RandomChildRunner(graph, policies),
        entry,
        policies,
        correct,
    )


@torch.no_grad()
def expected_latency(ctx: RunContext, controller: Controller, table: LatencyTable) -> torch.Tensor:
    """Σ p(module) x module cost per test image under the main controller (ms, cells only)."""
    controller = controller.cpu().eval()
    module_ms = table.module_ms()
    out = [
        (controller(b.images.cpu().contiguous()) * module_ms).flatten(1).sum(1)
        for b in ctx.batches(ctx.data.test, 500, train=False)
    ]
    return torch.cat(out)
