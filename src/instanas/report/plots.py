"""Plots of a finished run: the accuracy/latency trade-off, per-image latency and policies.

Every plot is drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, so making a
report never changes the pyplot backend or state of a caller. Matplotlib is imported only
when a plot is drawn: the pipeline imports this module (through report/document.py) without it.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..errors import ConfigError
from ..utils import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
MAX_PROJECTED = 5000  # more points only overplot, and UMAP time grows with them
KIND_ORDER = (
    "instanas",
    "variant",
    "mbv2",
    "min-net",
    "random-policy",
    "static-child",
    "oracle",
    "other",
)
PER_IMAGE_FILE = "test_per_image.npz"
PerImage = Mapping[str, np.ndarray]
Model = Mapping[str, Any]


# --- reading a run ---------------------------------------------------------------------------


def load_results(run_dir: Path) -> dict:
    """results.json of RUN_DIR; every problem is a one-line ConfigError naming the fix."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist: give the folder of a "
            "finished run (the --output of `instanas run`)"
        )
    path = run_dir / "results.json"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no results.json: run `instanas evaluate --output {run_dir}` first"
        )
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ConfigError(
            f"{path} is not valid JSON ({exc}): rerun `instanas evaluate "
            f"--output {run_dir}` to rewrite it"
        ) from None
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise ConfigError(
            f'{path} has no "models" object of per-model objects: rerun '
            f"`instanas evaluate --output {run_dir}` to rewrite it"
        )
    return results


def load_per_image(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The per-image arrays of the main model, or None for runs written without them."""
    path = Path(run_dir) / PER_IMAGE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"{path} is unreadable ({exc}): rerun `instanas evaluate --output "
            f"{run_dir}` to rewrite it, or delete it to report without "
            "per-image plots"
        ) from None


def model_kind(name: str, model: Model) -> str:
    kind = model.get("kind")
    if isinstance(kind, str):
        return kind
    # Runs written before models carried a "kind" used fixed names, so the name says it.
    if name == "instanas":
        return "instanas"
    if name.startswith("instanas-"):
        return "variant"
    if name.startswith("mbv2"):
        return "mbv2"
    return name if name in KIND_ORDER else "other"


def model_width(name: str, model: Model) -> float | None:
    """Width multiplier of a MobileNetV2 baseline; mbv2-path is the preset's own width."""
    if model_kind(name, model) != "mbv2":
        return None
    if isinstance(model.get("width"), (int, float)):
        return float(model["width"])
    match = re.fullmatch(r"mbv2-([0-9.]+)x", name)
    return float(match.group(1)) if match else 1.0


def sorted_models(models: Mapping[str, Model]) -> list[tuple[str, Model]]:
    """Main model first, then variants, MobileNetV2 by width, and the reference points."""

    def key(item: tuple[str, Model]) -> tuple[int, float, str]:
        name, model = item
        kind = model_kind(name, model)
        rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return rank, model_width(name, model) or 0.0, name

    return sorted(models.items(), key=key)


def mean_latency(model: Model) -> float | None:
    """The model's mean batch-1 latency in ms (measured, or the table's for a bound)."""
    latency = model.get("latency_ms")
    if isinstance(latency, dict) and _finite(latency.get("mean")):
        return float(latency["mean"])
    if is_bound(model) and _finite(model.get("table_latency_ms")):
        return float(model["table_latency_ms"])
    return None


def is_bound(model: Model) -> bool:
    """Latency predicted by the table rather than timed (the oracle): a bound, not a result."""
    return model.get("latency_source") == "table"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def class_names(results: Mapping, per_image: PerImage) -> list[str]:
    names = [str(n) for n in results.get("classes") or []]
    count = len(names)
    if "labels" in per_image and per_image["labels"].size:
        count = max(count, int(per_image["labels"].max()) + 1)
    if "gallery_images" in per_image:
        count = max(count, per_image["gallery_images"].shape[0])
    return names + [f"class {i}" for i in range(len(names), count)]


# --- drawing ---------------------------------------------------------------------------------


def plotting_available() -> bool:
    """Whether matplotlib can be imported; without it a report is written without plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


MISSING_MATPLOTLIB = "matplotlib is not installed: the report has no plots (pip install matplotlib)"


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _device_line(results: Mapping) -> str:
    device = results.get("device") or {}
    if not device:
        return ""
    return (
        f"{device.get('name', '?')} ({device.get('type', '?')}, "
        f"{device.get('threads', '?')} thread(s)), batch 1"
    )


# Marker, colour and legend label per kind; the main model is drawn separately, on top.
_STYLE = {
    "variant": ("o", "tab:orange", "InstaNAS variants"),
    "mbv2": ("s", "tab:blue", "MobileNetV2 widths"),
    "min-net": ("v", "tab:green", "min-net (fewest modules)"),
    "random-policy": ("X", "tab:purple", "random policy"),
    "static-child": ("^", "tab:red", "best static child"),
    "oracle": ("D", "tab:gray", "oracle"),
    "other": ("P", "tab:brown", "other"),
}


def plot_error_vs_latency(results: Mapping, per_image: PerImage) -> Figure:
    figure = _new_figure(7.5, 5.5)
    ax = figure.subplots()
    groups: dict[str, list[tuple[str, Model]]] = {}
    for name, model in sorted_models(results["models"]):
        if mean_latency(model) is not None and _finite(model.get("test_accuracy")):
            groups.setdefault(model_kind(name, model), []).append((name, model))
    for kind, members in groups.items():
        if kind != "instanas":
            _draw_series(ax, kind, members)
    _draw_escalation_curve(ax, results["models"].get("instanas", {}))
    for name, model in groups.get("instanas", []):
        _draw_main_model(ax, name, model)
    if not groups:
        message = "no model has both a latency and an accuracy"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center")
    backend = results.get("device", {}).get("backend", "eager")
    ax.set_xlabel(f"mean latency per image, batch 1, {backend} (ms); bars: ± 1 std over images")
    ax.set_ylabel("test error (%)")
    ax.set_title(
        f"Test error vs latency: lower left is better\n{_device_line(results)}", fontsize=10
    )
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    return figure


def _draw_main_model(ax: Axes, name: str, model: Model) -> None:
    ax.errorbar(mean_latency(model), _error(model), xerr=_std(model), fmt="*", markersize=16,
                color="tab:red", capsize=3, zorder=5, label=f"{name} (main model)")  # fmt: skip


def _draw_escalation_curve(ax: Axes, main: Model) -> None:
    """The main model's escalation on the test split at every validation threshold: the
    share escalated grows to the right (latency from the validation timing)."""
    curve = (main.get("escalation") or {}).get("test_curve")
    if not curve:
        return
    ax.plot(
        [p["latency_ms"] for p in curve],
        [100.0 * (1.0 - p["accuracy"]) for p in curve],
        ".-",
        color="tab:pink",
        linewidth=1,
        markersize=4,
        label="InstaNAS with escalation, every threshold (test)",
    )


def _draw_series(ax: Axes, kind: str, members: list[tuple[str, Model]]) -> None:
    """One connected series per kind (variants by latency, widths by width), each labelled."""
    marker, colour, label = _STYLE.get(kind, _STYLE["other"])
    if kind == "variant":
        members = sorted(members, key=lambda item: mean_latency(item[1]) or 0.0)
    bound = any(is_bound(m) for _, m in members)
    ax.errorbar(
        [mean_latency(m) for _, m in members],
        [_error(m) for _, m in members],
        xerr=[_std(m) for _, m in members],
        fmt=f"{marker}-" if len(members) > 1 else marker,
        color=colour,
        markersize=8,
        capsize=3,
        linewidth=1,
        markerfacecolor="none" if bound else colour,
        label=f"{label} (table latency, bound)" if bound else label,
    )
    for name, model in members:
        ax.annotate(
            _point_label(kind, name, model),
            (mean_latency(model), _error(model)),
            textcoords="offset points",
            xytext=(6, 5),
            fontsize=8,
            color=colour,
        )


def _point_label(kind: str, name: str, model: Model) -> str:
    if kind == "variant":
        return str(model.get("variant") or name.removeprefix("instanas-"))
    if kind == "mbv2":
        width = f"{model_width(name, model):g}x"
        return f"{width} ({name})" if name == "mbv2-path" else width
    if is_bound(model):
        return f"{name}: table latency, bound"
    return name


def _error(model: Model) -> float:
    return 100.0 * (1.0 - float(model["test_accuracy"]))


def _std(model: Model) -> float:
    """Spread of the measured per-image latency; a table prediction has none."""
    latency = model.get("latency_ms")
    if is_bound(model) or not isinstance(latency, dict) or not _finite(latency.get("std")):
        return 0.0
    return float(latency["std"])


def _reference_lines(results: Mapping, field: str) -> list[tuple[str, float]]:
    """(name, ms) of every baseline, for vertical lines over the main model's histogram."""
    lines = []
    for name, model in sorted_models(results["models"]):
        if model_kind(name, model) in ("instanas", "variant"):
            continue
        if field == "mean" and is_bound(model):
            continue  # a table prediction has no place among measured means
        value = mean_latency(model) if field == "mean" else model.get(field)
        if _finite(value):
            lines.append((name, float(value)))
    return lines


def _draw_histogram(
    ax: Axes, series: list[tuple[str, np.ndarray]], lines: list[tuple[str, float]]
) -> None:
    values = [v[np.isfinite(v)] for _, v in series]
    # Bins span the reference lines too, so a baseline far from the data is still in view; a
    # few timing outliers (an interrupt, a page fault) would squeeze the rest into one bin, so
    # the range stops at the 99.5th percentile and the cut images are counted in the legend.
    marks = np.array([ms for _, ms in lines])
    data_all = np.concatenate(values)
    top = max(
        float(np.percentile(data_all, 99.5)) if data_all.size else 0.0,
        float(marks.max()) if marks.size else 0.0,
    )
    low = min(
        float(data_all.min()) if data_all.size else top, float(marks.min()) if marks.size else top
    )
    edges = np.histogram_bin_edges(
        np.concatenate(values + [marks]), bins=40, range=(low, top) if top > low else None
    )
    for (label, _), data in zip(series, values):
        beyond = int((data > edges[-1]).sum())
        note = f", {beyond} beyond {edges[-1]:.1f} ms not shown" if beyond else ""
        ax.hist(data, bins=edges, alpha=0.6, label=f"{label} ({data.size} images{note})")
    styles = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
    for i, (name, ms) in enumerate(lines):
        ax.axvline(
            ms,
            color=f"C{(i + 2) % 10}",
            linestyle=styles[i % len(styles)],
            linewidth=1.5,
            label=f"{name}: {ms:.3f} ms",
        )
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_latency_histogram(results: Mapping, per_image: PerImage) -> Figure:
    figure = _new_figure(12, 4.8)
    measured_ax, predicted_ax = figure.subplots(1, 2)
    series = [("InstaNAS, measured", per_image["measured_ms"].astype(np.float64))]
    if "random_measured_ms" in per_image:
        series.append(
            ("random policy, measured", per_image["random_measured_ms"].astype(np.float64))
        )
    _draw_histogram(measured_ax, series, _reference_lines(results, "mean"))
    measured_ax.set_xlabel("measured latency per image, batch 1 (ms)")
    measured_ax.set_title("Measured per-image latency; lines: baseline means", fontsize=10)
    _draw_histogram(
        predicted_ax,
        [("InstaNAS, table", per_image["predicted_ms"].astype(np.float64))],
        _reference_lines(results, "table_latency_ms"),
    )
    predicted_ax.set_xlabel("latency-table prediction per image (ms)")
    predicted_ax.set_title(
        "Predicted latency of each image's child; lines: baseline tables", fontsize=10
    )
    figure.suptitle(f"InstaNAS latency per test image: {_device_line(results)}", fontsize=11)
    return figure


def _subsample(count: int) -> np.ndarray:
    """Evenly spaced indices: the same points every time, spread over the whole test set."""
    return np.unique(np.linspace(0, count - 1, min(count, MAX_PROJECTED)).round().astype(int))


def _project(points: np.ndarray) -> tuple[np.ndarray, str, str]:
    """2-D coordinates and axis names: UMAP when it is installed, else PCA."""
    try:
        import umap  # optional: never a dependency
    except ImportError:
        umap = None
    if umap is not None and len(points) > 15:
        reducer = umap.UMAP(n_components=2, random_state=0)
        return np.asarray(reducer.fit_transform(points)), "UMAP 1", "UMAP 2"
    centred = points - points.mean(axis=0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((len(points), 2))
    rank = min(2, basis.shape[0])
    coords[:, :rank] = centred @ basis[:rank].T
    share = singular**2 / max(float((singular**2).sum()), 1e-12)
    share = np.concatenate([share, np.zeros(2)])
    return coords, *(f"PC {i + 1} ({100 * share[i]:.0f}% of variance)" for i in range(2))


def plot_policy_projection(results: Mapping, per_image: PerImage) -> Figure:
    policies = per_image["policies"]
    chosen = _subsample(len(policies))
    points = policies[chosen].reshape(len(chosen), -1).astype(np.float64)
    colour = per_image["predicted_ms"][chosen]
    distinct = len(np.unique(points, axis=0)) if len(points) else 0
    if distinct <= 1:
        # Zero variance: no direction to project on, every image runs the same child.
        coords, x_label, y_label = np.zeros((len(points), 2)), "PC 1", "PC 2"
    else:
        coords, x_label, y_label = _project(points)
    figure = _new_figure(7, 5.5)
    ax = figure.subplots()
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=colour, cmap="viridis", s=10, alpha=0.7)
    figure.colorbar(scatter, ax=ax, label="predicted latency of the image's child (ms)")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    noun = "child" if distinct == 1 else "children"
    ax.set_title(
        f"Per-image policies ({len(chosen)} of {len(policies)} test images, "
        f"{distinct} distinct {noun})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    return figure


def plot_gallery(results: Mapping, per_image: PerImage) -> Figure:
    images, costs = per_image["gallery_images"], per_image["gallery_ms"]
    index = per_image.get("gallery_index")
    expected = gallery_expected_ms(results, per_image)
    names = class_names(results, per_image)
    classes, _, k = images.shape[:3]
    figure = _new_figure(2 * k * 1.05 + 1.6, classes * 1.15 + 1.2)
    gallery, note = figure.subfigures(2, 1, height_ratios=[classes * 1.15 + 0.9, 0.3])
    how = (
        "ordered by the table latency of each image's child, ties by the controller's "
        "expected latency (sum of module probability x module ms, fixed costs included)"
    )
    if expected is not None:
        how += "; labels: child ms | expected ms"
    note.text(0.5, 0.5, how, ha="center", va="center", fontsize=8)
    halves = gallery.subfigures(1, 2, wspace=0.04)
    for side, (half, title) in enumerate(zip(halves, ("cheapest", "most expensive"))):
        half.suptitle(f"{title} {k} per class", fontsize=11, fontweight="bold")
        axes = np.asarray(half.subplots(classes, k, squeeze=False))
        for row in range(classes):
            for col in range(k):
                empty = (index is not None and index[row, side, col] < 0) or not np.isfinite(
                    costs[row, side, col]
                )
                label = None if empty else f"{float(costs[row, side, col]):.2f}"
                if label and expected is not None:
                    label += f" | {float(expected[row, side, col]):.2f}"
                _draw_thumbnail(axes[row, col], images[row, side, col], label)
            # Labelled on both halves: equal margins keep the two halves' rows aligned.
            axes[row, 0].set_ylabel(names[row], rotation=0, ha="right", va="center", fontsize=9)
    return figure


def gallery_expected_ms(results: Mapping, per_image: PerImage) -> np.ndarray | None:
    """The controller's expected latency of each gallery image, fixed costs included."""
    if "expected_ms" not in per_image or "gallery_index" not in per_image:
        return None
    fixed = results.get("latency_table") or {}
    extra = sum(float(fixed.get(k, 0.0)) for k in ("stem_ms", "head_ms", "controller_ms"))
    index = per_image["gallery_index"]
    return per_image["expected_ms"][np.maximum(index, 0)] + extra


def _draw_thumbnail(ax: Axes, image: np.ndarray, label: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if label is None:
        return  # a class with fewer test images than gallery slots
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.transpose(image, (1, 2, 0)))
    ax.set_title(label, fontsize=7)


def module_use(per_image: PerImage, classes: int) -> np.ndarray:
    """[classes, cells, modules]: share of a class's images whose child runs the module."""
    policies = per_image["policies"].astype(bool)
    labels = per_image["labels"]
    use = np.full((classes,) + policies.shape[1:], np.nan)
    for label in range(classes):
        mask = labels == label
        if mask.any():
            use[label] = policies[mask].mean(axis=0)
    return use


def plot_module_use(results: Mapping, per_image: PerImage) -> Figure:
    names = class_names(results, per_image)
    use = module_use(per_image, len(names))
    counts = np.bincount(per_image["labels"], minlength=len(names))
    panels = [
        ("all classes", per_image["policies"].astype(bool).mean(axis=0), len(per_image["labels"]))
    ]
    panels += [(names[c], use[c], int(counts[c])) for c in range(len(names))]
    columns = min(4, math.ceil(math.sqrt(len(panels))))
    rows = math.ceil(len(panels) / columns)
    cells, modules = use.shape[1:]
    figure = _new_figure(columns * max(2.6, 0.17 * cells) + 1.2, rows * 2.0 + 0.8)
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False))
    image = None
    for ax, (title, grid, count) in zip(axes.flat, panels):
        image = _module_use_panel(ax, grid, f"{title} ({count} images)", cells, modules)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    label = "fraction of images running it"
    figure.colorbar(image, ax=axes.ravel().tolist(), label=label, shrink=0.8, fraction=0.03)
    figure.suptitle("Module use per cell, by class of the test image", fontsize=11)
    return figure


def _module_use_panel(ax, grid: np.ndarray, title: str, cells: int, modules: int):
    """One heat map of module use (modules up, cells across); returns the image."""
    style = {"cmap": "viridis", "aspect": "auto", "origin": "lower", "interpolation": "nearest"}
    image = ax.imshow(grid.T, vmin=0, vmax=1, **style)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("cell", fontsize=8)
    ax.set_ylabel("module", fontsize=8)
    ax.set_yticks(range(modules))
    ax.set_xticks(range(0, cells, max(1, cells // 6)))
    ax.tick_params(labelsize=7)
    return image


PlotFunction = Callable[[Mapping, PerImage], "Figure"]
# File name, the per-image arrays it needs (none: results.json alone), how to draw it.
PLOTS: tuple[tuple[str, tuple[str, ...], PlotFunction], ...] = (
    ("error_vs_latency.png", (), plot_error_vs_latency),
    ("latency_histogram.png", ("measured_ms", "predicted_ms"), plot_latency_histogram),
    ("policy_projection.png", ("policies", "predicted_ms"), plot_policy_projection),
    ("gallery.png", ("gallery_images", "gallery_ms"), plot_gallery),
    ("module_use.png", ("policies", "labels"), plot_module_use),
)


def write_plots(run_dir: Path) -> list[Path]:
    """Draw every plot whose inputs the run has into RUN_DIR/plots/; returns those written
    (none without matplotlib)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    if not plotting_available():
        return []
    per_image = load_per_image(run_dir) or {}
    written = []
    for file_name, needs, plot in PLOTS:
        if any(key not in per_image for key in needs):
            continue
        path = run_dir / "plots" / file_name
        atomic_write_bytes(path, _png(plot(results, per_image)))
        written.append(path)
    return written
