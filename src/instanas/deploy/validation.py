"""``instanas export --validate``: an export against the eager model it came from.

Both see the same normalised test images. Routing (the child each image is sent to, before
any fallback) must be identical for every image and predictions identical for at least
``PREDICTION_AGREEMENT`` of them; the largest logit difference is reported. Batch-1 latency of
the exported runtime and the eager deployed path is measured side by side in one process,
image by image in shuffled order (``latency.side_by_side``), so drift hits both alike.
"""

from __future__ import annotations

import numpy as np
import torch

from ..latency.side_by_side import measure_per_image
from ..space import ChildArchitecture
from .inference import InstaNASModel
from .runtime import ExportedModel

PREDICTION_AGREEMENT = 0.999
_CHUNK = 500
_WARMUP = 10


def eager_pass(
    model: InstaNASModel, images: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(normalised inputs, logits, child strings) of the eager model, in chunks."""
    inputs, logits, children = [], [], []
    with torch.inference_mode():
        for start in range(0, len(images), _CHUNK):
            x = model.normalise(images[start : start + _CHUNK])
            out, policy = model.predictor.logits(x)
            inputs.append(x)
            logits.append(out.numpy())
            children += [str(ChildArchitecture.from_policy(p)) for p in policy]
    return torch.cat(inputs), np.concatenate(logits), children


def exported_pass(
    model: ExportedModel, inputs: torch.Tensor
) -> tuple[np.ndarray, list[str], list[str]]:
    """(logits, children picked, children run) of the export on the same inputs."""
    logits, wanted, ran = [], [], []
    for start in range(0, len(inputs), _CHUNK):
        out, picked, used = model.logits(inputs[start : start + _CHUNK].numpy())
        logits.append(out)
        wanted += picked
        ran += used
    return np.concatenate(logits), wanted, ran


def batch_one_latency(
    eager: InstaNASModel, exported: ExportedModel, inputs: torch.Tensor, threads: int
) -> dict:
    """Per-image batch-1 latency (ms) of both paths, interleaved in one loop."""

    paths = {
        "eager": eager.predictor.logits_one,
        "exported": lambda x: exported.logits_one(x.numpy()),
    }
    stats = measure_per_image(paths, inputs.contiguous(), threads, _WARMUP)
    stats["exported_vs_eager"] = stats["exported"]["mean"] / stats["eager"]["mean"]
    return stats


def validation_report(
    eager: InstaNASModel,
    exported: ExportedModel,
    images: torch.Tensor,
    threads: int,
    timed_images: int,
) -> dict:
    """The numbers of ``validation.json``; ``passed`` when routing and predictions agree."""
    inputs, eager_logits, eager_children = eager_pass(eager, images)
    logits, wanted, ran = exported_pass(exported, inputs)
    routed = np.array([a == b for a, b in zip(eager_children, wanted)])
    agree = eager_logits.argmax(1) == logits.argmax(1)
    exported_child = np.array([w == r for w, r in zip(wanted, ran)])
    diff = np.abs(eager_logits - logits).max(axis=1)
    report = {
        "images": len(images),
        "split": "test",
        "threads": threads,
        "routing_identical": int(routed.sum()),
        "routing_differs": int((~routed).sum()),
        "prediction_agreement": float(agree.mean()),
        "prediction_agreement_required": PREDICTION_AGREEMENT,
        "max_logit_difference": float(diff.max()),
        "max_logit_difference_exported_children": float(diff[exported_child].max())
        if exported_child.any()
        else None,
        "prediction_agreement_exported_children": _share(agree[exported_child]),
        "prediction_agreement_fallback_children": _share(agree[~exported_child]),
        "fallback_images": int((~exported_child).sum()),
        "eager_distinct_children": len(set(eager_children)),
    }
    report["passed"] = bool(routed.all() and report["prediction_agreement"] >= PREDICTION_AGREEMENT)
    timed = inputs[:timed_images] if timed_images else inputs
    report["batch1_latency_ms"] = batch_one_latency(eager, exported, timed, threads)
    report["timed_images"] = len(timed)
    return report


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def summary_line(report: dict) -> str:
    """One line for the terminal."""
    lat = report["batch1_latency_ms"]
    verdict = "passed" if report["passed"] else "FAILED"
    return (
        f"validation {verdict}: routing identical for {report['routing_identical']}/"
        f"{report['images']} test images, predictions identical for "
        f"{100 * report['prediction_agreement']:.2f}% (need "
        f"{100 * report['prediction_agreement_required']:.1f}%), max logit difference "
        f"{report['max_logit_difference']:.2e}, {report['fallback_images']} images on a "
        f"fallback child{_fallback_agreement(report)}; batch-1 latency exported "
        f"{lat['exported']['mean']:.3f} ms vs eager "
        f"{lat['eager']['mean']:.3f} ms (x{lat['exported_vs_eager']:.2f}, "
        f"{report['timed_images']} images, {report['threads']} thread(s))"
    )


def _fallback_agreement(report: dict) -> str:
    share = report["prediction_agreement_fallback_children"]
    return "" if share is None else f" (their predictions agree for {100 * share:.1f}%)"
