"""results.json as a whole: every evaluated model timed side by side at batch 1, the
comparison between them, what identifies the file and the run, and the per-image arrays behind
the plots (test_per_image.npz).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..data import images_of
from ..latency.backends import Backend, ImageCall, backend_info
from ..latency.side_by_side import measure_per_image
from ..latency.table import LatencyTable
from ..latency.timing import device_info
from ..provenance import code_commit, utc_now
from ..report.schema import RESULTS_SCHEMA_VERSION
from ..run_context import RunContext
from ..space import nearest_child, ranked_children
from ..version import __version__
from .test_passes import Evaluated


@dataclass
class PerImage:
    """Arrays behind the plots (saved as test_per_image.npz)."""

    arrays: dict[str, np.ndarray]


def assemble_results(
    ctx: RunContext,
    models: dict[str, Evaluated],
    table: LatencyTable,
    oracle_entry: dict | None,
    expected_ms: torch.Tensor,
    backend: Backend,
    overhead: dict[str, Callable[[Backend], ImageCall]] | None = None,
) -> tuple[dict, PerImage]:
    """Time every model side by side (``time_models``) and assemble the ``results.json``
    contract. ``overhead`` holds the main model's parts (its routed graph without escalation,
    each exported child alone), from which the cost of the controller and the routing is read.
    ``models`` must contain ``instanas`` and ``mbv2-path``; ``expected_ms`` is the main
    controller's expected latency per test image (it orders the galleries)."""
    cfg = ctx.config.latency
    started = utc_now()
    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.test, 1000, train=False)])
    timed = (images[: cfg.eval_images] if cfg.eval_images else images).contiguous()
    samples: dict[str, list[float]] = {}
    passes: list[dict] = []
    measured, eager = time_models(ctx, models, backend, overhead or {}, timed, samples, passes)
    entries = {name: model_entry(m, measured.get(name), eager, name, backend.name,
                                 len(ctx.data.test)) for name, m in models.items()}  # fmt: skip
    entries.update({"oracle": oracle_entry} if oracle_entry is not None else {})
    results = {
        **contract_fields(started),
        "device": device_info(torch.device("cpu"), cfg.threads, backend_info(backend)),
        "models": entries,
        "comparison": comparison(entries),
        "latency_table": table_summary(table),
        "test_images": len(ctx.data.test),
        "timed_images": len(timed),
        "timing_passes": passes,
        "reproducibility": reproducibility(ctx),
    }
    if overhead:
        results["deployed_overhead"] = overhead_summary(measured, models["instanas"])
    return results, per_image_arrays(ctx, models, table, samples, expected_ms)


def time_models(
    ctx: RunContext,
    models: dict[str, Evaluated],
    backend: Backend,
    overhead: dict[str, Callable[[Backend], ImageCall]],
    timed: torch.Tensor,
    samples: dict[str, list[float]],
    passes: list[dict],
) -> tuple[dict, dict | None]:
    """Every deployed model (and the main model's parts) in ``backend``, image by image in one
    loop (timed again when disturbed; ``passes`` receives every pass); then, unless ``backend``
    is eager itself, the eager batch-1 paths in a second loop on the first
    ``latency.eager_images`` of them (kept as ``latency_ms_eager``)."""
    cfg = ctx.config.latency
    calls = {n: m.deployed(backend) for n, m in models.items() if m.deployed is not None}
    calls.update({f"overhead/{k}": build(backend) for k, build in overhead.items()})
    timing = (cfg.threads, cfg.warmup, ctx.config.seed)
    measured = measure_per_image(calls, timed, *timing, samples, burst=backend.burst,
                                 retries=cfg.noisy_retries, passes_out=passes)  # fmt: skip
    if backend.name == "eager":
        return measured, None
    eager = {n: m.batch_one for n, m in models.items()}
    return measured, measure_per_image(eager, timed[: cfg.eager_images], *timing)


def model_entry(
    model: Evaluated,
    measured: dict | None,
    eager: dict | None,
    name: str,
    backend: str,
    test_images: int,
) -> dict:
    """One model's entry: its latency as deployed in ``backend`` (the table's prediction when
    it has no deployed form), the eager figure beside it, accuracy and the rest."""
    entry = {"kind": model.kind, "test_accuracy": model.accuracy}
    if measured is not None:
        entry.update(latency_ms=measured, latency_source="measured")
    else:
        predicted = model.entry["table_latency_ms"]
        summary = {"mean": predicted, "std": 0.0, "p50": predicted, "p90": predicted,
                   "images": test_images}  # fmt: skip
        entry.update(latency_ms=summary, latency_source="table")
    entry["latency_backend"] = backend
    if eager is not None:
        entry["latency_ms_eager"] = eager[name]
    return {**entry, **model.entry}


def overhead_summary(measured: dict[str, dict], main: Evaluated) -> dict:
    """The main model's controller and routing cost: its routed graph without escalation less
    its exported children alone, weighted by how many test images each child answers."""
    names = [str(c) for c in main.children]
    routed_to: Counter[int] = Counter()
    for child, count in ranked_children(main.policies):
        routed_to[names.index(nearest_child(str(child), names))] += count
    total = sum(routed_to.values())
    children_ms = sum(n * measured[f"overhead/child-{k}"]["mean"] for k, n in routed_to.items())
    children_ms /= total
    routed_ms = measured["overhead/routed"]["mean"]
    main_ms = measured["instanas"]["mean"]
    return {
        "routed_ms": routed_ms,
        "children_ms": children_ms,
        "controller_and_routing_ms": routed_ms - children_ms,
        "share_of_main_model": (routed_ms - children_ms) / main_ms,
        "exported_children": len(names),
    }


def table_summary(table: LatencyTable) -> dict:
    """The table's fixed costs and where it was profiled (the deployment device when
    ``latency.table`` was given)."""
    return {
        "stem_ms": table.unit_ms("stem"),
        "head_ms": table.unit_ms("head"),
        "controller_ms": table.unit_ms("controller"),
        "call_ms": table.call_ms(),
        "chain_factor": table.chain_factor,
        "chain_exponent": table.chain_exponent,
        "backend": table.backend,
        "profiled_on": {
            k: table.key.get(k) for k in ("device", "threads", "torch", "backend", "runtime")
        },
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
    peer = next((e for e in entries.values() if e.get("peer")), None)
    if peer is not None:
        out["peer_points"] = 100.0 * (inst["test_accuracy"] - peer["test_accuracy"])
        out["peer_latency_ratio"] = peer["latency_ms"]["mean"] / inst["latency_ms"]["mean"]
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
    predicted = table.predict_ms(main.policies).float()
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
