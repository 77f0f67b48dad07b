"""Stage 2: the search, alternating controller epochs and meta-graph epochs (docs/design.md)."""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch

from .. import distributed
from ..errors import TrainingError
from ..latency.table import LatencyTable
from ..models.controller import (
    Controller,
    bound_probabilities,
    sample_policy,
)
from ..models.metagraph import MetaGraph
from ..report.diagnostics import near_chance
from ..run_context import RunContext
from ..search.controller_step import StepSums, controller_step
from ..search.policy import (
    calibrate,
    evaluate_policies,
    greedy_of,
    mix_random_children,
    sampled_of,
)
from ..search.reward import DualWeight, RewardFunction, budget_target
from ..training import EpochPlan, accuracy, sgd, supervised_epoch
from ..utils import atomic_copy, progress_bar, write_json
from .common import latency_table, load_stage, new_models, save_stage, stage_path
from .loop import EpochLoop


def controller_epoch(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    optimizer: torch.optim.Optimizer,
    table: LatencyTable,
    epoch: int,
    dual: DualWeight,
    snapshot: Callable[[int], None] | None = None,
) -> dict:
    """One epoch of controller steps (search/controller_step.py) on the frozen meta-graph
    (BatchNorm as ``search.controller_norm`` says); ``snapshot(part)`` is called after the
    steps where ``search.snapshots_per_epoch`` asks for a checkpoint."""
    cfg = ctx.config.search
    reward_of = RewardFunction(ctx.config.controller, table.bounds(ctx.space), dual)
    steps = ctx.steps_per_epoch(cfg.batch_size)
    prepare_for_controller_epoch(ctx, metagraph, controller, epoch)
    sampler = ctx.generator("search/controller-sample", epoch)
    args = (ctx, metagraph, controller, optimizer, table.module_ms(), reward_of, sampler)
    step_once = controller_step(*args)
    sums = StepSums.zeros(ctx.device)
    seen, start = 0, time.perf_counter()
    data = ctx.generator("search/controller-data", epoch)
    batches = ctx.batches(ctx.data.train, cfg.batch_size, train=True, generator=data)
    snapshot_at = snapshot_steps(steps, cfg.snapshots_per_epoch)
    title = f"search {epoch + 1}/{cfg.epochs} controller"
    for step, batch in enumerate(progress_bar(batches, title, total=steps, unit="batch")):
        sums.add(
            step_once(batch.images, batch.labels, (epoch * steps + step) / (cfg.epochs * steps))
        )
        seen += len(batch.labels)
        if snapshot is not None and step in snapshot_at:
            snapshot(snapshot_at[step])
    distributed.average_batchnorm_statistics([controller])
    return {
        **sums.epoch_means(seen, step_once.hard_count),
        **reward_of.describe(),
        "controller_steps": step_once.taken,
        "controller_seconds": time.perf_counter() - start,
    }


def prepare_for_controller_epoch(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, epoch: int
) -> None:
    """Frozen meta-graph in eval mode (statistics as ``search.controller_norm`` says), the
    controller in training mode."""
    if ctx.config.search.controller_norm == "running":
        running_statistics_for_samples(ctx, metagraph, controller, epoch)
    metagraph.eval()
    controller.train()


def running_statistics_for_samples(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, epoch: int
) -> None:
    """``search.controller_norm running``: BatchNorm statistics re-estimated once per epoch
    under the controller's sampled policies. (``batch``, the default, normalises each forward
    with its own statistics and leaves the running ones untouched.)"""
    controller.eval()
    sampler = ctx.generator("search/controller-norm", epoch)
    policies = sampled_of(controller, ctx.config.controller.alpha, sampler)
    calibrate(ctx, metagraph, policies, purpose="search/controller-norm", epoch=epoch)


def snapshot_steps(steps: int, parts: int) -> dict[int, int]:
    """{step index: part} for the ``parts - 1`` checkpoints evenly inside an epoch of ``steps``."""
    at = {max(round(k * steps / parts) - 1, 0): k for k in range(1, parts)}
    return {step: part for step, part in at.items() if step < steps - 1}


def metagraph_epoch(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    optimizer: torch.optim.Optimizer,
    epoch: int,
) -> dict:
    """Train the meta-graph on the controller's sampled policies, shuffled across the batch."""
    cfg, alpha = ctx.config.search, ctx.config.controller.alpha
    controller.eval()
    gen = ctx.generator("search/metagraph-policies", epoch)

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        with torch.no_grad():
            policy = sample_policy(bound_probabilities(controller(images).float(), alpha), gen)
            # Shuffling decouples image and child, so every child is trained on all kinds of
            # images instead of co-adapting with the controller's current assignment.
            policy = policy[torch.randperm(len(policy), generator=gen).to(policy.device)]
            if cfg.random_share > 0:
                policy = mix_random_children(policy, cfg.random_share, gen)
        return metagraph(images, policy)

    metagraph.train()
    plan = EpochPlan("search", cfg.epochs, cfg.batch_size, cfg.metagraph_lr, "search.metagraph_lr")
    stats = supervised_epoch(ctx, metagraph, forward, optimizer, plan, epoch)
    return {
        "metagraph_loss": stats.loss,
        "metagraph_train_accuracy": stats.accuracy,
        "metagraph_steps": stats.steps,
        "metagraph_seconds": stats.seconds,
    }


def select_epoch(
    history: list[dict],
    tolerance: float,
    budget_cells_ms: float | None = None,
    prefer: str = "fastest",
) -> dict:
    """The epoch whose validation accuracy is near the best: the fastest of them (validation
    table latency) or, with ``prefer="latest"``, the one trained longest.

    With ``budget_cells_ms`` (the budget reward) only epochs whose validation cell latency
    is within 5% of the budget compete (the fastest epoch if none is): an early epoch that
    runs every module would otherwise win on accuracy.
    """
    if budget_cells_ms is not None:
        within = [h for h in history if h["val_cells_ms"] <= 1.05 * budget_cells_ms]
        history = within or [min(history, key=lambda h: h["val_cells_ms"])]
    best = max(h["val_accuracy"] for h in history)
    eligible = [h for h in history if h["val_accuracy"] >= best - tolerance]
    if prefer == "latest":
        return max(eligible, key=lambda h: h["epoch"])
    return min(eligible, key=lambda h: (h["val_total_ms"], -h["val_accuracy"]))


def final_budget(ctx: RunContext, table: LatencyTable) -> float | None:
    """The budget reward's target cell latency once warmed up (None for the window reward)."""
    ccfg = ctx.config.controller
    if ccfg.reward != "budget":
        return None
    return budget_target(table.bounds(ctx.space), 1.0, ccfg.budget, ccfg.budget_warmup)


def refuse_weak_metagraph(ctx: RunContext, metagraph: MetaGraph) -> None:
    """Stop before searching on a meta-graph that is near chance on validation: the controller
    would learn nothing but which children are cheapest."""
    metagraph.eval()
    value = accuracy(ctx, metagraph, ctx.data.val)
    if near_chance(value, len(ctx.data.classes), ctx.config.search.min_pretrain_accuracy):
        raise TrainingError(
            f"search: the pretrained meta-graph is near chance on validation ({100 * value:.1f}% "
            f"with every module on, chance {100 / len(ctx.data.classes):.1f}%): pretrain longer, "
            f"e.g. `instanas pretrain --output NEW_DIR --pretrain.epochs "
            f"{2 * ctx.config.pretrain.epochs}` (or more), then search there; "
            "--search.min_pretrain_accuracy 0 searches anyway"
        )


def search(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable
) -> tuple[MetaGraph, Controller]:
    cfg = ctx.config.search
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    ctrl_opt = torch.optim.Adam(controller.parameters(), lr=ctx.config.controller.lr)
    graph_opt = sgd(metagraph.parameters(), cfg.metagraph_lr, cfg.weight_decay)
    # The history of every epoch and the budget reward's latency weight go on across a resume.
    modules = {"metagraph": metagraph, "controller": controller}
    optimizers = {"controller": ctrl_opt, "metagraph": graph_opt}
    dual = DualWeight()
    loop = EpochLoop(
        "search", cfg.epochs, modules, optimizers, state={"history": []}, stateful=(dual,)
    )

    def train_epoch(epoch: int) -> dict:
        snapshot = snapshotter(ctx, metagraph, controller, epoch)
        record = controller_epoch(
            ctx, metagraph, controller, ctrl_opt, table, epoch, dual, snapshot
        )
        record.update(metagraph_epoch(ctx, metagraph, controller, graph_opt, epoch))
        record.update(validate_epoch(ctx, metagraph, controller, table, epoch))
        loop.state["history"].append({"stage": "search", "epoch": epoch + 1, **record})
        return record

    def write_output() -> None:
        write_selection(ctx, loop.state["history"], table)

    loop.run(ctx, train_epoch, write_output,
             on_fresh_start=partial(refuse_weak_metagraph, ctx, metagraph))  # fmt: skip
    return metagraph, controller


def snapshotter(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, epoch: int
) -> Callable[[int], None]:
    """Saves the checkpoints ``search.snapshots_per_epoch`` asks for inside ``epoch``."""

    def snapshot(part: int) -> None:
        save_stage(
            ctx,
            ctx.run_dir / "search" / f"epoch_{epoch + 1:03d}_part{part}.safetensors",
            {"metagraph": metagraph, "controller": controller},
            {"stage": "search", "epoch": epoch + 1, "part": part},
        )

    return snapshot


def validate_epoch(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable, epoch: int
) -> dict:
    """Greedy children on the validation split (BatchNorm recalibrated for them); saves the
    epoch's checkpoint, a candidate for the selection and for the variants."""
    controller.eval()
    calibrate(ctx, metagraph, greedy_of(controller), purpose="search/recalibrate-val", epoch=epoch)
    val, _ = evaluate_policies(ctx, metagraph, greedy_of(controller), table, ctx.data.val)
    checkpoint = f"search/epoch_{epoch + 1:03d}.safetensors"
    save_stage(
        ctx,
        ctx.run_dir / checkpoint,
        {"metagraph": metagraph, "controller": controller},
        {"stage": "search", "epoch": epoch + 1},
    )
    return {
        "val_accuracy": val.accuracy,
        "val_cells_ms": val.cells_ms,
        "val_total_ms": val.total_ms,
        "val_distinct_children": val.distinct_children,
        "val_effective_children": val.effective_children,
        "val_top_child_share": val.top_child_share,
        "val_mean_active_modules": val.mean_active_modules,
        "checkpoint": checkpoint,
    }


def write_selection(ctx: RunContext, history: list[dict], table: LatencyTable) -> None:
    """search/selected.json, and the selected checkpoint as the stage's output."""
    cfg = ctx.config.search
    chosen = select_epoch(history, cfg.select_tolerance, final_budget(ctx, table), cfg.select)
    write_json(
        ctx.run_dir / "search" / "selected.json",
        {
            "chosen": chosen,
            "tolerance": cfg.select_tolerance,
            "prefer": cfg.select,
            "history": history,
        },
    )
    # Last: the selected checkpoint is what marks the stage as done.
    atomic_copy(ctx.run_dir / chosen["checkpoint"], stage_path(ctx, "search"))


def run(ctx: RunContext) -> tuple[MetaGraph, Controller]:
    metagraph, controller = new_models(ctx)
    load_stage(ctx, "pretrain", {"metagraph": metagraph})
    return search(ctx, metagraph, controller, latency_table(ctx))
