"""``instanas export``: a trained model of a run as ONNX graphs that run without torch.

The deployed form of a routed model is a set of batch-1 graphs (``models/onnx_graph.
routed_graphs``): ``controller.onnx`` (the BatchNorm-folded controller and the routing to one of
the exported children), one graph per exported child under ``children/`` (the shared stem, only
that child's modules, the head) and ``escalation.onnx``, the larger network, when the run has an
escalation rule; ``instanas.runtime`` runs them image by image. The children exported are those
the controller chose on the validation split (all of them, or the ``children`` most frequent;
``split="train+val"`` counts the training split too, never the test split); a policy whose
child was not exported runs the nearest exported one. A static network of the run (the
MobileNetV2 path and its widths, the peer, the best static child, the minimum network) is
exported the same way as one child without a controller. ``routing.json`` says what the files
and their outputs mean and ``manifest.json`` records versions and the SHA-256 of every file.

The folder is built under a temporary name beside ``output`` and renamed into place when it is
whole, so an interrupted export leaves nothing at ``output``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime
from ..data import DataBundle, images_of
from ..errors import ExportError
from ..latency.backends import OnnxRuntimeBackend
from ..latency.side_by_side import measure_per_image
from ..models.onnx_graph import CONTROLLER_OUTPUTS, RoutedGraphs, routed_graphs, static_model
from ..models.predictor import Escalation
from ..provenance import code_commit, utc_now, versions
from ..runtime import (
    EXPORT_FORMAT_VERSION,
    MANIFEST_FILE,
    ROUTING_FILE,
    ExportedModel,
    image_mode,
    sha256_file,
)
from ..space import ChildArchitecture, SearchSpace
from ..utils import write_json
from .inference import MAIN_MODEL, InstaNASModel
from .source import Source, open_source, run_data
from .validation import validation_report

log = logging.getLogger("instanas")
SPLITS = ("val", "train+val")
RUNTIME_FILE = "instanas_runtime.py"
CONTROLLER_FILE, ESCALATION_FILE = "controller.onnx", "escalation.onnx"
CHILD_FILE = "children/child-{:02d}.onnx"
PATH_RULE = (
    "per image: the controller graph gives the policy logits, a module runs where its logit "
    "is >= 0, the empty-cell rule applies, and the exported child equal to that policy runs "
    "(else the fallback rule's; no controller: child 0); that child's graph gives the logits, "
    "and when the escalation graph exists and the top softmax probability of those logits is "
    "below its threshold, its logits answer"
)
FALLBACK_RULE = (
    "a policy whose child was not exported runs the exported child differing from it in the "
    "fewest (cell, module) entries after the empty-cell rule; ties go to the child more "
    "frequent on the counted split"
)
_TIMED_IMAGES, _CHUNK = 200, 500


@dataclass
class ExportResult:
    folder: Path
    routing: dict
    validation: dict | None


def export(
    run_dir: str | Path,
    output: str | Path,
    *,
    model: str = MAIN_MODEL,
    children: int | None = None,
    validate: bool = False,
    threads: int | None = None,
    timed_images: int = 1000,
    split: str = "val",
) -> ExportResult:
    """Export ``model`` of ``run_dir`` (the main model, a variant letter, or a static network
    of the run by name) to the folder ``output``.

    ``children``: only the K children most used on ``split``; ``validate``: compare with the
    eager model on the test split and time both at batch 1 (``timed_images`` images,
    ``threads`` threads) into ``validation.json``.
    """
    run_dir, output = Path(run_dir), Path(output)
    check_request(output, children, split)
    source = open_source(run_dir, model)
    config, data = run_data(run_dir, source.space)
    threads = threads or config.latency.threads
    temp = fresh_temp_folder(output)
    try:
        routing = write_model(temp, source, data, children, split, threads)
        routing["source"] = {"run": str(run_dir.resolve()), "model": source.name,
                             "children_counted_on": split}  # fmt: skip
        write_json(temp / ROUTING_FILE, routing)
        # The runtime travels with the export: a machine without instanas imports it from here.
        shutil.copyfile(runtime.__file__, temp / RUNTIME_FILE)
        report = validate_into(temp, source, data, threads, timed_images) if validate else None
        write_json(temp / MANIFEST_FILE, manifest(temp, run_dir))
        temp.rename(output)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("exported %s of %s: %d children to %s", source.name, run_dir,
             len(routing["children"]), output)  # fmt: skip
    return ExportResult(output, routing, report)


def validate_into(
    folder: Path, source: Source, data: DataBundle, threads: int, timed_images: int
) -> dict:
    """Check the export in ``folder`` against its eager model into ``validation.json``."""
    exported = ExportedModel(folder, threads=threads, verify=False)
    report = validation_report(source, exported, images_of(data.test), threads, timed_images)
    write_json(folder / "validation.json", report)
    return report


def fresh_temp_folder(output: Path) -> Path:
    """Where the export is assembled before one rename puts it at ``output``; a leftover of a
    killed export is removed."""
    temp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temp, ignore_errors=True)
    return temp


def check_request(output: Path, children: int | None, split: str = "val") -> None:
    """Fail before any work when the request cannot succeed."""
    if split not in SPLITS:
        raise ExportError(f"unknown split {split!r}: use --split val or --split train+val")
    if children is not None and children < 1:
        raise ExportError(
            f"--children is {children}: export at least 1 child (or leave it out "
            "to export every child the controller uses)"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"{output} already exists: choose a new --output or delete it first")


def chosen_children(model: InstaNASModel, data: DataBundle, split: str) -> Counter[str]:
    """How many images of ``split`` the controller sends to each child (empty-cell rule
    applied); the controller alone runs, in chunks."""
    sets = [data.val] + ([data.train] if split == "train+val" else [])
    counts: Counter[str] = Counter()
    with torch.inference_mode():
        for rows in sets:
            for start in range(0, len(rows), _CHUNK):
                # Chunk by chunk: a streamed split is decoded only a chunk at a time.
                chunk = torch.arange(start, min(start + _CHUNK, len(rows)))
                x = model.normalise(images_of(rows, chunk))
                counts.update(
                    str(ChildArchitecture.from_policy(p)) for p in model.predictor.policies(x)
                )
    return counts


def write_model(
    folder: Path,
    source: Source,
    data: DataBundle,
    limit: int | None,
    split: str,
    threads: int,
) -> dict:
    """The deployed graphs into ``folder``; returns the routing document (routing.json)."""
    folder.mkdir(parents=True)
    if source.network is not None:
        counts = Counter({str(source.network.child): 1})
        chosen = [ChildArchitecture(source.network.cell_modules, source.space.num_modules)]
        graphs = RoutedGraphs(None, [static_model(source.network)], None, 0.0)
    else:
        counts = chosen_children(source.model, data, split)
        chosen = [ChildArchitecture.from_string(c) for c, _ in counts.most_common(limit)]
        graphs = routed_graphs(source.model.predictor, chosen)
    files = write_graphs(folder, graphs)
    measured = time_model(graphs, source, data, threads)
    total = sum(counts.values())
    entries = [child_entry(str(c), counts[str(c)], total) | {"file": f}
               for c, f in zip(chosen, files["children"])]  # fmt: skip
    covered = sum(counts[str(c)] for c in chosen) / max(total, 1)
    return routing_document(source, entries, covered, measured, threads, files)


def write_graphs(folder: Path, graphs: RoutedGraphs) -> dict:
    """Each graph as its own file; the names the routing document gives them."""
    files = {
        "controller": CONTROLLER_FILE if graphs.controller is not None else None,
        "children": [CHILD_FILE.format(k) for k in range(len(graphs.children))],
        "escalation": ESCALATION_FILE if graphs.escalation is not None else None,
    }
    named = [(files["controller"], graphs.controller), (files["escalation"], graphs.escalation),
             *zip(files["children"], graphs.children)]  # fmt: skip
    for name, graph in named:
        if graph is not None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(graph.SerializeToString())
    return files


def time_model(graphs: RoutedGraphs, source: Source, data: DataBundle, threads: int) -> dict:
    """Mean batch-1 latency of the exported graphs on validation images, run as the runtime
    runs them."""
    backend = OnnxRuntimeBackend(threads)
    path = backend.routed_sessions(graphs)
    count = min(_TIMED_IMAGES, len(data.val))
    images = source.model.normalise(images_of(data.val, torch.arange(count)))
    call = {"model": lambda image: path(image.numpy())}
    stats = measure_per_image(call, images, threads, warmup=10, burst=backend.burst)
    return {**stats["model"], "runtime": backend.runtime_version()}


def child_entry(child: str, images: int, total: int) -> dict:
    """One exported child: its module table and how often it was chosen."""
    arch = ChildArchitecture.from_string(child)
    return {
        "child": child,
        "cells": [list(c) for c in arch.cells],
        "active_modules": arch.active_modules(),
        "counted_images": images,
        "counted_share": images / max(total, 1),
    }


def routing_document(
    source: Source,
    children: list[dict],
    covered: float,
    measured: dict,
    threads: int,
    files: dict,
) -> dict:
    """Everything a runtime needs to run the graphs and read their outputs (routing.json)."""
    model, space, predictor = source.model, source.space, source.model.predictor
    escalation = predictor.escalation if source.network is None else None
    mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "format": "onnx",
        "model": {
            "controller": files["controller"],
            "controller_outputs": list(CONTROLLER_OUTPUTS),
            "child_outputs": ["logits"],
            "escalation": files["escalation"],
            "batch": 1,
            "path": PATH_RULE,
            "measured_latency_ms": measured,
            "threads": threads,
        },
        "input": input_description(space),
        "normalization": {"mean": mean, "std": std, "formula": "(pixel / 255 - mean) / std"},
        "classes": model.classes,
        "cells": space.num_cells,
        "modules": space.num_modules,
        "controller": {
            "in_graph": files["controller"] is not None,
            "input_size": predictor.controller.spec.input_size,
            "decision_rule": "a module is selected when its controller logit is >= 0",
        },
        "empty_cell_rule": empty_cell_rule(space),
        "children": children,
        "fallback": {"rule": FALLBACK_RULE, "counted_share_exported": covered},
        "escalation": escalation_description(escalation),
    }


def escalation_description(escalation: Escalation | None) -> dict | None:
    if escalation is None:
        return None
    rule = ("when the child's top softmax probability is below threshold, the larger network "
            "(model.escalation) answers instead")  # fmt: skip
    return {"threshold": escalation.threshold, "rule": rule}


def input_description(space: SearchSpace) -> dict:
    """What an exported model takes and how a runtime prepares an image for it."""
    return {
        "channels": space.input_channels,
        "size": space.input_size,
        "layout": "NCHW",
        "dtype": "float32",
        "colour_mode": image_mode(space.input_channels),
        "preprocess": "decode; palette images via RGBA; convert to colour_mode; "
        "centre square crop and bilinear resize to size x size "
        "(skipped at that size); normalise",
    }


def empty_cell_rule(space: SearchSpace) -> dict:
    return {
        "forced_cells": space.forced_mask().tolist(),
        "default_module": space.forced_module,
        "text": "a forced (shape-changing) cell with nothing selected runs default_module; "
        "an empty shape-preserving cell is the identity",
    }


def manifest(folder: Path, run_dir: Path) -> dict:
    """Versions, provenance and the SHA-256 of every file of the export."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    results = run_dir / "results.json"
    return {
        "instanas_export": EXPORT_FORMAT_VERSION,
        "format": "onnx",
        "created_at": utc_now(),
        "versions": versions(),
        "code": code_commit(),
        "source": {
            "run": str(run_dir.resolve()),
            "results_sha256": sha256_file(results) if results.exists() else None,
        },
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in files
        },
    }
