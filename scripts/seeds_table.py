"""One markdown table of several runs of the same preset (e.g. two seeds), from their results.json.

python scripts/seeds_table.py runs/fashion-cpu-s0 runs/fashion-cpu-s1

Latency cells give the run's latency backend first (the exported graph in onnxruntime for the
default preset) and the eager PyTorch figure in brackets when the run kept one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("instanas", "static-child", "mbv2-peer", "random-policy", "mbv2-path")
LABEL = {
    "instanas": "instanas (main model)",
    "static-child": "best static child",
    "mbv2-peer": "MobileNetV2 width at the main model's latency (peer)",
    "random-policy": "random policy, same table latency",
    "mbv2-path": "MobileNetV2 path",
}


def latency(m: dict) -> str:
    eager = m.get("latency_ms_eager")
    second = f" (eager {eager['mean']:.3f})" if eager else ""
    return f"{m['latency_ms']['mean']:.3f} ms{second}"


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
        if name == "mbv2-peer":
            routing = f", width {m.get('width', 0):g}x"
        cells.append(f"{100 * m['test_accuracy']:.2f}% at {latency(m)}{routing}")
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

    def peer(r: dict) -> str:
        c = r["comparison"]
        if "peer_points" not in c:
            return "–"
        return f"{c['peer_points']:+.2f} points, peer at {c['peer_latency_ratio']:.2f}x the latency"

    def escalation(r: dict) -> str:
        m = r["models"]["instanas"]
        esc = m.get("escalation")
        if not esc:
            return "–"
        gain = 100 * (m["test_accuracy"] - esc["shuffled_accuracy"])
        return (
            f"{100 * esc['share']:.1f}% escalated, {gain:+.2f} points over the same share at "
            f"random ({100 * esc['shuffled_accuracy']:.2f}%), child alone "
            f"{100 * esc['child_accuracy']:.2f}%"
        )

    def overhead(r: dict) -> str:
        o = r.get("deployed_overhead")
        if not o:
            return "–"
        return (
            f"{o['controller_and_routing_ms']:.3f} ms, "
            f"{100 * o['share_of_main_model']:.1f}% of the main model"
        )

    def wall(r: dict) -> str:
        total = r.get("wall_time_s", {}).get("total")
        return f"{total / 60:.1f} min" if total else "–"

    return [
        f"| instanas vs MobileNetV2 path | {each(mbv2)} |",
        f"| instanas vs best static child | {each(static)} |",
        f"| instanas vs peer | {each(peer)} |",
        f"| escalation | {each(escalation)} |",
        f"| routing vs shuffled routing | {each(routed)} |",
        f"| controller and routing, deployed | {each(overhead)} |",
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
