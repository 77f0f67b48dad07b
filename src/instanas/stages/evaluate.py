"""Evaluation: every model the run has trained, on the test split, timed side by side;
writes results.json, results.md and the per-image data (test_policies.npy,
test_per_image.npz)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..checkpoint import load_checkpoint
from ..deploy.inference import ESCALATION_RULE, escalation_rule, load_network
from ..evaluation.cascade import cascade_curve, rule_latency, shuffled_escalation
from ..evaluation.oracle import oracle
from ..evaluation.results import assemble_results
from ..evaluation.test_passes import (
    Evaluated,
    evaluate_instanas,
    evaluate_random_policy,
    evaluate_static,
    expected_latency,
)
from ..latency.flops import FlopsTable, count_flops
from ..latency.table import LatencyTable
from ..models.metagraph import ChildNetwork, MetaGraph, mbv2_path_network
from ..models.predictor import InstaNASPredictor
from ..report.document import write_results_markdown
from ..run_context import RunContext, run_identity
from ..space import ChildArchitecture
from ..utils import atomic_write_bytes, write_json
from .common import (
    latency_backend,
    latency_table,
    load_candidate,
    load_stage,
    main_model_children,
    new_models,
    stage_path,
)
from .standalone import reference_networks, reference_path


def run(ctx: RunContext) -> dict:
    """Evaluate every model the run has trained; write results.json, .md and the per-image data.
    Everything runs on the CPU, where the latency is measured, whatever the training device."""
    ctx = ctx.on_cpu()
    table = latency_table(ctx)
    metagraph, controller = new_models(ctx)
    load_stage(ctx, "finetune", {"metagraph": metagraph, "controller": controller})
    flops = count_flops(metagraph, controller)
    limit = ctx.config.variants.max_timed_children
    rule = escalation_rule(ctx.run_dir, ctx.space)
    children = main_model_children(ctx, InstaNASPredictor(metagraph.cpu(), controller.cpu()))
    main = evaluate_instanas(ctx, metagraph, controller, table, flops, "instanas", rule, limit,
                             children)  # fmt: skip
    models = {"instanas": main}
    for letter, path in trained_variants(ctx).items():
        graph, ctrl = load_candidate(ctx, path)
        models[f"instanas-{letter}"] = evaluate_instanas(
            ctx, graph, ctrl, table, flops, "variant", limit=limit
        )
    models.update(baseline_models(ctx, table))
    models.update(policy_tuned_models(ctx, table, flops))
    samples = ctx.config.baseline.oracle_children
    oracle_entry = oracle(ctx, metagraph, controller, table, samples) if samples else None
    results, per_image = assemble_results(
        ctx, models, table, oracle_entry, expected_latency(ctx, controller, table),
        latency_backend(ctx), overhead_calls(main),
    )  # fmt: skip
    if rule is not None:
        results["models"]["instanas"]["escalation"] = escalation_entry(ctx, main)
        results["comparison"].update(escalation_comparison(results["models"]["instanas"]))
    results = run_summary(ctx, results)
    write_outputs(ctx, results, per_image.arrays)
    return results


def policy_tuned_models(
    ctx: RunContext, table: LatencyTable, flops: FlopsTable
) -> dict[str, Evaluated]:
    """The random-policy model and the best static child, when the run has trained them."""
    models = {}
    if stage_path(ctx, "random-policy").exists():
        graph, _ = new_models(ctx)
        meta = load_stage(ctx, "random-policy", {"metagraph": graph})
        models["random-policy"] = evaluate_random_policy(
            ctx, graph, float(meta["rate"]), table, flops
        )
    if stage_path(ctx, "static-child").exists():
        models["static-child"] = evaluate_static(
            ctx, static_child_network(ctx), table, "static-child"
        )
    return models


def overhead_calls(main: Evaluated) -> dict:
    """What the main model's deployed path costs beyond its children: the routed graph without
    escalation and each exported child alone, to be timed beside it."""
    predictor = main.predictor.without_escalation()
    calls = {"routed": lambda backend: backend.model_image_call(predictor, main.children)}
    graph = predictor.metagraph
    for k, child in enumerate(main.children):
        network = graph.materialize(child).eval()
        calls[f"child-{k}"] = lambda backend, n=network: backend.model_image_call(n)
    return calls


def escalation_entry(ctx: RunContext, main: Evaluated) -> dict:
    """The escalation on the test split: the share escalated, the child's and the larger
    network's accuracy, the same share escalated at random, and the curve at the validation
    curve's thresholds (latency from the validation timing)."""
    rule = json.loads((ctx.run_dir / ESCALATION_RULE).read_text())
    test = main.test_pass
    confident = test.child_confidence.numpy()
    small, large = test.child_correct.numpy(), test.larger_correct.numpy()
    thresholds = np.array([p["threshold"] for p in rule["validation_curve"]])
    curve = cascade_curve(confident, small, large, rule_latency(rule["timing"]), thresholds)
    generator = np.random.default_rng(ctx.config.seed + 5)
    escalated = test.escalated.numpy()
    return {
        "network": rule["network"],
        "threshold": rule["threshold"],
        "budget_ms": rule["budget_ms"],
        "share": float(escalated.mean()),
        "child_accuracy": float(small.mean()),
        "larger_accuracy": float(large.mean()),
        "shuffled_accuracy": shuffled_escalation(escalated, small, large, generator),
        "validation": rule["validation"],
        "test_curve": [p.to_dict() for p in curve],
        "validation_curve": rule["validation_curve"],
    }


def escalation_comparison(entry: dict) -> dict:
    """The escalation against the same share escalated at random and against no escalation."""
    esc = entry["escalation"]
    return {
        "escalation_gain_points": 100.0 * (entry["test_accuracy"] - esc["shuffled_accuracy"]),
        "escalation_vs_child_points": 100.0 * (entry["test_accuracy"] - esc["child_accuracy"]),
    }


def baseline_models(ctx: RunContext, table: LatencyTable) -> dict[str, Evaluated]:
    """The MobileNetV2 path and the other standalone baselines, evaluated."""
    baseline = mbv2_path_network(ctx.space)
    load_stage(ctx, "baseline", {"network": baseline})
    models = {"mbv2-path": evaluate_static(ctx, baseline, table, "mbv2", width=1.0)}
    for name, net in trained_references(ctx).items():
        kind = "min-net" if name == "min-net" else "mbv2"
        width = None if kind == "min-net" else net.space.width / ctx.space.width
        models[name] = evaluate_static(ctx, net, table, kind, width)
    if stage_path(ctx, "peer").exists():
        peer = load_network(ctx.run_dir, "mbv2-peer", ctx.space)
        models["mbv2-peer"] = evaluate_static(
            ctx, peer, table, "mbv2", peer.space.width / ctx.space.width
        )
        models["mbv2-peer"].entry["peer"] = True
    return models


def run_summary(ctx: RunContext, results: dict) -> dict:
    """The evaluation's results with what the run was: preset, data, seed and budgets."""
    results = {
        "preset": ctx.config.preset,
        "dataset": ctx.config.data.dataset,
        "seed": ctx.config.seed,
        "classes": list(ctx.data.classes),
        **results,
        "epochs": {
            "pretrain": ctx.config.pretrain.epochs,
            "search": ctx.config.search.epochs,
            "finetune": ctx.config.finetune.epochs,
            "baseline": ctx.config.baseline_epochs(),
        },
    }
    candidates = ctx.run_dir / "variants" / "candidates.json"
    if candidates.exists():
        results["variants"] = json.loads(candidates.read_text())
    return results


def write_outputs(ctx: RunContext, results: dict, arrays: dict[str, np.ndarray]) -> None:
    policies = arrays["policies"]
    buffer = io.BytesIO()
    np.save(buffer, policies.reshape(len(policies), -1), allow_pickle=False)
    atomic_write_bytes(ctx.run_dir / "test_policies.npy", buffer.getvalue())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(ctx.run_dir / "test_per_image.npz", buffer.getvalue())
    write_json(ctx.run_dir / "results.json", results)
    write_results_markdown(results, ctx.run_dir / "results.md")


def trained_variants(ctx: RunContext) -> dict[str, Path]:
    """Variant letter -> fine-tuned checkpoint, for the variants the run has finished."""
    if not stage_path(ctx, "variants").exists():
        return {}
    summary = json.loads(stage_path(ctx, "variants").read_text())
    return {letter: ctx.run_dir / v["model"] for letter, v in summary.items()}


def trained_references(ctx: RunContext) -> dict[str, ChildNetwork]:
    """The extra standalone baselines the run has trained, loaded."""
    networks = {}
    for name, net in reference_networks(ctx).items():
        path = reference_path(ctx, name)
        if path.exists():
            load_checkpoint(path, {"network": net}, expect=run_identity(ctx))
            networks[name] = net
    return networks


def static_child_network(ctx: RunContext) -> ChildNetwork:
    """The fine-tuned static child as a standalone network, read from the run."""
    metagraph = MetaGraph(ctx.space)
    meta = load_stage(ctx, "static-child", {"metagraph": metagraph})
    child = ChildArchitecture(tuple(tuple(m) for m in meta["child"]), ctx.space.num_modules)
    return metagraph.materialize(child)
