"""Stage 2: the search, alternating controller epochs and meta-graph epochs (spec section 6.2)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..controller import (
    Controller,
    bound_probabilities,
    greedy_policy,
    policy_entropy,
    policy_log_prob,
    sample_policy,
)
from ..latency import LatencyTable
from ..metagraph import MetaGraph
from ..policy import calibrate, evaluate_policies, greedy_of
from ..reward import instance_reward, window_bounds
from ..training import RunContext, batch_statistics, check_finite, sgd, supervised_epoch
from ..utils import atomic_copy, progress_bar, write_json
from .common import save_stage, stage_path
from .resume import EpochCheckpoints


def controller_epoch(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
                     optimizer: torch.optim.Optimizer, table: LatencyTable, epoch: int,
                     snapshot: Callable[[int], None] | None = None) -> dict:
    """REINFORCE with a self-critical (greedy) baseline; the meta-graph is frozen.

    Frozen means no weight updates and untouched running statistics; BatchNorm normalises with
    batch statistics, because the controller's policies move every step and running statistics
    from any fixed policy distribution would misjudge the children it is now sampling.
    ``snapshot(part)`` is called after the steps where ``search.snapshots_per_epoch`` asks for a
    checkpoint inside the epoch.
    """
    cfg, ccfg = ctx.config.search, ctx.config.controller
    metagraph.eval()
    controller.train()
    module_ms = table.module_ms().to(ctx.device)
    bounds = table.bounds(ctx.space.forced_mask())
    steps = ctx.steps_per_epoch(cfg.batch_size)
    sample_gen = ctx.generator("search/controller-sample", epoch)
    sums = torch.zeros(4, device=ctx.device)
    seen = 0
    start = time.perf_counter()
    batches = ctx.batches(ctx.data.train, cfg.batch_size, train=True,
                          generator=ctx.generator("search/controller-data", epoch))
    snapshot_at = snapshot_steps(steps, cfg.snapshots_per_epoch)
    for step, batch in enumerate(progress_bar(batches, f"search {epoch + 1}/{cfg.epochs} "
                                              "controller", total=steps, unit="batch")):
        # Window position advances per step so short searches still sweep the whole schedule.
        lower, upper = window_bounds(bounds, (epoch * steps + step) / (cfg.epochs * steps),
                                     ccfg.window)
        probs = controller(batch.images)
        bounded = bound_probabilities(probs, ccfg.alpha)
        size = len(batch.labels)
        with torch.no_grad(), batch_statistics(metagraph):
            sampled = sample_policy(bounded, sample_gen)
            greedy = greedy_policy(probs)
            both = metagraph.resolve(torch.cat([sampled, greedy]))
            # Two forwards, so each set of children is normalised with its own statistics.
            logits = torch.cat([metagraph(batch.images, both[:size]),
                                metagraph(batch.images, both[size:])])
            correct = logits.argmax(1) == torch.cat([batch.labels, batch.labels])
            latency = (both.float() * module_ms).flatten(1).sum(1)
            reward = instance_reward(correct, latency, lower, upper, ccfg.pos_w, ccfg.neg_w)
            advantage = reward[:size] - reward[size:]
        loss = (-(policy_log_prob(bounded, sampled) * advantage).sum()
                - ccfg.beta * policy_entropy(bounded).sum()) / size
        check_finite(loss, "controller")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([reward[:size].sum(), latency[:size].sum(), latency[size:].sum(),
                             correct[size:].float().sum()])
        seen += size
        if snapshot is not None and step in snapshot_at:
            snapshot(snapshot_at[step])
    mean = (sums / seen).tolist()
    return {"reward": mean[0], "sampled_cells_ms": mean[1], "greedy_cells_ms": mean[2],
            "greedy_train_accuracy": mean[3], "window_lower_ms": lower, "window_upper_ms": upper,
            "controller_seconds": time.perf_counter() - start}


def snapshot_steps(steps: int, parts: int) -> dict[int, int]:
    """{step index: part} for the ``parts - 1`` checkpoints evenly inside an epoch of ``steps``."""
    at = {max(round(k * steps / parts) - 1, 0): k for k in range(1, parts)}
    return {step: part for step, part in at.items() if step < steps - 1}


def metagraph_epoch(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
                    optimizer: torch.optim.Optimizer, epoch: int) -> dict:
    """Train the meta-graph on the controller's sampled policies, shuffled across the batch."""
    cfg, alpha = ctx.config.search, ctx.config.controller.alpha
    controller.eval()
    gen = ctx.generator("search/metagraph-policies", epoch)

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        with torch.no_grad():
            policy = sample_policy(bound_probabilities(controller(images), alpha), gen)
            # Shuffling decouples image and child, so every child is trained on all kinds of
            # images instead of co-adapting with the controller's current assignment.
            policy = policy[torch.randperm(len(policy), generator=gen).to(policy.device)]
        return metagraph(images, policy)

    metagraph.train()
    stats = supervised_epoch(ctx, forward, optimizer, base_lr=cfg.metagraph_lr,
                             lr_factor=lambda p: 1.0, epoch=epoch, epochs=cfg.epochs,
                             batch_size=cfg.batch_size, stage="search")
    return {"metagraph_loss": stats.loss, "metagraph_train_accuracy": stats.accuracy,
            "metagraph_seconds": stats.seconds}


def select_epoch(history: list[dict], tolerance: float) -> dict:
    """Fastest epoch (validation table latency) whose validation accuracy is near the best."""
    best = max(h["val_accuracy"] for h in history)
    eligible = [h for h in history if h["val_accuracy"] >= best - tolerance]
    return min(eligible, key=lambda h: (h["val_total_ms"], -h["val_accuracy"]))


def search(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
           table: LatencyTable) -> tuple[MetaGraph, Controller]:
    cfg = ctx.config.search
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    ctrl_opt = torch.optim.Adam(controller.parameters(), lr=ctx.config.controller.lr)
    graph_opt = sgd(metagraph.parameters(), cfg.metagraph_lr, cfg.weight_decay)
    folder = ctx.run_dir / "search"
    checkpoints = EpochCheckpoints(ctx, "search",
                                   {"metagraph": metagraph, "controller": controller},
                                   {"controller": ctrl_opt, "metagraph": graph_opt})
    start, saved = checkpoints.restore()
    history = saved.get("history", [])
    for epoch in range(start, cfg.epochs):
        record = {"stage": "search", "epoch": epoch + 1}

        def snapshot(part: int, epoch: int = epoch) -> None:
            save_stage(ctx, folder / f"epoch_{epoch + 1:03d}_part{part}.safetensors",
                       {"metagraph": metagraph, "controller": controller},
                       {"stage": "search", "epoch": epoch + 1, "part": part})

        record.update(controller_epoch(ctx, metagraph, controller, ctrl_opt, table, epoch,
                                       snapshot))
        record.update(metagraph_epoch(ctx, metagraph, controller, graph_opt, epoch))
        controller.eval()
        calibrate(ctx, metagraph, greedy_of(controller), purpose="search/recalibrate-val",
                  epoch=epoch)
        val, _ = evaluate_policies(ctx, metagraph, greedy_of(controller), table, ctx.data.val)
        record.update({"val_accuracy": val.accuracy, "val_cells_ms": val.cells_ms,
                       "val_total_ms": val.total_ms, "val_distinct_children": val.distinct_children,
                       "val_mean_active_modules": val.mean_active_modules,
                       "checkpoint": f"search/epoch_{epoch + 1:03d}.safetensors"})
        save_stage(ctx, ctx.run_dir / record["checkpoint"],
                   {"metagraph": metagraph, "controller": controller},
                   {"stage": "search", "epoch": epoch + 1})
        ctx.log_metrics(record)
        history.append(record)
        checkpoints.save(epoch + 1, {"history": history})
    chosen = select_epoch(history, cfg.select_tolerance)
    write_json(folder / "selected.json", {"chosen": chosen, "tolerance": cfg.select_tolerance,
                                          "history": history})
    # Last: the selected checkpoint is what marks the stage as done.
    atomic_copy(ctx.run_dir / chosen["checkpoint"], stage_path(ctx, "search"))
    checkpoints.finish()
    return metagraph, controller
