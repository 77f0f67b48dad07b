"""Final numbers on the test set for every model of a run, timed side by side.

InstaNAS (the main model and variants A..E), the MobileNetV2 path at each width, the minimum
network and the random-policy model are all evaluated on the whole test split and timed at
batch 1 on the same images, interleaved image by image in shuffled order, so that drift of the
machine hits every model alike. The oracle bound is computed, not timed (see ``oracle``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .data import images_of
from .latency.flops import FlopsTable, network_flops
from .latency.side_by_side import latency_summary, measure_per_image
from .latency.table import LatencyTable, device_info
from .models.controller import Controller, bound_probabilities, sample_policy
from .models.metagraph import ChildNetwork, MetaGraph
from .models.predictor import InstaNASPredictor
from .provenance import code_commit, utc_now
from .report.schema import RESULTS_SCHEMA_VERSION
from .run_context import RunContext
from .search.policy import RandomPolicy, shuffled_routing_accuracy
from .space import ChildArchitecture, routing_summary
from .version import __version__


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
        "table_latency_ms": float(table.cells_ms(policies).mean())
        + table.fixed_ms(include_controller),
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
        entry["table_latency_ms"] = float(table.cells_ms(policy)[0]) + table.fixed_ms(
            include_controller=False
        )
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


def cheapest_correct(costs: torch.Tensor, hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [images, children] costs and correctness: the cheapest correct child's cost
    (column 0's cost when none is correct) and whether any is correct."""
    solved = hits.any(1)
    best = torch.where(hits, costs, torch.full_like(costs, float("inf"))).min(1).values
    return torch.where(solved, best, costs[:, 0]), solved


@torch.no_grad()
def oracle(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable, samples: int
) -> dict:
    """Per test image, the cheapest correct child among the greedy child and ``samples - 1``
    children drawn from the controller's bounded probabilities; images no child gets right
    count as errors at the greedy child's cost. Latency is the table's prediction: a bound to
    aim at, not a deployable model (it needs the label to choose)."""
    graph = metagraph.cpu().eval().deploy()
    controller = controller.cpu().eval()
    generator = torch.Generator().manual_seed(ctx.config.seed + 3)
    alpha = ctx.config.controller.alpha
    costs, solved = [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        images = batch.images.cpu().contiguous()
        probs = controller(images)
        draws = [probs >= 0.5] + [
            sample_policy(bound_probabilities(probs, alpha), generator) for _ in range(samples - 1)
        ]
        cost, hit = [], []
        for draw in draws:
            policy = graph.resolve(draw)
            hit.append(graph(images, policy).argmax(1) == batch.labels.cpu())
            cost.append(table.cells_ms(policy) + table.fixed_ms())
        cost, ok = cheapest_correct(torch.stack(cost, 1), torch.stack(hit, 1))
        costs.append(cost)
        solved.append(ok)
    costs_ms = torch.cat(costs)
    return {
        "kind": "oracle",
        "test_accuracy": int(torch.cat(solved).sum()) / len(ctx.data.test),
        "latency_ms": latency_summary(costs_ms.tolist()),
        "latency_source": "table",
        "table_latency_ms": float(costs_ms.mean()),
        "children_sampled": samples,
    }


@dataclass
class PerImage:
    """Arrays behind the plots (saved as test_per_image.npz)."""

    arrays: dict[str, np.ndarray]


def evaluate(
    ctx: RunContext,
    models: dict[str, Evaluated],
    table: LatencyTable,
    oracle_entry: dict | None,
    expected_ms: torch.Tensor,
) -> tuple[dict, PerImage]:
    """Time every model side by side and assemble the ``results.json`` contract.

    ``models`` must contain ``instanas`` and ``mbv2-path``; ``expected_ms`` is the main
    controller's expected latency per test image (used to order the galleries).
    """
    cfg = ctx.config.latency
    started = utc_now()
    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.test, 1000, train=False)])
    timed = images[: cfg.eval_images] if cfg.eval_images else images
    samples: dict[str, list[float]] = {}
    runners = {n: m.batch_one for n, m in models.items()}
    seed = ctx.config.seed
    measured = measure_per_image(
        runners, timed.contiguous(), cfg.threads, cfg.warmup, seed, samples
    )
    entries = {
        name: {"kind": m.kind, "test_accuracy": m.accuracy, "latency_ms": measured[name],
               "latency_source": "measured", **m.entry}
        for name, m in models.items()
    }  # fmt: skip
    if oracle_entry is not None:
        entries["oracle"] = oracle_entry
    results = {
        **contract_fields(started),
        "device": device_info(torch.device("cpu"), cfg.threads),
        "models": entries,
        "comparison": comparison(entries),
        "latency_table": table_summary(table),
        "test_images": len(ctx.data.test),
        "timed_images": len(timed),
        "reproducibility": reproducibility(ctx),
    }
    return results, per_image_arrays(ctx, models, table, samples, expected_ms)


def table_summary(table: LatencyTable) -> dict:
    """The table's fixed costs and where it was profiled (the deployment device when
    ``latency.table`` was given)."""
    return {
        "stem_ms": table.unit_ms("stem"),
        "head_ms": table.unit_ms("head"),
        "controller_ms": table.unit_ms("controller"),
        "chain_factor": table.chain_factor,
        "profiled_on": {k: table.key.get(k) for k in ("device", "threads", "torch")},
    }


def reproducibility(ctx: RunContext) -> dict:
    """What a rerun must match to give the same weights bit for bit (docs/reproducibility.md)."""
    return {
        "seed": ctx.config.seed,
        "training_threads": ctx.config.threads,
        "training_device": ctx.config.device,
        "bitwise": ctx.config.device == "cpu",
        "scope": "same seed, thread count, processor, torch and instanas version",
    }


def contract_fields(started: str) -> dict:
    """What identifies a results.json: schema version, package version, code commit, times."""
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "instanas_version": __version__,
        "code": code_commit(),
        "created_at": utc_now(),
        "evaluation_started_at": started,
    }


def comparison(entries: dict[str, dict]) -> dict:
    """InstaNAS against the MobileNetV2 path and the random policy; which variants dominate."""
    inst, base = entries["instanas"], entries["mbv2-path"]
    out = {
        "latency_reduction": 1.0 - inst["latency_ms"]["mean"] / base["latency_ms"]["mean"],
        "accuracy_delta_points": 100.0 * (inst["test_accuracy"] - base["test_accuracy"]),
    }
    if "random-policy" in entries:
        rand = entries["random-policy"]
        out["controller_vs_random_points"] = 100.0 * (inst["test_accuracy"] - rand["test_accuracy"])
        out["random_vs_controller_latency_ratio"] = (
            rand["latency_ms"]["mean"] / inst["latency_ms"]["mean"]
        )
    if "shuffled_routing_accuracy" in inst:
        out["routing_gain_points"] = 100.0 * (
            inst["test_accuracy"] - inst["shuffled_routing_accuracy"]
        )
    if "static-child" in entries:
        static = entries["static-child"]
        out["static_child_points"] = 100.0 * (inst["test_accuracy"] - static["test_accuracy"])
        out["static_child_latency_ratio"] = (
            static["latency_ms"]["mean"] / inst["latency_ms"]["mean"]
        )
    dynamic = [n for n, e in entries.items() if e["kind"] in ("instanas", "variant")]
    widths = [n for n, e in entries.items() if e["kind"] == "mbv2"]
    out["dominating"] = [
        f"{d} beats {w}"
        for d in dynamic
        for w in widths
        if entries[d]["test_accuracy"] > entries[w]["test_accuracy"]
        and entries[d]["latency_ms"]["mean"] < entries[w]["latency_ms"]["mean"]
    ]
    return out


def per_image_arrays(
    ctx: RunContext,
    models: dict[str, Evaluated],
    table: LatencyTable,
    samples: dict[str, list[float]],
    expected_ms: torch.Tensor,
    per_class: int = 8,
) -> PerImage:
    main = models["instanas"]
    predicted = (table.cells_ms(main.policies) + table.fixed_ms()).float()
    labels = ctx.data.test.labels.cpu()
    arrays = {
        "labels": labels.numpy(),
        "predicted_ms": predicted.numpy(),
        "expected_ms": expected_ms.float().numpy(),
        "correct": main.correct.numpy(),
        "policies": main.policies.to(torch.uint8).numpy(),
        "measured_index": np.arange(len(samples["instanas"]), dtype=np.int64),
        "measured_ms": np.asarray(samples["instanas"], dtype=np.float32),
    }
    if "random-policy" in samples:
        arrays["random_measured_ms"] = np.asarray(samples["random-policy"], dtype=np.float32)
    arrays.update(galleries(ctx, predicted, expected_ms, per_class))
    return PerImage(arrays)


def galleries(
    ctx: RunContext, predicted: torch.Tensor, expected: torch.Tensor, per_class: int
) -> dict[str, np.ndarray]:
    """The ``per_class`` cheapest and most expensive test images of each class.

    Ordered by the chosen child's table latency, ties broken by the controller's expected
    latency (sum of module probabilities times module cost), which still ranks images when
    many share one child.
    """
    labels = ctx.data.test.labels.cpu()
    # -1 marks an empty slot (a class with fewer than ``per_class`` test images).
    index = np.full((len(ctx.data.classes), 2, per_class), -1, dtype=np.int64)
    for c in range(len(ctx.data.classes)):
        members = torch.nonzero(labels == c).flatten()
        k = min(per_class, len(members))
        order = np.lexsort((expected[members].numpy(), predicted[members].numpy()))
        ranked = members.numpy()[order]
        index[c, 0, :k] = ranked[:k]
        index[c, 1, :k] = ranked[::-1][:k]
    # Only the gallery's rows: a streamed test split decodes them from disk here.
    picked = images_of(ctx.data.test, torch.from_numpy(np.maximum(index, 0)).flatten())
    images = picked.cpu().numpy().reshape(*index.shape, *picked.shape[1:])
    images[index < 0] = 0
    costs = np.where(index >= 0, predicted.numpy()[np.maximum(index, 0)], np.nan)
    return {
        "gallery_index": index,
        "gallery_images": images,
        "gallery_ms": costs.astype(np.float32),
    }


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
