"""Stage 2: the search, alternating controller epochs and meta-graph epochs (docs/design.md)."""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..distributed import world_size
from ..errors import TrainingError
from ..latency.table import LatencyTable
from ..models.controller import (
    Controller,
    bound_probabilities,
    greedy_policy,
    policy_entropy,
    policy_log_prob,
    sample_policy,
)
from ..models.metagraph import MetaGraph, sparse_plans
from ..nn.batchnorm import batch_statistics
from ..report.diagnostics import near_chance
from ..run_context import RunContext
from ..search.policy import (
    PolicyFn,
    calibrate,
    evaluate_policies,
    greedy_of,
    mix_random_children,
)
from ..search.reward import DualWeight, RewardFunction, budget_target, usage_penalty
from ..training import EpochPlan, accuracy, check_finite, finite_check_due, sgd, supervised_epoch
from ..utils import atomic_copy, progress_bar, write_json
from .common import latency_table, load_stage, new_models, save_stage, stage_path
from .loop import EpochLoop

# The epoch means of the sums ControllerStep returns, as named in metrics.jsonl.
_CONTROLLER_SUMS = ("reward", "sampled_cells_ms", "greedy_cells_ms", "greedy_train_accuracy",
                    "sampled_train_accuracy")  # fmt: skip


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
    """One epoch of controller updates (:class:`ControllerStep`) on the frozen meta-graph (no
    weight updates; BatchNorm as ``search.controller_norm`` says). ``snapshot(part)`` is called
    after the steps where ``search.snapshots_per_epoch`` asks for a checkpoint."""
    cfg = ctx.config.search
    reward_of = RewardFunction(ctx.config.controller, table.bounds(ctx.space.forced_mask()), dual)
    steps = ctx.steps_per_epoch(cfg.batch_size)
    prepare_for_controller_epoch(ctx, metagraph, controller, epoch)
    sampler = ctx.generator("search/controller-sample", epoch)
    step_once = ControllerStep(ctx, metagraph, controller, optimizer, table, reward_of, sampler)
    sums = torch.zeros(5, device=ctx.device)
    seen, start = 0, time.perf_counter()
    data = ctx.generator("search/controller-data", epoch)
    batches = ctx.batches(ctx.data.train, cfg.batch_size, train=True, generator=data)
    snapshot_at = snapshot_steps(steps, cfg.snapshots_per_epoch)
    title = f"search {epoch + 1}/{cfg.epochs} controller"
    for step, batch in enumerate(progress_bar(batches, title, total=steps, unit="batch")):
        sums += step_once(batch.images, batch.labels, (epoch * steps + step) / (cfg.epochs * steps))
        seen += len(batch.labels)
        if snapshot is not None and step in snapshot_at:
            snapshot(snapshot_at[step])
    distributed.average_batchnorm_statistics([controller])
    return {
        **epoch_means(sums, step_once.hard_images, seen),
        **reward_of.describe(),
        "controller_steps": step_once.taken,
        "controller_seconds": time.perf_counter() - start,
    }


def epoch_means(sums: torch.Tensor, hard: torch.Tensor | None, seen: int) -> dict:
    """The epoch's per-image means over every rank: the :class:`ControllerStep` sums and, with
    the difficulty form, the share of images labelled hard."""
    totals = sums if hard is None else torch.cat([sums, hard.view(1)])
    mean = (distributed.all_sum(totals) / (seen * world_size())).tolist()
    return dict(zip(_CONTROLLER_SUMS + ("hard_train_share",), mean))


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


class ControllerStep:
    """One controller update on a batch; returns the batch's sums of (sampled reward, sampled
    and greedy cell latency, greedy and sampled correct predictions)."""

    def __init__(
        self,
        ctx: RunContext,
        metagraph: MetaGraph,
        controller: Controller,
        optimizer: torch.optim.Optimizer,
        table: LatencyTable,
        reward_of: RewardFunction,
        generator: torch.Generator,
    ) -> None:
        self.ctx, self.metagraph, self.controller = ctx, metagraph, controller
        self.optimizer, self.reward_of, self.generator = optimizer, reward_of, generator
        self.module_ms = table.module_ms().to(ctx.device)
        self.steps = ctx.steps_per_epoch(ctx.config.search.batch_size)
        self.taken = 0  # updates so far this epoch
        # The difficulty form: images labelled hard so far this epoch.
        difficulty = ctx.config.controller.form == "difficulty"
        self.hard_images = torch.zeros((), device=ctx.device) if difficulty else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        if self.ctx.config.controller.objective == "imitate":
            return self.imitate(images, labels, progress)
        ccfg = self.ctx.config.controller
        with self.ctx.autocast():
            logits, difficulty = self.controller.logits_and_difficulty(images)
        probs = torch.sigmoid(logits.float())
        bounded = bound_probabilities(probs, ccfg.alpha)
        size = len(labels)
        with torch.no_grad():
            sampled = sample_policy(bounded, self.generator)
            correct, log_prob, latency = self.score(
                images, labels, torch.cat([sampled, greedy_policy(probs)])
            )
            reward = self.reward_of(correct, log_prob, latency, progress)
            advantage = reward[:size] - reward[size:]
        loss = (
            -(policy_log_prob(bounded, sampled) * advantage).sum()
            - ccfg.beta * policy_entropy(bounded, ccfg.entropy).sum()
        ) / size
        if difficulty is not None:
            hard = self.hard(images, labels, correct[size:])
            self.hard_images += hard.sum()
            loss = loss + difficulty_loss(difficulty, hard)
        return self.update(loss, probs, correct, latency, reward, size)

    def hard(self, images: torch.Tensor, labels: torch.Tensor, greedy_correct: torch.Tensor):
        """The difficulty form's target per image (:func:`hard_images`)."""
        target = self.ctx.config.controller.difficulty_target
        if target == "wrong":
            return hard_images(target, greedy_correct)
        every = torch.ones(
            len(labels), *self.module_ms.shape, dtype=torch.bool, device=labels.device
        )
        return hard_images(target, greedy_correct, self.score(images, labels, every)[0])

    def imitate(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        """Each image's best of ``controller.candidates`` sampled children (and the greedy one)
        under the reward becomes its target policy; the loss is the binary cross-entropy of
        the controller's probabilities against it."""
        ccfg = self.ctx.config.controller
        with self.ctx.autocast():
            logits = self.controller.policy_logits(images).float()
        probs = torch.sigmoid(logits)
        size = len(labels)
        with torch.no_grad():
            bounded = bound_probabilities(probs, ccfg.alpha)
            policies = torch.cat(
                [
                    *(sample_policy(bounded, self.generator) for _ in range(ccfg.candidates)),
                    greedy_policy(probs),
                ]
            )
            correct, log_prob, latency = self.score(images, labels, policies)
            reward = self.reward_of(correct, log_prob, latency, progress)
            target = best_children(policies, reward, size).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / size
        # The statistics below describe the first sample and the greedy child.
        first = torch.cat([torch.arange(size), torch.arange(len(policies) - size, len(policies))])
        return self.update(loss, probs, correct[first], latency[first], reward[first], size)

    def score(
        self, images: torch.Tensor, labels: torch.Tensor, policies: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`score_children` on the frozen meta-graph, in the run's precision."""
        with torch.no_grad(), self.ctx.autocast():
            return score_children(self.metagraph, images, labels, policies, self.module_ms,
                                  self.ctx.config.search.controller_norm)  # fmt: skip

    def update(
        self,
        loss: torch.Tensor,
        probs: torch.Tensor,
        correct: torch.Tensor,
        latency: torch.Tensor,
        reward: torch.Tensor,
        size: int,
    ) -> torch.Tensor:
        """Optimiser step and the budget's dual step; the batch's sums for the epoch record."""
        ccfg = self.ctx.config.controller
        if ccfg.usage_floor > 0:
            loss = loss + ccfg.pos_w * usage_penalty(probs, ccfg.usage_floor)
        if finite_check_due(self.ctx.device, self.taken, self.steps):
            check_finite(loss, "controller", "controller.lr")
        self.ctx.optimizer_step(loss, self.optimizer)
        self.taken += 1
        # The budget's dual variable follows the global batch's mean greedy latency.
        self.reward_of.update(distributed.global_mean(latency[size:]))
        return torch.stack(
            [
                reward[:size].sum(),
                latency[:size].sum(),
                latency[size:].sum(),
                correct[size:].float().sum(),
                correct[:size].float().sum(),
            ]
        )


def hard_images(
    target: str, greedy_correct: torch.Tensor, every_correct: torch.Tensor | None = None
) -> torch.Tensor:
    """``controller.difficulty_target``: ``wrong``, the greedy child is wrong; ``helped``, it
    is wrong where the child with every module (``every_correct``) is right, so images more
    modules fix count as hard and those no child gets right do not."""
    if target == "wrong":
        return ~greedy_correct
    if target == "helped" and every_correct is not None:
        return ~greedy_correct & every_correct
    raise ValueError(f"difficulty target {target!r} needs: wrong, or helped with every_correct")


def difficulty_loss(difficulty: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the controller's difficulty logits against ``hard``."""
    return F.binary_cross_entropy_with_logits(difficulty.float(), hard.float())


def best_children(policies: torch.Tensor, reward: torch.Tensor, size: int) -> torch.Tensor:
    """Per image, the candidate policy with the highest reward; ``policies`` [K*size, ...] and
    ``reward`` [K*size] stack K candidate sets for the same ``size`` images."""
    best = reward.view(-1, size).argmax(0)
    return policies.view(-1, size, *policies.shape[1:])[best, torch.arange(size)]


def sampled_of(controller: Controller, alpha: float, generator: torch.Generator) -> PolicyFn:
    """The controller's sampled (bounded) policies, as a policy function."""
    return lambda images: sample_policy(bound_probabilities(controller(images), alpha), generator)


def score_children(
    metagraph: MetaGraph,
    images: torch.Tensor,
    labels: torch.Tensor,
    policies: torch.Tensor,
    module_ms: torch.Tensor,
    norm: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correctness, log-likelihood of the label and table cell latency of ``policies``: one or
    more sets of children for ``images``, stacked ([sampled; greedy], or K samples and greedy)."""
    resolved = metagraph.resolve(policies)
    size = len(labels)
    sets = len(policies) // size
    if norm == "running":  # rows are independent: one forward for every set
        logits = metagraph(torch.cat([images] * sets), resolved)
    else:
        # One forward per set, so each set of children is normalised with its own statistics;
        # what sparse execution needs of every set is read from the device at once.
        parts = resolved.view(sets, size, *resolved.shape[1:])
        plans = sparse_plans(parts)
        with batch_statistics(metagraph):
            logits = torch.cat([metagraph(images, p, plan=plan) for p, plan in zip(parts, plans)])
    targets = torch.cat([labels] * sets)
    log_prob = torch.log_softmax(logits.float(), 1).gather(1, targets[:, None]).squeeze(1)
    return (logits.argmax(1) == targets, log_prob, (resolved.float() * module_ms).flatten(1).sum(1))


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
    return budget_target(
        table.bounds(ctx.space.forced_mask()), 1.0, ccfg.budget, ccfg.budget_warmup
    )


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
    state = {"history": [], "latency_weight": 0.0}
    loop = EpochLoop("search", cfg.epochs, modules, optimizers, state=state)
    dual = DualWeight()

    def train_epoch(epoch: int) -> dict:
        dual.value = loop.state["latency_weight"]
        dual.proportional = loop.state.get("latency_weight_p", 0.0)
        snapshot = snapshotter(ctx, metagraph, controller, epoch)
        record = controller_epoch(
            ctx, metagraph, controller, ctrl_opt, table, epoch, dual, snapshot
        )
        record.update(metagraph_epoch(ctx, metagraph, controller, graph_opt, epoch))
        record.update(validate_epoch(ctx, metagraph, controller, table, epoch))
        loop.state["history"].append({"stage": "search", "epoch": epoch + 1, **record})
        loop.state["latency_weight"] = dual.value
        loop.state["latency_weight_p"] = dual.proportional
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
