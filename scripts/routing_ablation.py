"""Search-setting ablation for instance-aware routing, from one shared pretrained meta-graph.

Each setting copies BASE's config and pretrained meta-graph into OUT/NAME, applies its
overrides, runs the search (and, with --finetune, the fine-tuning), then scores the searched
controller's greedy policies on the test split: accuracy, table latency, how spread the routing
is (distinct and effective children, the most used child's share) and the accuracy under
shuffled routing (the same policies permuted across images). One JSON line per setting is
appended to OUT/ablation.jsonl.

    instanas pretrain -o runs/abl-base
    python scripts/routing_ablation.py runs/abl-base runs/abl budget \
        controller.reward=budget search.controller_norm=running --finetune
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from instanas import stage_specs
from instanas.config import apply_overrides, load_config_file
from instanas.pipeline import open_run, run_stage
from instanas.search.policy import evaluate_policies, greedy_of, shuffled_routing_accuracy
from instanas.stages.common import latency_table, load_stage, new_models
from instanas.stages.search import final_budget, select_epoch
from instanas.utils import append_jsonl


def prepare(base: Path, target: Path) -> None:
    if (target / stage_specs.get("search").output).exists():
        raise SystemExit(f"{target} already has a search: choose a new name")
    (target / stage_specs.get("pretrain").output).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        base / stage_specs.get("pretrain").output, target / stage_specs.get("pretrain").output
    )
    if (base / "latency_table.json").exists():
        shutil.copy(base / "latency_table.json", target / "latency_table.json")


def score(ctx, stage: str) -> dict:
    table = latency_table(ctx)
    metagraph, controller = new_models(ctx)
    load_stage(ctx, stage, {"metagraph": metagraph, "controller": controller})
    metagraph, controller = ctx.prepare(metagraph).eval(), ctx.prepare(controller).eval()
    test, policies = evaluate_policies(ctx, metagraph, greedy_of(controller), table, ctx.data.test)
    shuffled = shuffled_routing_accuracy(ctx, metagraph, policies, ctx.data.test, ctx.config.seed)
    return {
        "stage": stage,
        "test_accuracy": test.accuracy,
        "table_total_ms": test.total_ms,
        "cells_ms": test.cells_ms,
        "distinct_children": test.distinct_children,
        "effective_children": test.effective_children,
        "top_child_share": test.top_child_share,
        "shuffled_accuracy": shuffled,
        "routing_gain_points": 100 * (test.accuracy - shuffled),
    }


def markdown_table(path: Path, overrides_column: bool = True) -> str:
    """The settings of an ablation.jsonl as one markdown table (the last stage scored)."""
    rows = [
        "| setting | overrides | stage | distinct children | effective children | "
        "top child share | routing gain (points) | test accuracy | table latency ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        record = json.loads(line)
        stage = "finetune" if "finetune" in record else "search"
        s = record[stage]
        overrides = (
            " ".join(f"{k}={v}" for k, v in record["overrides"].items())
            or "(none: the base config)"
        )
        rows.append(
            f"| {record['name']} | `{overrides}` | {stage} | {s['distinct_children']} | "
            f"{s['effective_children']:.2f} | {s['top_child_share']:.2f} | "
            f"{s['routing_gain_points']:+.2f} | {100 * s['test_accuracy']:.2f}% | "
            f"{s['table_total_ms']:.3f} |"
        )
    if not overrides_column:
        rows = ["|".join(c for i, c in enumerate(r.split("|")) if i != 2) for r in rows]
    return "\n".join(rows)


def rescore(out: Path, name: str) -> dict:
    """Choose the search checkpoint again with the current rule and score it (search only)."""
    target = out / name
    ctx = open_run(load_config_file(target / "config.yaml"), target, command="search")
    table = latency_table(ctx)
    selected = json.loads((target / "search" / "selected.json").read_text())
    history, before = selected["history"], selected["chosen"]["checkpoint"]
    chosen = select_epoch(
        history,
        ctx.config.search.select_tolerance,
        final_budget(ctx, table),
        ctx.config.search.select,
    )
    shutil.copy(target / chosen["checkpoint"], target / stage_specs.get("search").output)
    lines = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
    for record in lines:
        if record["name"] == name:
            record["search"] = score(ctx, "search")
            record["search"]["epoch"] = chosen["epoch"]
            if chosen["checkpoint"] != before:  # fine-tuned from another checkpoint
                record.pop("finetune", None)
    (out / "ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return chosen


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--table", "--table-short"):
        print(markdown_table(Path(sys.argv[2]), overrides_column=sys.argv[1] == "--table"))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--rescore":
        print(rescore(Path(sys.argv[2]), sys.argv[3])["epoch"])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="python scripts/routing_ablation.py --table "
        "OUT/ablation.jsonl prints the results as a table",
    )
    parser.add_argument("base", type=Path, help="run directory with a finished pretrain stage")
    parser.add_argument("out", type=Path, help="folder of the ablation runs")
    parser.add_argument("name", help="name of this setting (its run folder under OUT)")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune and score that")
    args = parser.parse_args()
    overrides = dict(o.split("=", 1) for o in args.overrides)
    config = apply_overrides(load_config_file(args.base / "config.yaml"), overrides)
    target = args.out / args.name
    prepare(args.base, target)
    ctx = open_run(config, target, command="search")
    record = {"name": args.name, "overrides": overrides}
    timings: dict[str, float] = {}
    for stage in ("search", "finetune") if args.finetune else ("search",):
        run_stage(ctx, stage, timings)
        record[stage] = score(ctx, stage)
    history = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    record["search_epochs"] = [
        {k: v for k, v in h.items() if k != "time"} for h in history if h.get("stage") == "search"
    ]
    record["seconds"] = timings
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    append_jsonl(args.out / "ablation.jsonl", record)
    print(
        json.dumps(
            {k: record[k] for k in ("name", *[s for s in ("search", "finetune") if s in record])},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
