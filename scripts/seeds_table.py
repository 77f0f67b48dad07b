"""One markdown table of several runs of the same preset (e.g. two seeds), from their results.json.

python scripts/seeds_table.py runs/fashion-cpu-s0 runs/fashion-cpu-s1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("instanas", "static-child", "random-policy", "mbv2-path")
LABEL = {
    "instanas": "instanas (main model)",
    "static-child": "best static child",
    "random-policy": "random policy, same table latency",
    "mbv2-path": "MobileNetV2 path",
}


def row(name: str, runs: list[dict]) -> str:
    cells = []
    for results in runs:
        m = results["models"].get(name)
        if m is None:
            cells.append("–")
            continue
        count = m.get("distinct_children", 1)
        routing = (
            f", {count} {'child' if count == 1 else 'children'} (effective "
            f"{m['effective_children']:.1f}, top {100 * m['top_child_share']:.0f}%)"
            if name == "instanas"
            else ""
        )
        cells.append(
            f"{100 * m['test_accuracy']:.2f}% at {m['latency_ms']['mean']:.3f} ms{routing}"
        )
    return f"| {LABEL.get(name, name)} | " + " | ".join(cells) + " |"


def comparison_rows(runs: list[dict]) -> list[str]:
    def each(fn) -> str:
        return " | ".join(fn(r) for r in runs)

    def mbv2(r: dict) -> str:
        c = r["comparison"]
        return (
            f"{100 * c['latency_reduction']:.1f}% faster, {c['accuracy_delta_points']:+.2f} points"
        )

    def static(r: dict) -> str:
        c = r["comparison"]
        if "static_child_points" not in c:
            return "–"
        return (
            f"{c['static_child_points']:+.2f} points, child at "
            f"{c['static_child_latency_ratio']:.2f}x the latency"
        )

    def routed(r: dict) -> str:
        c, m = r["comparison"], r["models"]["instanas"]
        return (
            f"{c['routing_gain_points']:+.2f} points "
            f"({100 * m['shuffled_routing_accuracy']:.2f}% shuffled)"
        )

    def wall(r: dict) -> str:
        total = r.get("wall_time_s", {}).get("total")
        return f"{total / 60:.1f} min" if total else "–"

    return [
        f"| instanas vs MobileNetV2 path | {each(mbv2)} |",
        f"| instanas vs best static child | {each(static)} |",
        f"| routing vs shuffled routing | {each(routed)} |",
        f"| wall time of the run | {each(wall)} |",
    ]


def main() -> int:
    folders = [Path(a) for a in sys.argv[1:]]
    if not folders:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs = [json.loads((f / "results.json").read_text()) for f in folders]
    header = " | ".join(f"seed {r['seed']}" for r in runs)
    lines = [f"| model | {header} |", "|---|" + "---|" * len(runs)]
    lines += [row(name, runs) for name in ORDER if any(name in r["models"] for r in runs)]
    lines += comparison_rows(runs)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
