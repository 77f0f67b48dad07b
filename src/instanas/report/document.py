"""results.md (the short summary the pipeline writes) and `instanas report`: report.md and a
self-contained report.html with the plots, every table and every number of results.json.

Both report files are rendered from one list of blocks, so they cannot disagree.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..utils import atomic_write_text
from ..version import __version__
from .diagnostics import undertrained_sentence
from .plots import (
    MISSING_MATPLOTLIB,
    is_bound,
    load_results,
    mean_latency,
    model_kind,
    model_width,
    plotting_available,
    sorted_models,
    write_plots,
)

Model = Mapping[str, Any]
# Known per-model fields with their own column; any other number gets a column of its own.
_MODEL_FIELDS = {
    "kind",
    "width",
    "test_accuracy",
    "latency_ms",
    "latency_source",
    "table_latency_ms",
    "flops",
    "distinct_children",
    "mean_active_modules",
}
# (title, results key, unit) of the plain key/value sections, shown when present.
_KEY_VALUE_SECTIONS = (
    ("Comparison", "comparison", ""),
    ("Latency table fixed costs", "latency_table", ""),
    ("Epochs", "epochs", ""),
    ("Wall time", "wall_time_s", " s"),
)
_PLOT_CAPTIONS = {
    "error_vs_latency.png": "Test error vs mean batch-1 latency of every model (lower left "
    "is better; hollow markers are table predictions, not timings).",
    "latency_histogram.png": "Per-image latency of InstaNAS, measured and table-predicted, "
    "against the baselines' means.",
    "policy_projection.png": "2-D projection of the per-image policies, coloured by the "
    "predicted latency of each image's child.",
    "gallery.png": "The cheapest and the most expensive test images of each class: ordered by "
    "the table latency of their child, ties by the controller's expected "
    "latency.",
    "module_use.png": "Share of each class's test images whose child runs each module.",
}


# --- numbers ---------------------------------------------------------------------------------


def format_number(value: int | float) -> str:
    """Exact: the appendix must let a reader recover every number of results.json."""
    return str(value) if isinstance(value, int) else repr(float(value))


def flatten_numbers(value: Any, path: str = "") -> Iterator[tuple[str, int | float]]:
    """(dotted path, number) for every numeric leaf of a JSON value; booleans are not numbers."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from flatten_numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def _fixed(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{scale * value:.{digits}f}"


def _percent(value: Any) -> str:
    return _fixed(value, 2, 100.0)


def _latency(model: Model, field: str) -> Any:
    latency = model.get("latency_ms")
    return latency.get(field) if isinstance(latency, dict) else None


# --- summary sentences -----------------------------------------------------------------------


def _instanas_vs_mbv2_path(results: Mapping) -> str | None:
    models, comparison = results["models"], results.get("comparison") or {}
    main, path = models.get("instanas"), models.get("mbv2-path")
    if not main or not path:
        return None
    main_ms, path_ms = mean_latency(main), mean_latency(path)
    saving = comparison.get("latency_reduction")
    if saving is None and main_ms and path_ms:
        saving = 1.0 - main_ms / path_ms
    delta = comparison.get("accuracy_delta_points")
    if delta is None and "test_accuracy" in main and "test_accuracy" in path:
        delta = 100.0 * (main["test_accuracy"] - path["test_accuracy"])
    if saving is None or delta is None:
        return None
    direction = "lower" if saving >= 0 else "higher"
    return (
        f"InstaNAS mean measured batch-1 latency is {100 * abs(saving):.1f}% {direction} "
        f"than the MobileNetV2 path ({_fixed(main_ms)} vs {_fixed(path_ms)} ms), at "
        f"{delta:+.2f} points of test accuracy ({_percent(main.get('test_accuracy'))}% vs "
        f"{_percent(path.get('test_accuracy'))}%)."
    )


def _measured(results: Mapping, kinds: tuple[str, ...]) -> list[tuple[str, Model]]:
    return [
        (name, model)
        for name, model in sorted_models(results["models"])
        if model_kind(name, model) in kinds
        and not is_bound(model)
        and mean_latency(model) is not None
        and "test_accuracy" in model
    ]


def _dominance(results: Mapping) -> str | None:
    """Which InstaNAS models beat which MobileNetV2 widths on latency and accuracy at once."""
    ours, widths = _measured(results, ("instanas", "variant")), _measured(results, ("mbv2",))
    if not ours or not widths:
        return None
    wins = []
    for name, model in ours:
        beaten = [
            w
            for w, m in widths
            if mean_latency(model) < mean_latency(m) and model["test_accuracy"] > m["test_accuracy"]
        ]
        if beaten:
            wins.append(f"{name} beats {', '.join(beaten)}")
    if not wins:
        return (
            "No InstaNAS model beats any MobileNetV2 width on both measured latency and "
            "test accuracy."
        )
    return f"On both axes (lower measured latency and higher test accuracy): {'; '.join(wins)}."


def _controller_vs_random(results: Mapping) -> str | None:
    models = results["models"]
    main, rand = models.get("instanas"), models.get("random-policy")
    if not main or not rand or "test_accuracy" not in main or "test_accuracy" not in rand:
        return None
    delta = 100.0 * (main["test_accuracy"] - rand["test_accuracy"])
    return (
        f"The controller's policies reach {_percent(main['test_accuracy'])}% test accuracy "
        f"against {_percent(rand['test_accuracy'])}% for random policies ({delta:+.2f} "
        f"points), at {_fixed(mean_latency(main))} vs {_fixed(mean_latency(rand))} ms."
    )


def _routing(results: Mapping) -> str | None:
    main = results["models"].get("instanas") or {}
    shuffled = main.get("shuffled_routing_accuracy")
    if shuffled is None:
        return None
    spread = (f"{main['distinct_children']} distinct children (effective number "
              f"{main['effective_children']:.1f}; the most used serves "
              f"{100 * main['top_child_share']:.1f}% of the test images)")  # fmt: skip
    gain = 100.0 * (main["test_accuracy"] - shuffled)
    return (f"Routing: the main model uses {spread}; with its policies shuffled across images "
            f"it reaches {_percent(shuffled)}% ({gain:+.2f} points for routing each image to "
            "its own child).")  # fmt: skip


def _escalation(results: Mapping) -> str | None:
    main = results["models"].get("instanas") or {}
    esc = main.get("escalation")
    if not esc:
        return None
    gain = 100.0 * (main["test_accuracy"] - esc["shuffled_accuracy"])
    return (
        f"Escalation: images whose routed child is less than {100 * esc['threshold']:.1f}% "
        f"sure ({100 * esc['share']:.1f}% of the test images) run {esc['network']}; the child "
        f"alone reaches {_percent(esc['child_accuracy'])}%, the model "
        f"{_percent(main['test_accuracy'])}%, and escalating the same share at random "
        f"{_percent(esc['shuffled_accuracy'])}% ({gain:+.2f} points for choosing by confidence)."
    )


def _peer(results: Mapping) -> str | None:
    main = results["models"].get("instanas")
    peer = next((m for m in results["models"].values() if m.get("peer")), None)
    if not main or not peer:
        return None
    delta = 100.0 * (main["test_accuracy"] - peer["test_accuracy"])
    return (
        f"The MobileNetV2 path at {peer.get('width', 0):g}x width, the one whose deployed "
        f"latency is closest to and not below the main model's, reaches "
        f"{_percent(peer['test_accuracy'])}% at {_fixed(mean_latency(peer))} ms: the main model "
        f"is {delta:+.2f} points at {_fixed(mean_latency(main))} ms."
    )


def _overhead(results: Mapping) -> str | None:
    overhead = results.get("deployed_overhead")
    if not overhead:
        return None
    return (
        f"Controller and routing cost {_fixed(overhead['controller_and_routing_ms'])} ms, "
        f"{100 * overhead['share_of_main_model']:.1f}% of the main model's deployed latency "
        f"(its routed graph {_fixed(overhead['routed_ms'])} ms against its "
        f"{overhead['exported_children']} children alone, {_fixed(overhead['children_ms'])} ms)."
    )


def _static_child(results: Mapping) -> str | None:
    main, static = results["models"].get("instanas"), results["models"].get("static-child")
    if not main or not static:
        return None
    delta = 100.0 * (main["test_accuracy"] - static["test_accuracy"])
    static_at = f"{_percent(static['test_accuracy'])}% at {_fixed(mean_latency(static))} ms"
    main_at = f"{delta:+.2f} points at {_fixed(mean_latency(main))} ms"
    return (f"The best static child (the controller's child closest to and not below the main "
            f"model's latency, fine-tuned alone) reaches {static_at}: the main model is "
            f"{main_at}.")  # fmt: skip


def _oracle(results: Mapping) -> str | None:
    oracle = results["models"].get("oracle")
    if not oracle or "test_accuracy" not in oracle:
        return None
    return (
        f"The oracle reaches {_percent(oracle['test_accuracy'])}% test accuracy at "
        f"{_fixed(mean_latency(oracle))} ms of table-predicted latency: a bound, not a "
        "timing."
    )


def _device_sentence(results: Mapping) -> str | None:
    device = results.get("device")
    if not isinstance(device, dict):
        return None
    images = next(
        (
            _latency(m, "images")
            for m in results["models"].values()
            if _latency(m, "images") is not None
        ),
        None,
    )
    over = f" over {images} test images" if images is not None else ""
    runtime = device.get("runtime", f"torch {device.get('torch', '?')}")
    deployed = (
        " as deployed (the exported graphs, run as instanas.runtime runs them); eager PyTorch "
        "figures are kept beside them"
        if device.get("backend") == "onnxruntime"
        else ""
    )
    return (
        f"Latency is batch-1 wall clock per image{over} on {device.get('name', '?')} "
        f"({device.get('type', '?')}, {device.get('threads', '?')} thread(s)), "
        f"{runtime}{deployed}."
    )


def _timing(results: Mapping) -> str | None:
    """What the deployed timing loop met: nothing to say after one quiet pass."""
    passes = results.get("timing_passes") or []
    kept = next((p for p in passes if p.get("kept")), None)
    if kept is None or len(passes) == 1 and not kept["disturbed"]:
        return None
    scores = ", ".join(f"{p['disturbance']:.2f}" for p in passes)
    if kept["disturbed"]:
        return (
            f"The timing was disturbed in every pass ({len(passes)}; median per-image std/mean "
            f"{scores}, above 0.5: other work shared the machine), so its latencies are not to "
            "be relied on: time again on a quiet machine with `instanas evaluate --output RUN`."
        )
    return (
        f"The timing loop ran {len(passes)} times (median per-image std/mean {scores}): a pass "
        "above 0.5 shared the machine with other work and was timed again; the latencies are "
        f"the quiet pass's ({kept['disturbance']:.2f})."
    )


def summary_sentences(results: Mapping) -> list[str]:
    sentences = (
        _instanas_vs_mbv2_path(results),
        _dominance(results),
        _controller_vs_random(results),
        _routing(results),
        _escalation(results),
        _peer(results),
        _overhead(results),
        _static_child(results),
        _oracle(results),
        _device_sentence(results),
        _timing(results),
        undertrained_sentence(results.get("undertrained") or []),
    )
    return [s for s in sentences if s]


# --- results.md ------------------------------------------------------------------------------


def results_markdown(results: dict) -> str:
    lines = [
        f"# InstaNAS results: {results.get('preset', '')} on {results.get('dataset', '')}",
        "",
        "| model | kind | test accuracy | latency ms (mean ± std, p50, p90) | eager ms | "
        "table latency ms | MFLOPs | distinct children | mean active modules |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted_models(results["models"]):
        measured = (
            "table, bound"
            if is_bound(m)
            else (
                f"{_fixed(_latency(m, 'mean'))} ± {_fixed(_latency(m, 'std'))} "
                f"(p50 {_fixed(_latency(m, 'p50'))}, p90 {_fixed(_latency(m, 'p90'))})"
            )
        )
        lines.append(
            f"| {name} | {model_kind(name, m)} | {_percent(m.get('test_accuracy'))}% | "
            f"{measured} | {_fixed((m.get('latency_ms_eager') or {}).get('mean'))} | "
            f"{_fixed(m.get('table_latency_ms'))} | "
            f"{_fixed(m.get('flops'), 2, 1e-6)} | {m.get('distinct_children', '–')} | "
            f"{_fixed(m.get('mean_active_modules'), 1)} |"
        )
    lines += [""] + summary_sentences(results)
    if "wall_time_s" in results:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in results["wall_time_s"].items())
        lines += ["", f"Wall time: {parts}."]
    return "\n".join(lines) + "\n"


def write_results_markdown(results: dict, path: str | Path) -> None:
    atomic_write_text(path, results_markdown(results))


# --- report blocks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Image:
    path: Path  # the PNG itself, read to embed it in the HTML
    link: str  # relative to the run directory, for report.md
    caption: str


Block = Heading | Paragraph | Table | Code | Image


_MODELS_HEADER = ("model", "kind", "width", "test accuracy %", "test error %",
                  "latency mean ms", "std ms", "p50 ms", "p90 ms", "timed images",
                  "latency source", "table latency ms", "MFLOPs", "distinct children",
                  "mean active modules")  # fmt: skip


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _models_table(results: Mapping) -> Table:
    models = sorted_models(results["models"])
    extra = sorted(
        {
            key
            for _, m in models
            for key, v in m.items()
            if key not in _MODEL_FIELDS and _is_number(v)
        }
    )
    return Table((*_MODELS_HEADER, *extra), [_model_row(name, m, extra) for name, m in models])


def _model_row(name: str, m: Mapping, extra: Sequence[str]) -> tuple[str, ...]:
    width = model_width(name, m)
    accuracy = m.get("test_accuracy")
    error = 1.0 - accuracy if isinstance(accuracy, (int, float)) else None
    return (
        name,
        model_kind(name, m),
        "–" if width is None else f"{width:g}",
        _percent(accuracy),
        _percent(error),
        *(_fixed(_latency(m, f), 4) for f in ("mean", "std", "p50", "p90")),
        str(_latency(m, "images") or "–"),
        str(m.get("latency_source", "measured")),
        _fixed(m.get("table_latency_ms"), 4),
        _fixed(m.get("flops"), 3, 1e-6),
        str(m.get("distinct_children", "–")),
        _fixed(m.get("mean_active_modules"), 2),
        *(
            str(m[key])
            if isinstance(m.get(key), int) and not isinstance(m[key], bool)
            else _fixed(m.get(key), 4)
            for key in extra
        ),  # fmt: skip
    )


def _candidates_table(candidates: Sequence[Mapping]) -> Table:
    rows = [
        (
            str(c.get("name", "")),
            str(c.get("variant") or "–"),
            _percent(c.get("val_accuracy")),
            _fixed(c.get("val_latency_ms"), 4),
            "yes" if c.get("pareto") else "no",
        )
        for c in candidates
    ]
    return Table(
        (
            "candidate",
            "variant",
            "validation accuracy %",
            "validation latency ms",
            "on the Pareto front",
        ),
        rows,
    )


def _key_values(section: Any, unit: str = "") -> Table:
    rows = [(str(key), _display(value) + unit) for key, value in (section or {}).items()]
    return Table(("key", "value"), rows)


def _display(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    return str(value)


def _versions(results: Mapping) -> Table:
    import numpy

    table = _key_values(results.get("device"))
    table.rows.append(("numpy (this report)", numpy.__version__))
    if plotting_available():
        import matplotlib

        table.rows.append(("matplotlib (this report)", matplotlib.__version__))
    table.rows.append(("instanas (this report)", __version__))
    return table


def report_blocks(run_dir: Path, results: Mapping, plots: Sequence[Path]) -> list[Block]:
    title = f"InstaNAS report: {results.get('preset', '?')} on {results.get('dataset', '?')}"
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"Run directory {run_dir}; seed {results.get('seed', '?')}; "
            f"{results.get('test_images', '?')} test images."
        ),
        Heading("Summary"),
        *(Paragraph(s) for s in summary_sentences(results)),
        Heading("Models"),
        _models_table(results),
        Paragraph(
            "Latency is batch-1 wall clock per image in ms; a model whose latency "
            "source is 'table' was not timed: its latency is the table's prediction, a "
            "bound. MFLOPs are per image."
        ),
    ]
    if plots:
        blocks.append(Heading("Plots"))
        blocks += [Image(p, f"plots/{p.name}", _PLOT_CAPTIONS.get(p.name, p.stem)) for p in plots]
    elif not plotting_available():
        blocks += [Heading("Plots"), Paragraph(MISSING_MATPLOTLIB + ".")]
    candidates = (results.get("variants") or {}).get("candidates")
    if candidates:
        blocks += [Heading("Variant candidates"), _candidates_table(candidates)]
    for heading, key, unit in _KEY_VALUE_SECTIONS:
        if results.get(key):
            blocks += [Heading(heading), _key_values(results[key], unit)]
    blocks += [Heading("Device and versions"), _versions(results)]
    return blocks + _appendix(run_dir, results)


def _appendix(run_dir: Path, results: Mapping) -> list[Block]:
    """The run's config and every number of results.json, for reference."""
    config = run_dir / "config.yaml"
    numbers = [(path, format_number(value)) for path, value in flatten_numbers(results)]
    return [
        Heading("Configuration (config.yaml)"),
        Code(config.read_text()) if config.is_file() else Paragraph("no config.yaml"),
        Heading("Every number in results.json"),
        Table(("key", "value"), numbers),
    ]


# --- rendering -------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            lines = [
                "| " + " | ".join(map(_md_cell, block.header)) + " |",
                "|" + "---|" * len(block.header),
            ]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, Code):
            # A fence longer than any backtick run inside, so the config cannot end it early.
            longest = max((len(run) for run in re.findall(r"`+", block.text)), default=0)
            fence = "`" * max(3, longest + 1)
            parts.append(f"{fence}yaml\n{block.text.rstrip()}\n{fence}")
        else:
            parts.append(f"![{Path(block.link).stem}]({block.link})\n\n{block.caption}")
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f0f0f0}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    "figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
)


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{esc(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Code):
        return f"<pre><code>{esc(block.text)}</code></pre>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.path.stem)}">'
        f"<figcaption>{esc(block.caption)}</figcaption></figure>"
    )


def render_html(blocks: Sequence[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "InstaNAS report")
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Plots, then RUN_DIR/report.md and the self-contained RUN_DIR/report.html."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)  # first: a bad run directory must leave everything as is
    blocks = report_blocks(run_dir, results, write_plots(run_dir))
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(markdown, render_markdown(blocks))
    atomic_write_text(page, render_html(blocks))
    return markdown, page
