"""Each kind of model on the test split: per-image correctness and, for dynamic models, the
resolved policies; the table latency, FLOPs and routing figures of its entry in results.json;
and the batch-1 function that the side-by-side timing runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..latency.backends import Backend, ImageCall
from ..latency.flops import FlopsTable, network_flops
from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import ChildNetwork, MetaGraph
from ..models.predictor import Escalation, InstaNASPredictor
from ..run_context import RunContext
from ..search.policy import RandomPolicy, shuffled_routing_accuracy
from ..space import ChildArchitecture, ranked_children, routing_summary


@dataclass
class Evaluated:
    """One model's test-set outcome before timing.

    ``batch_one`` is its eager batch-1 path; ``deployed`` its batch-1 path in a latency
    backend (the exported graphs in onnxruntime), None when it has no deployable form (the
    random-policy model draws a child per image at random).
    """

    kind: str
    accuracy: float
    batch_one: Callable[[torch.Tensor], object]
    entry: dict = field(default_factory=dict)
    policies: torch.Tensor | None = None  # resolved [N, cells, modules], dynamic models only
    correct: torch.Tensor | None = None
    deployed: Callable[[Backend], ImageCall] | None = None
    # Routed models only: the test pass, the deployed predictor and its exported children.
    test_pass: "TestPass | None" = None
    predictor: InstaNASPredictor | None = None
    children: list[ChildArchitecture] = field(default_factory=list)


@dataclass
class TestPass:
    """A routed model on the test split, per image."""

    correct: torch.Tensor  # [N] bool, the model's answer (escalation included)
    policies: torch.Tensor  # [N, cells, modules] resolved
    escalated: torch.Tensor  # [N] bool
    child_confidence: torch.Tensor  # [N] the routed child's top softmax probability
    child_correct: torch.Tensor  # [N] bool, the routed child's answer
    larger_correct: torch.Tensor | None  # [N] bool, the larger network's answer


@torch.no_grad()
def instanas_test_pass(ctx: RunContext, predictor: InstaNASPredictor) -> TestPass:
    """Batched greedy evaluation with the child's and (with escalation) the larger network's
    answers kept apart."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in TestPass.__dataclass_fields__}
    routed = predictor.without_escalation()
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        images, labels = batch.images.contiguous(), batch.labels
        logits, policy, escalated = predictor.answer(images)
        child_logits, _, _ = routed.answer(images)
        parts["correct"].append((logits.argmax(1) == labels).cpu())
        parts["policies"].append(policy.cpu())
        parts["escalated"].append(escalated.cpu())
        parts["child_confidence"].append(torch.softmax(child_logits, 1).amax(1).cpu())
        parts["child_correct"].append((child_logits.argmax(1) == labels).cpu())
        if predictor.escalation is not None:
            larger = predictor.escalation.network(images)
            parts["larger_correct"].append((larger.argmax(1) == labels).cpu())
    return TestPass(**{k: torch.cat(v) if v else None for k, v in parts.items()})


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
    escalation: Escalation | None = None,
    limit: int | None = None,
    children: Sequence[ChildArchitecture] | None = None,
) -> Evaluated:
    """A routed model (the main model or a variant); its deployed graph holds ``children`` (its
    child set, every policy mapped to the nearest) or else the children its controller picks
    on the validation split (at most ``limit``, most used first)."""
    predictor = InstaNASPredictor(
        metagraph.cpu().eval(), controller.cpu().eval(), escalation, children
    )
    result = instanas_test_pass(ctx, predictor)
    policies, correct = result.policies, result.correct
    flops = flops_table.per_image(policies)
    entry = policy_entry(policies, table, flops, include_controller=True)
    entry["shuffled_routing_accuracy"] = shuffled_routing_accuracy(
        ctx, predictor.metagraph, policies, ctx.data.test, ctx.config.seed + 4
    )
    if children is None:
        children = [c for c, _ in ranked_children(validation_policies(ctx, predictor), limit)]

    def deployed(backend: Backend) -> ImageCall:
        return backend.model_image_call(predictor, children)

    accuracy = int(correct.sum()) / len(correct)
    evaluated = Evaluated(kind, accuracy, predictor.logits_one, entry, policies, correct, deployed)
    evaluated.test_pass, evaluated.predictor, evaluated.children = result, predictor, children
    return evaluated


@torch.no_grad()
def validation_policies(ctx: RunContext, predictor: InstaNASPredictor) -> torch.Tensor:
    """Resolved policies [N, cells, modules] the controller picks on the validation split."""
    batches = ctx.batches(ctx.data.val, 500, train=False)
    return torch.cat([predictor.policies(b.images.cpu().contiguous()) for b in batches])


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

    def deployed_call(backend: Backend) -> ImageCall:
        return backend.model_image_call(network)

    accuracy = baseline_test_accuracy(ctx, deployed)
    return Evaluated(kind, accuracy, deployed, entry, deployed=deployed_call)


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
