"""Final numbers on the test set: accuracy, table and measured batch-1 latency, FLOPs, children."""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from .controller import Controller
from .inference import InstaNASPredictor
from .latency import LatencyTable, TimingStats, count_flops, cpu_threads, device_info
from .metagraph import ChildNetwork, MetaGraph, mobilenetv2_path
from .space import distinct_children
from .training import RunContext
from .utils import progress_bar


def latency_summary(samples_ms: list[float]) -> dict:
    stats = TimingStats.from_samples(samples_ms)
    return {"mean": stats.mean_ms, "std": stats.std_ms, "p50": stats.median_ms,
            "p90": stats.p90_ms, "images": stats.repeats}


def measure_per_image(models: dict[str, Callable[[torch.Tensor], object]], images: torch.Tensor,
                      threads: int, warmup: int, seed: int = 0) -> dict[str, dict]:
    """Wall-clock per image at batch 1, the models interleaved image by image (same conditions)."""
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(seed)
    with cpu_threads(threads), torch.inference_mode():
        for i in range(min(warmup, len(images))):
            for name in names:
                models[name](images[i:i + 1])
        for i in progress_bar(range(len(images)), desc="batch-1 latency", unit="image"):
            x = images[i:i + 1]
            order.shuffle(names)
            for name in names:
                start = time.perf_counter_ns()
                models[name](x)
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {n: latency_summary(s) for n, s in samples.items()}


@torch.no_grad()
def instanas_test_pass(ctx: RunContext, predictor: InstaNASPredictor
                       ) -> tuple[float, torch.Tensor]:
    """Batched greedy evaluation: accuracy and resolved policies [N, cells, modules]."""
    correct, policies = 0, []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        logits, policy = predictor.logits(batch.images.contiguous())
        correct += int((logits.argmax(1) == batch.labels).sum())
        policies.append(policy.cpu())
    return correct / len(ctx.data.test), torch.cat(policies)


@torch.no_grad()
def baseline_test_accuracy(ctx: RunContext, network: torch.nn.Module) -> float:
    correct = 0
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        correct += int((network(batch.images.contiguous()).argmax(1) == batch.labels).sum())
    return correct / len(ctx.data.test)


def evaluate(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
             baseline: ChildNetwork, table: LatencyTable) -> tuple[dict, torch.Tensor]:
    """Test-set results (the ``results.json`` contract) and the resolved test policies.

    Latency is measured on the CPU of this machine with ``latency.threads`` threads.
    """
    cfg = ctx.config.latency
    metagraph, controller, baseline = (m.cpu().eval() for m in (metagraph, controller, baseline))
    predictor = InstaNASPredictor(metagraph, controller)
    deployed_baseline = baseline.deploy()
    accuracy, policies = instanas_test_pass(ctx, predictor)
    baseline_accuracy = baseline_test_accuracy(ctx, deployed_baseline)
    flops = count_flops(metagraph, controller)
    mbv2_policy = metagraph.resolve(mobilenetv2_path(ctx.space).to_policy().unsqueeze(0))

    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.test, 1000, train=False)])
    if cfg.eval_images:
        images = images[:cfg.eval_images]
    measured = measure_per_image({"instanas": predictor.logits_one,
                                  "mbv2-path": deployed_baseline},
                                 images.contiguous(), cfg.threads, cfg.warmup, ctx.config.seed)
    models = {
        "instanas": {
            "test_accuracy": accuracy,
            "latency_ms": measured["instanas"],
            "table_latency_ms": float(table.cells_ms(policies).mean()) + table.fixed_ms(),
            "flops": float(flops.per_image(policies).mean()),
            "distinct_children": distinct_children([policies]),
            "mean_active_modules": float(policies.sum(dim=(1, 2)).float().mean()),
        },
        "mbv2-path": {
            "test_accuracy": baseline_accuracy,
            "latency_ms": measured["mbv2-path"],
            "table_latency_ms": float(table.cells_ms(mbv2_policy)[0])
            + table.fixed_ms(include_controller=False),
            "flops": float(flops.per_image(mbv2_policy, include_controller=False)[0]),
            "distinct_children": 1,
            "mean_active_modules": float(mbv2_policy.sum()),
        },
    }
    inst, base = models["instanas"], models["mbv2-path"]
    return {
        "device": device_info(torch.device("cpu"), cfg.threads),
        "models": models,
        "comparison": {
            "latency_reduction": 1.0 - inst["latency_ms"]["mean"] / base["latency_ms"]["mean"],
            "accuracy_delta_points": 100.0 * (inst["test_accuracy"] - base["test_accuracy"]),
        },
        "latency_table": {"stem_ms": table.unit_ms("stem"), "head_ms": table.unit_ms("head"),
                          "controller_ms": table.unit_ms("controller"),
                          "chain_factor": table.chain_factor},
        "test_images": len(ctx.data.test),
    }, policies
