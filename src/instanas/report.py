"""results.md: the short human-readable summary next to results.json."""

from __future__ import annotations

from pathlib import Path

from .utils import atomic_write_text


def _fmt_lat(lat: dict) -> str:
    return f"{lat['mean']:.3f} ± {lat['std']:.3f} (p50 {lat['p50']:.3f}, p90 {lat['p90']:.3f})"


def results_markdown(results: dict) -> str:
    dev = results["device"]
    lines = [
        f"# InstaNAS results: {results.get('preset', '')} on {results.get('dataset', '')}",
        "",
        f"Latency measured at batch 1 on **{dev['name']}** ({dev['type']}, {dev['threads']} "
        f"thread(s)), torch {dev['torch']}, over "
        f"{next(iter(results['models'].values()))['latency_ms']['images']} test images.",
        "",
        "| model | test accuracy | measured latency ms (mean ± std) | table latency ms | MFLOPs "
        "| distinct children | mean active modules |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {100 * m['test_accuracy']:.2f}% | {_fmt_lat(m['latency_ms'])} | "
                     f"{m['table_latency_ms']:.3f} | {m['flops'] / 1e6:.2f} | "
                     f"{m.get('distinct_children', 1)} | {m.get('mean_active_modules', 0):.1f} |")
    comp = results.get("comparison")
    if comp:
        saving = comp["latency_reduction"]
        direction = "lower" if saving >= 0 else "higher"
        lines += ["", f"InstaNAS measured mean latency is **{100 * abs(saving):.1f}% {direction}"
                  f"** than the MobileNetV2 path, at {comp['accuracy_delta_points']:+.2f} "
                  "points of test accuracy."]
    if "wall_time_s" in results:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in results["wall_time_s"].items())
        lines += ["", f"Wall time: {parts}."]
    return "\n".join(lines) + "\n"


def write_results_markdown(results: dict, path: str | Path) -> None:
    atomic_write_text(path, results_markdown(results))
