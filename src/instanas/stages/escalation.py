"""Escalation: the threshold below which the routed child's answer is replaced by the larger
network's, chosen on the validation split to the latency budget (``escalation.*``).

On the validation split the fine-tuned model answers every image with its routed child; the
child's confidence (top softmax probability) and whether the child and the larger network are
right are kept per image. The deployed latency comes from the run's latency backend, timed on
validation images side by side on a stream: the deployed graph that never escalates (its
escalation test included), the one that always does, the MobileNetV2 path, and the graph at
thresholds that escalate a few shares of the images. A threshold that escalates a share s of
the images costs what the timed points say, interpolated between them (an image that escalates
now and then finds the larger network's weights cold). Every candidate threshold is kept
(``escalation/rule.json``); the most accurate within ``budget`` x the MobileNetV2 path's
latency becomes the rule that the evaluation, ``instanas.load`` and ``instanas export`` use.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..deploy.inference import ESCALATION_RULE, load_network
from ..evaluation.cascade import (
    cascade_curve,
    choose_threshold,
    confidence,
    rule_latency,
    share_thresholds,
)
from ..latency.side_by_side import measure_per_image
from ..models.predictor import Escalation, InstaNASPredictor
from ..run_context import RunContext
from ..utils import write_json
from .common import (
    finetuned_predictor,
    latency_backend,
    validation_children,
    validation_images,
)

log = logging.getLogger("instanas")
# Thresholds no softmax probability reaches from below (never escalate) or always stays under.
NEVER, ALWAYS = 0.0, 1.5


def run(ctx: RunContext) -> dict:
    ctx = ctx.on_cpu()
    cfg = ctx.config.escalation
    predictor = finetuned_predictor(ctx, escalate=False)
    larger = load_network(ctx.run_dir, cfg.network, ctx.space).deploy().eval()
    small_conf, small_correct, large_correct = validation_answers(ctx, predictor, larger)
    timing = deployed_costs(ctx, predictor, larger, small_conf)
    curve = cascade_curve(small_conf, small_correct, large_correct, rule_latency(timing))
    budget_ms = cfg.budget * timing["mbv2_path_ms"]
    chosen = choose_threshold(curve, budget_ms)
    rule = {
        "network": cfg.network,
        "threshold": chosen.threshold,
        "budget": cfg.budget,
        "budget_ms": budget_ms,
        "within_budget": chosen.latency_ms <= budget_ms,
        "validation": chosen.to_dict(),
        "validation_curve": [p.to_dict() for p in curve],
        "timing": timing,
        "backend": latency_backend(ctx).name,
    }
    write_json(ctx.run_dir / ESCALATION_RULE, rule)
    log.info(
        "escalation: threshold %.3f escalates %.1f%% of validation images to %s, accuracy "
        "%.2f%%, %.3f ms against a budget of %.3f ms (%.2f x the MobileNetV2 path)",
        chosen.threshold, 100 * chosen.share, cfg.network, 100 * chosen.accuracy,
        chosen.latency_ms, budget_ms, cfg.budget,
    )  # fmt: skip
    return rule


@torch.inference_mode()
def validation_answers(
    ctx: RunContext, predictor: InstaNASPredictor, larger: torch.nn.Module
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per validation image: the child's confidence, whether the child is right, whether the
    larger network is right."""
    conf, small, large = [], [], []
    for batch in ctx.batches(ctx.data.val, 500, train=False):
        images = batch.images.cpu().contiguous()
        labels = batch.labels.cpu()
        logits, _, _ = predictor.answer(images)
        conf.append(confidence(torch.softmax(logits, 1).numpy()))
        small.append((logits.argmax(1) == labels).numpy())
        large.append((larger(images).argmax(1) == labels).numpy())
    return np.concatenate(conf), np.concatenate(small), np.concatenate(large)


# Shares of the timed images escalated in the timing that prices an escalated image.
COST_SHARES = (0.05, 0.1, 0.2)


def deployed_costs(
    ctx: RunContext, predictor: InstaNASPredictor, larger: torch.nn.Module, confident: np.ndarray
) -> dict:
    """Mean deployed batch-1 latency (ms) on a stream of validation images, timed side by side:
    the model that never escalates, the one that always does, the MobileNetV2 path, and the
    model at the thresholds that escalate ``COST_SHARES`` of the timed images; ``share_points``
    holds (share escalated, ms) for all of them. On a stream the larger network runs now and
    then, its weights cold, so a few escalated images cost more each than when it answers every
    image: the latency between shares is interpolated between measured points, not along the
    line from never to always. ``timing_passes``: the timing's passes (a disturbed one is timed
    again, ``latency.noisy_retries``)."""
    backend = latency_backend(ctx)
    children = validation_children(ctx, predictor, ctx.config.variants.max_timed_children)
    mbv2_path = load_network(ctx.run_dir, "mbv2-path", ctx.space)
    images = validation_images(ctx, ctx.config.escalation.timed_images)
    timed_conf = confident[: len(images)]
    thresholds = {"never": NEVER, "always": ALWAYS}
    # One threshold per share (share_thresholds drops repeats, which would misalign a zip).
    thresholds.update({f"share_{s:g}": float(share_thresholds(timed_conf, (s,))[0])
                       for s in COST_SHARES})  # fmt: skip
    calls = {name: backend.model_image_call(
                 with_escalation(predictor, Escalation(larger, t)), children)
             for name, t in thresholds.items()}  # fmt: skip
    calls["mbv2_path"] = backend.model_image_call(mbv2_path)
    cfg = ctx.config.latency
    passes: list[dict] = []
    measured = measure_per_image(calls, images, cfg.threads, cfg.warmup, ctx.config.seed,
                                 burst=backend.burst, retries=cfg.noisy_retries,
                                 passes_out=passes)  # fmt: skip
    costs = {f"{name}_ms": stats["mean"] for name, stats in measured.items()}
    costs["timing_passes"] = passes
    shares = [float((timed_conf < thresholds[f"share_{s:g}"]).mean()) for s in COST_SHARES]
    costs["share_points"] = [[0.0, costs["never_ms"]], [1.0, costs["always_ms"]]] + [
        [share, costs[f"share_{s:g}_ms"]] for share, s in zip(shares, COST_SHARES)
    ]
    return costs


def with_escalation(predictor: InstaNASPredictor, escalation: Escalation) -> InstaNASPredictor:
    """The same routed model with another escalation rule (weights shared)."""
    other = predictor.without_escalation()
    other.escalation = escalation
    other.larger = escalation.network
    return other
