"""``instanas export``: a trained model as files that run without the meta-graph.

A routed model is not one static graph, so the deployable form is three things: the
BatchNorm-folded controller (images -> policy logits), one static network per child the
controller uses (stem, that child's modules, head), and ``routing.json``, which says how a
controller output becomes a child file (decision rule, empty-cell rule, fallback). The
children exported are those the controller chose on the validation split (all of them, or the
``children`` most frequent; ``split="train+val"`` counts the training split too, never the test
split). ``manifest.json`` records versions and the SHA-256 of every file.

The folder is built under a temporary name beside ``output`` and renamed into place when it is
whole, so an interrupted export leaves nothing at ``output``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import from_dict
from ..data import DataBundle, images_of, load_configured
from ..errors import ExportError
from ..latency.table import LatencyTable
from ..latency.timing import TimingStats, cpu_threads
from ..provenance import code_commit, utc_now, versions
from ..space import FORCED_DEFAULT_MODULE, ChildArchitecture, SearchSpace
from ..utils import write_json
from . import runtime
from .inference import InstaNASModel, load
from .runtime import (
    EXPORT_FORMAT_VERSION,
    MANIFEST_FILE,
    ROUTING_FILE,
    ExportedModel,
    Session,
    image_mode,
    onnx_session,
    read_json,
    sha256_file,
)
from .validation import validation_report

log = logging.getLogger("instanas")
FORMATS = ("onnx", "torchscript")
SPLITS = ("val", "train+val")
RUNTIME_FILE = "instanas_runtime.py"
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
FALLBACK_RULE = (
    "a policy whose child was not exported runs the exported child with the fewest "
    "modules among those that run every module it selects (a superset); when none "
    "is a superset, the exported child differing in the fewest (cell, module) "
    "entries; ties go to the child more frequent on the validation split"
)
# Batch-1 timing of each exported file: enough repeats for a stable median on a noisy machine.
_REPEATS, _WARMUP = 50, 5
_CHUNK = 500


@dataclass
class ExportResult:
    folder: Path
    routing: dict
    validation: dict | None


class ControllerLogits(nn.Module):
    """The deployed controller with its policy logits [B, cells, modules] as the output."""

    def __init__(self, controller: nn.Module) -> None:
        super().__init__()
        self.controller = controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.controller.policy_logits(x)


def export(
    run_dir: str | Path,
    output: str | Path,
    *,
    model: str = "instanas",
    fmt: str = "onnx",
    children: int | None = None,
    validate: bool = False,
    threads: int | None = None,
    timed_images: int = 1000,
    split: str = "val",
) -> ExportResult:
    """Export ``model`` ("instanas" or a variant letter) of ``run_dir`` to the folder ``output``.

    ``children``: only the K children most used on ``split`` (``"val"`` or ``"train+val"``);
    ``validate``: compare with the eager model on the test split and time both at batch 1
    (``timed_images`` images, ``threads`` threads) into ``validation.json``.
    """
    run_dir, output = Path(run_dir), Path(output)
    check_request(output, fmt, children, split)
    eager = load(run_dir, model)
    config, data = run_data(run_dir, eager.space)
    threads = threads or config.latency.threads
    counts = chosen_children(eager, data, split)
    chosen = [c for c, _ in counts.most_common(children)]
    temp = fresh_temp_folder(output)
    timed = timed_images if validate else None
    source = {"run": str(run_dir.resolve()), "model": eager.name, "children_counted_on": split}
    try:
        routing, report = fill_folder(
            temp, eager, data, (counts, chosen), fmt, threads, timed, run_dir, source
        )
        write_json(temp / MANIFEST_FILE, manifest(temp, fmt, run_dir))
        temp.rename(output)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    what = f"{len(chosen)} children ({fmt})"
    log.info("exported %s of %s: %s to %s", eager.name, run_dir, what, output)
    return ExportResult(output, routing, report)


def fresh_temp_folder(output: Path) -> Path:
    """Where the export is assembled before one rename puts it at ``output``; a leftover of a
    killed export is removed."""
    temp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temp, ignore_errors=True)
    return temp


def fill_folder(
    folder: Path,
    eager: InstaNASModel,
    data,
    children: tuple[Counter, list],
    fmt: str,
    threads: int,
    timed_images: int | None,
    run_dir: Path,
    source: dict,
) -> tuple[dict, dict | None]:
    """Model files, routing.json, the runtime and, when ``timed_images`` is set,
    validation.json; returns (the routing document, the validation report or None)."""
    counts, chosen = children
    routing = write_files(eager, chosen, counts, fmt, folder, threads, run_dir)
    routing["source"] = source
    write_json(folder / ROUTING_FILE, routing)
    # The runtime travels with the export: a machine without instanas imports it from here.
    shutil.copyfile(runtime.__file__, folder / RUNTIME_FILE)
    if timed_images is None:
        return routing, None
    report = validate_export(eager, folder, data, threads, timed_images)
    write_json(folder / "validation.json", report)
    return routing, report


def check_request(output: Path, fmt: str, children: int | None, split: str = "val") -> None:
    """Fail before any work when the request cannot succeed."""
    if split not in SPLITS:
        raise ExportError(f"unknown split {split!r}: use --split val or --split train+val")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use --format onnx or --format torchscript")
    if children is not None and children < 1:
        raise ExportError(
            f"--children is {children}: export at least 1 child (or leave it out "
            "to export every child the controller uses)"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"{output} already exists: choose a new --output or delete it first")
    if fmt == "onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            try:
                __import__(package)
            except ImportError:
                raise ExportError(
                    f"ONNX export needs {package}, which is not installed: pip "
                    "install 'instanas[export]'"
                ) from None


def run_data(run_dir: Path, space: SearchSpace | None = None) -> tuple[object, DataBundle]:
    """The run's config and its data splits, loaded the way the run loaded them; a folder tree
    whose shape config.yaml leaves open (runs made before it recorded the inferred one) is read
    at the shape of the model's ``space``."""
    import yaml

    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if space is not None and config.data.dataset == "folder":
        config.data.channels = config.data.channels or space.input_channels
        config.data.image_size = config.data.image_size or space.input_size
    data = load_configured(config)
    return config, data


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


def write_files(
    model: InstaNASModel,
    chosen: list[str],
    counts: Counter[str],
    fmt: str,
    folder: Path,
    threads: int,
    run_dir: Path,
) -> dict:
    """Controller and child networks into ``folder``; returns the routing description."""
    space = model.space
    example = torch.zeros(2, space.input_channels, space.input_size, space.input_size)
    (folder / "children").mkdir(parents=True)
    controller_file = f"controller{SUFFIX[fmt]}"
    save_network(
        ControllerLogits(model.predictor.controller), example, folder / controller_file, fmt
    )
    files = {}
    for rank, child in enumerate(chosen):
        network = model.predictor.metagraph.materialize(ChildArchitecture.from_string(child))
        files[child] = f"children/{rank:03d}{SUFFIX[fmt]}"
        save_network(network.eval(), example, folder / files[child], fmt)
    measured = time_files(
        folder, [controller_file, *files.values()], fmt, threads, example[:1].numpy()
    )
    table, total = run_table(run_dir), sum(counts.values())
    entries = [
        child_entry(child, files[child], counts[child], total, measured[files[child]], table)
        for child in chosen
    ]
    covered = sum(counts[c] for c in chosen) / max(total, 1)
    timing = (controller_file, measured[controller_file], threads)
    return routing_document(model, fmt, timing, table, entries, covered)


def save_network(network: nn.Module, example: torch.Tensor, path: Path, fmt: str) -> None:
    """One network to one file with a dynamic batch axis."""
    network = network.eval()
    if fmt == "torchscript":
        # TorchScript is deprecated in PyTorch (docs/deploy.md says so), and the tracer warns
        # that shape checks become constants (the input size is fixed): no warnings per file.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(network, example)
            torch.jit.save(traced, str(path))
        return
    # Their notices (progress, torchvision operators it skips; we use none) are not for users.
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["images"],
            output_names=["output"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        )
    program.save(str(path))


def open_session(fmt: str, trusted: bool = False):
    """The session factory for ``fmt``: onnxruntime, or TorchScript when ``trusted``."""
    if fmt == "onnx":
        return None  # ExportedModel's default: onnxruntime
    if not trusted:
        raise ExportError(
            "this is a TorchScript export; loading TorchScript runs code stored in "
            "the files: pass --trust-torchscript if you made it, or export with "
            "--format onnx"
        )
    return torchscript_session


def torchscript_session(path: Path, threads: int | None = None) -> Session:
    """A TorchScript file as a numpy-in, numpy-out function (only for exports you trust)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path)).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if threads is None:
                return module(torch.from_numpy(x)).numpy()
            with cpu_threads(threads):
                return module(torch.from_numpy(x)).numpy()

    return run


def time_files(
    folder: Path, names: list[str], fmt: str, threads: int, image: np.ndarray
) -> dict[str, dict]:
    """Batch-1 latency of each file with its own runtime, the files interleaved per round."""

    factory = torchscript_session if fmt == "torchscript" else onnx_session
    sessions = {n: factory(folder / n, threads) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    with cpu_threads(threads):
        for round_ in range(_WARMUP + _REPEATS):
            for name, run in sessions.items():
                start = time.perf_counter_ns()
                run(image)
                if round_ >= _WARMUP:
                    samples[name].append((time.perf_counter_ns() - start) / 1e6)
    stats = {n: TimingStats.from_samples(s) for n, s in samples.items()}
    return {
        n: {"median": s.median_ms, "p90": s.p90_ms, "repeats": s.repeats} for n, s in stats.items()
    }


def run_table(run_dir: Path) -> LatencyTable | None:
    path = run_dir / "latency_table.json"
    return LatencyTable.load(path) if path.exists() else None


def child_entry(
    child: str, file: str, images: int, total: int, measured: dict, table: LatencyTable | None
) -> dict:
    """One exported child: its module table, how often it was chosen, table and measured ms."""
    arch = ChildArchitecture.from_string(child)
    entry = {
        "child": child,
        "file": file,
        "cells": [list(c) for c in arch.cells],
        "active_modules": arch.active_modules(),
        "counted_images": images,
        "counted_share": images / max(total, 1),
        "measured_latency_ms": measured,
    }
    if table is not None:
        # Stem, cells and head; the controller is listed once, with its own cost.
        cells = table.cells_ms(arch.to_policy().unsqueeze(0))[0]
        entry["table_latency_ms"] = float(cells) + table.fixed_ms(include_controller=False)
    return entry


def routing_document(
    model: InstaNASModel,
    fmt: str,
    timing: tuple[str, dict, int],
    table: LatencyTable | None,
    children: list[dict],
    covered: float,
) -> dict:
    """Everything a runtime needs to route an image to an exported child (routing.json).

    ``timing``: the controller's file, its measured latency and the threads it was timed with.
    """
    controller_file, controller_ms, threads = timing
    space, spec = model.space, model.predictor.controller.spec
    controller = {
        "file": controller_file,
        "output": "policy logits [N, cells, modules]",
        "input_size": spec.input_size,
        "measured_latency_ms": controller_ms,
    }
    if table is not None:
        controller["table_latency_ms"] = table.unit_ms("controller")
    mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
    runtime_name = "onnxruntime" if fmt == "onnx" else "torch.jit"
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "format": fmt,
        "input": input_description(space),
        "normalization": {"mean": mean, "std": std, "formula": "(pixel / 255 - mean) / std"},
        "classes": model.classes,
        "cells": space.num_cells,
        "modules": space.num_modules,
        "controller": controller,
        "decision_rule": "a module is selected when its controller logit is >= 0 (p >= 0.5)",
        "empty_cell_rule": empty_cell_rule(space),
        "children": children,
        "policy_to_file": {c["child"]: c["file"] for c in children},
        "fallback": {"rule": FALLBACK_RULE, "counted_share_exported": covered},
        "latency": {"threads": threads, "batch": 1, "repeats": _REPEATS, "runtime": runtime_name},
    }


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
        "default_module": FORCED_DEFAULT_MODULE,
        "text": "a forced (shape-changing) cell with nothing selected runs default_module; "
        "an empty shape-preserving cell is the identity",
    }


def manifest(folder: Path, fmt: str, run_dir: Path) -> dict:
    """Versions, provenance and the SHA-256 of every file of the export."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    results = run_dir / "results.json"
    return {
        "instanas_export": EXPORT_FORMAT_VERSION,
        "format": fmt,
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


def open_export(
    folder: Path, threads: int | None = None, trusted: bool = False, verify: bool = True
) -> ExportedModel:
    """An export folder of either format, loaded for inference (checksums checked)."""

    fmt = read_json(folder / ROUTING_FILE, "model").get("format", "onnx")
    return ExportedModel(
        folder, threads=threads, session_factory=open_session(fmt, trusted), verify=verify
    )


def validate_export(
    eager: InstaNASModel, folder: Path, data: DataBundle, threads: int, timed_images: int
) -> dict:
    """The export against the eager model on the test split (see ``validation_report``)."""

    # This process has just written the files: trusted, and no manifest yet to check against.
    exported = open_export(folder, threads=threads, trusted=True, verify=False)
    return validation_report(eager, exported, images_of(data.test), threads, timed_images)
