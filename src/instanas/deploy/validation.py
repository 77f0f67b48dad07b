"""``instanas export --validate``: an export against the eager model it came from.

Both see the same normalised test images. Routing (the child the controller picks, before any
fallback) must be identical for every image where the export holds the controller, the
escalation decision identical wherever the two run the same child, and predictions identical
for at least ``PREDICTION_AGREEMENT`` of the images; the largest logit difference is reported.
Batch-1 latency of the exported graphs in onnxruntime and of the eager deployed path is measured
side by side in one process, image by image in shuffled order (``latency.side_by_side``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..latency.backends import OnnxRuntimeBackend
from ..latency.side_by_side import measure_per_image
from ..runtime import ExportedModel
from ..space import ChildArchitecture
from .source import Source

PREDICTION_AGREEMENT = 0.999
_CHUNK = 500
_WARMUP = 10


@torch.inference_mode()
def eager_pass(source: Source, images: torch.Tensor) -> dict:
    """Normalised inputs, logits, children and escalation flags of the eager model."""
    inputs, logits, children, escalated = [], [], [], []
    model = source.model
    for start in range(0, len(images), _CHUNK):
        x = model.normalise(images[start : start + _CHUNK])
        inputs.append(x)
        if source.network is not None:
            logits.append(source.network(x).numpy())
            children += [str(source.network.child)] * len(x)
            escalated.append(np.zeros(len(x), dtype=bool))
            continue
        out, policy, flags = model.predictor.answer(x)
        logits.append(out.numpy())
        children += [str(ChildArchitecture.from_policy(p)) for p in policy]
        escalated.append(flags.numpy())
    return {"inputs": torch.cat(inputs), "logits": np.concatenate(logits),
            "children": children, "escalated": np.concatenate(escalated)}  # fmt: skip


def batch_one_latency(
    source: Source, exported: ExportedModel, inputs: torch.Tensor, threads: int
) -> dict:
    """Per-image batch-1 latency (ms) of both paths, interleaved in one loop; the export as a
    service runs it (the graph alone, warm), the eager model as ``logits_one``."""
    eager = source.network if source.network is not None else source.model.predictor.logits_one
    paths = {"eager": eager, "exported": lambda x: exported.run_one(x.numpy())}
    burst = {"burst": OnnxRuntimeBackend.burst}
    stats = measure_per_image(paths, inputs.contiguous(), threads, _WARMUP, **burst)
    stats["exported_vs_eager"] = stats["exported"]["mean"] / stats["eager"]["mean"]
    return stats


def validation_report(
    source: Source,
    exported: ExportedModel,
    images: torch.Tensor,
    threads: int,
    timed_images: int,
) -> dict:
    """The numbers of ``validation.json``; ``passed`` when routing and predictions agree."""
    eager = eager_pass(source, images)
    answers = exported.answers(eager["inputs"].numpy())
    logits = np.stack([a.logits for a in answers])
    in_graph = answers[0].wanted is not None
    routed = np.array([not in_graph or a.wanted == c for a, c in zip(answers, eager["children"])])
    same_child = np.array([a.child == c for a, c in zip(answers, eager["children"])])
    escalation_same = np.array([a.escalated for a in answers]) == eager["escalated"]
    agree = eager["logits"].argmax(1) == logits.argmax(1)
    diff = np.abs(eager["logits"] - logits).max(axis=1)
    report = {
        "images": len(images), "split": "test", "threads": threads,
        "controller_in_export": in_graph,
        "routing_identical": int(routed.sum()),
        "routing_differs": int((~routed).sum()),
        "escalation_identical_same_child": _share(escalation_same[same_child]),
        "prediction_agreement": float(agree.mean()),
        "prediction_agreement_same_child": _share(agree[same_child]),
        "prediction_agreement_required": PREDICTION_AGREEMENT,
        "max_logit_difference": float(diff.max()),
        "max_logit_difference_same_child": _largest(diff[same_child]),
        "prediction_agreement_fallback_children": _share(agree[~same_child]),
        "fallback_images": int((~same_child).sum()),
        "eager_distinct_children": len(set(eager["children"])),
    }  # fmt: skip
    # A fallback child is the export's documented answer for a child it does not hold, so only
    # images that ran the eager model's own child must agree.
    agreement = report["prediction_agreement_same_child"]
    report["passed"] = bool(routed.all() and (agreement or 1.0) >= PREDICTION_AGREEMENT)
    timed = eager["inputs"][:timed_images] if timed_images else eager["inputs"]
    report["batch1_latency_ms"] = batch_one_latency(source, exported, timed, threads)
    return {**report, "timed_images": len(timed)}


def _largest(values: np.ndarray) -> float | None:
    return float(values.max()) if len(values) else None


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def summary_line(report: dict) -> str:
    """One line for the terminal."""
    lat = report["batch1_latency_ms"]
    verdict = "passed" if report["passed"] else "FAILED"
    routing = (
        f"routing identical for {report['routing_identical']}/{report['images']} test images, "
        if report["controller_in_export"]
        else "no controller in the export (one child), "
    )
    return (
        f"validation {verdict}: {routing}predictions identical for "
        f"{100 * (report['prediction_agreement_same_child'] or 1.0):.2f}% of the images on "
        f"the eager model's child (need "
        f"{100 * report['prediction_agreement_required']:.1f}%), max logit difference "
        f"{report['max_logit_difference']:.2e}, {report['fallback_images']} images on "
        f"another child{_fallback_agreement(report)}; batch-1 latency exported (onnxruntime) "
        f"{lat['exported']['mean']:.3f} ms vs eager {lat['eager']['mean']:.3f} ms "
        f"(x{lat['exported_vs_eager']:.2f}, {report['timed_images']} images, "
        f"{report['threads']} thread(s))"
    )


def _fallback_agreement(report: dict) -> str:
    share = report["prediction_agreement_fallback_children"]
    return "" if share is None else f" (their predictions agree for {100 * share:.1f}%)"
