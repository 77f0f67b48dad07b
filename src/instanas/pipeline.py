"""Run directories and the order of the stages: what `instanas run` and each stage command do."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from .budgets import describe, resolve_budgets
from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config_file, to_yaml
from .data import default_augmentation, load_dataset
from .deploy.inference import InstaNASPredictor
from .evaluate import (
    evaluate,
    evaluate_instanas,
    evaluate_random_policy,
    evaluate_static,
    expected_latency,
    oracle,
)
from .latency.flops import count_flops
from .latency.table import (
    LatencyTable,
    default_cache_path,
    load_or_profile,
    profile_table,
    random_children,
    table_key,
)
from .latency.validation import (
    TableValidation,
    controller_children,
    plot_validation,
    validate_table,
)
from .models.metagraph import ChildNetwork, build_mbv2_baseline, mobilenetv2_path
from .report.diagnostics import undertrained
from .report.document import write_report, write_results_markdown
from .stages.baseline import reference_networks, reference_path, train_baseline, train_references
from .stages.common import (
    PREVIOUS,
    STAGE_FILES,
    load_stage,
    new_models,
    require_previous,
    stage_path,
    verify_output,
)
from .stages.finetune import finetune
from .stages.pretrain import pretrain
from .stages.random_policy import train_random_policy
from .stages.resume import newest_readable, stop_after_epoch
from .stages.search import search
from .stages.static_child import static_child_network, train_static_child
from .stages.variants import build_variants, load_candidate
from .training import RunContext, run_identity
from .utils import atomic_copy, atomic_write_bytes, atomic_write_text, set_seed, write_json

log = logging.getLogger("instanas")
STAGES = ("baseline", "pretrain", "search", "finetune", "random-policy", "static-child",
          "variants", "baselines", "evaluate")
TRAINING_STAGES = STAGES[:-1]
# Stages a config can switch off; run_all skips them then.
OPTIONAL = {"random-policy": lambda c: c.baseline.random_policy,
            "static-child": lambda c: c.baseline.static_child,
            "variants": lambda c: c.variants.count > 0,
            "baselines": lambda c: bool(c.mbv2_widths()) or c.baseline.min_net}


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def existing_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    return load_config_file(path) if path.exists() else None


def check_writable(run_dir: Path) -> None:
    probe = run_dir if run_dir.exists() else next(
        (p for p in run_dir.parents if p.exists()), Path("."))
    if not probe.is_dir() or not _writable(probe):
        raise ConfigError(f"cannot write the run directory {run_dir} ({probe} is not writable): "
                          "choose another --output")


def _writable(path: Path) -> bool:
    # Try it: permission bits say nothing for root, nor about read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def open_run(config: Config, run_dir: Path, *, resume: bool = False,
             command: str | None = None, pinned: Collection[str] = ()) -> RunContext:
    """Load the data and check the checkpoints ``command`` reads, then set up.

    Every check runs before anything is written, so bad input leaves no trace.
    """
    check_writable(run_dir)
    table = config.latency.table
    if table and Path(table).is_dir():
        raise ConfigError(f"latency.table {table} is a folder: give a JSON file, e.g. "
                          f"--latency.table {Path(table) / 'latency_table.json'}")
    set_seed(config.seed)
    # The thread count fixes the order of floating-point sums: saved, a resumed or repeated run
    # adds in the same order (docs/reproducibility.md).
    config.threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is visible: use --device cpu")
    d = config.data
    data = load_dataset(d.dataset, d.root, val_fraction=d.val_fraction, seed=config.seed,
                        image_size=d.image_size, limit_train=d.limit_train,
                        limit_test=d.limit_test)
    for key, value in default_augmentation(data).items():  # config.yaml shows what runs
        if getattr(d, key) is None:
            setattr(d, key, value)
    resolve_budgets(config, len(data.train), pinned)
    space = config.search_space(data.channels, data.image_size, data.num_classes)
    if space.final_size < 2:
        log.warning("the last cells work on %dx%d maps; BatchNorm may fail on single images",
                    space.final_size, space.final_size)
    ctx = RunContext(config, run_dir, device, data, space, resume=resume)
    verify_inputs(ctx, command)
    check_free_space(ctx, command)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    _log_to_file(run_dir)
    log.info("run directory %s; %d train / %d val / %d test images; space %s",
             run_dir, len(data.train), len(data.val), len(data.test), space.fingerprint())
    return ctx


def verify_inputs(ctx: RunContext, command: str | None) -> None:
    """Fail early on a corrupt or foreign checkpoint that ``command`` would read later."""
    if command is None:
        return
    stages = STAGES[:-1] if command == "run" else (*PREVIOUS.get(command, ()), command)
    for stage in stages:
        if stage in STAGE_FILES:
            verify_output(ctx, stage)
            if ctx.resume:
                newest_readable(ctx, stage)


def check_free_space(ctx: RunContext, command: str | None) -> None:
    """Fail before training when the disk cannot hold the checkpoints ``command`` will write."""
    if command not in ("run", *TRAINING_STAGES):
        return
    probe = next(p for p in (ctx.run_dir, *ctx.run_dir.parents) if p.exists())
    free, need = shutil.disk_usage(probe).free, _bytes_needed(ctx, command)
    if free < need:
        raise ConfigError(f"{probe} has {free / 2**20:.0f} MiB free but {command} writes about "
                          f"{need / 2**20:.0f} MiB of checkpoints: free space or choose another "
                          "--output")


def _bytes_needed(ctx: RunContext, command: str) -> int:
    todo = [s for s in (STAGES[:-1] if command == "run" else (command,))
            if not stage_path(ctx, s).exists()]
    if not todo:
        return 0
    # fork_rng: building the models must not move the seeded generator the stages start from.
    with torch.random.fork_rng(devices=[]):
        metagraph, controller = new_models(ctx)
    weights = sum(t.numel() * t.element_size() for module in (metagraph, controller)
                  for t in module.state_dict().values())
    # Two epoch states and one being written, each weights plus up to two optimiser moments;
    # the stage output; and, when searching, one checkpoint per search epoch still to run.
    search_epochs = 0
    if "search" in todo:
        done = len(list((ctx.run_dir / "search").glob("epoch_*.safetensors")))
        search_epochs = max(ctx.config.search.epochs - done, 0)
    snapshots = search_epochs * ctx.config.search.snapshots_per_epoch
    return weights * (3 * 3 + 1 + snapshots + ctx.config.variants.count)


def _log_to_file(run_dir: Path) -> None:
    logger = logging.getLogger("instanas")
    # One run per process at a time: a handler left by an earlier run (tests calling the CLI
    # in-process) would keep writing into that run's log.
    for old in [h for h in logger.handlers if getattr(h, "instanas_run_log", False)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.instanas_run_log = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


def latency_table(ctx: RunContext, fresh: bool = False) -> LatencyTable:
    """The run's table: reused from the run directory or the per-device cache when it fits.

    ``fresh`` measures anew even when a matching table exists (and replaces it).
    """
    cfg = ctx.config.latency
    metagraph, controller = new_models(ctx)
    cpu = torch.device("cpu")
    path = Path(cfg.table) if cfg.table else default_cache_path(
        table_key(metagraph, controller, cpu, cfg.threads))
    local = ctx.run_dir / "latency_table.json"
    if local.exists() and not cfg.table:
        path = local
    options = {"threads": cfg.threads, "warmup": cfg.warmup, "repeats": cfg.repeats,
               "seed": ctx.config.seed, "calibration_children": cfg.calibration_children}
    if fresh:
        profile_table(metagraph, controller, cpu, **options).save(path)
    table = load_or_profile(path, metagraph, controller, cpu, **options)
    if path.resolve() != local.resolve():
        atomic_copy(path, local)
    return table


def validate_latency_table(ctx: RunContext, table: LatencyTable,
                           random_count: int) -> TableValidation:
    """``instanas profile --validate``: random children, plus the controller's own children on
    the validation split when the run has a searched or fine-tuned controller."""
    cfg = ctx.config.latency
    metagraph, controller = new_models(ctx)
    children = [(c, "random", 0)
                for c in random_children(metagraph, random_count, ctx.config.seed)]
    children.append((mobilenetv2_path(ctx.space), "mbv2-path", 0))
    trained = next((s for s in ("finetune", "search") if stage_path(ctx, s).exists()), None)
    if trained:
        load_stage(ctx, trained, {"metagraph": metagraph, "controller": controller})
        images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.val, 500, train=False)])
        predictor = InstaNASPredictor(metagraph.cpu().eval(), controller.cpu().eval())
        used = controller_children(predictor, images.contiguous())
        children += [(child, "controller", n) for child, n in used.values()]
        log.info("validating with %d random children and the %d children the %s controller "
                 "picks on %d validation images", random_count, len(used), trained, len(images))
    else:
        log.info("no trained controller in %s: validating with %d random children only",
                 ctx.run_dir, random_count)
    result = validate_table(table, metagraph.cpu().eval(), controller.cpu().eval(), children,
                            threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats,
                            seed=ctx.config.seed)
    result.save(ctx.run_dir / "latency_validation.json")
    plot_validation(result, ctx.run_dir / "latency_validation.png")
    return result


def run_stage(ctx: RunContext, stage: str, timings: dict[str, float]) -> None:
    require_previous(ctx.run_dir, stage)
    start = time.perf_counter()
    # Every stage starts from the seed, so a stage run on its own (`instanas search`) builds the
    # same initial weights as the same stage inside `instanas run`.
    set_seed(ctx.config.seed)
    budget = describe(ctx.config, stage, len(ctx.data.train))
    if budget:
        log.info(budget)
    if stage == "baseline":
        with stop_after_epoch():
            train_baseline(ctx)
    elif stage == "pretrain":
        metagraph, _ = new_models(ctx)
        with stop_after_epoch():
            pretrain(ctx, metagraph)
    elif stage == "search":
        metagraph, controller = new_models(ctx)
        load_stage(ctx, "pretrain", {"metagraph": metagraph})
        table = latency_table(ctx)
        with stop_after_epoch():
            search(ctx, metagraph, controller, table)
    elif stage in ("finetune", "random-policy", "static-child"):
        # All three start from the searched meta-graph and controller.
        metagraph, controller = new_models(ctx)
        load_stage(ctx, "search", {"metagraph": metagraph, "controller": controller})
        train = {"finetune": finetune, "random-policy": train_random_policy,
                 "static-child": train_static_child}[stage]
        table = latency_table(ctx)
        with stop_after_epoch():
            train(ctx, metagraph, controller, table)
    elif stage == "variants":
        table = latency_table(ctx)
        with stop_after_epoch():
            build_variants(ctx, table)
    elif stage == "baselines":
        with stop_after_epoch():
            train_references(ctx)
    elif stage == "evaluate":
        run_evaluation(ctx)
    else:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    timings[stage] = time.perf_counter() - start
    log.info("%s done in %.0f s", stage, timings[stage])


def run_evaluation(ctx: RunContext) -> dict:
    """Evaluate every model the run has trained; write results.json, .md and the per-image data."""
    table = latency_table(ctx)
    metagraph, controller = new_models(ctx)
    load_stage(ctx, "finetune", {"metagraph": metagraph, "controller": controller})
    flops = count_flops(metagraph, controller)
    models = {"instanas": evaluate_instanas(ctx, metagraph, controller, table, flops,
                                            "instanas")}
    for letter, path in trained_variants(ctx).items():
        graph, ctrl = load_candidate(ctx, path)
        models[f"instanas-{letter}"] = evaluate_instanas(ctx, graph, ctrl, table, flops,
                                                         "variant")
    baseline = build_mbv2_baseline(ctx.space)
    load_stage(ctx, "baseline", {"network": baseline})
    models["mbv2-path"] = evaluate_static(ctx, baseline, table, "mbv2", width=1.0)
    for name, net in trained_references(ctx).items():
        kind = "min-net" if name == "min-net" else "mbv2"
        width = None if kind == "min-net" else net.space.width / ctx.space.width
        models[name] = evaluate_static(ctx, net, table, kind, width)
    if stage_path(ctx, "random-policy").exists():
        graph, _ = new_models(ctx)
        meta = load_stage(ctx, "random-policy", {"metagraph": graph})
        models["random-policy"] = evaluate_random_policy(ctx, graph, float(meta["rate"]), table,
                                                         flops)
    if stage_path(ctx, "static-child").exists():
        models["static-child"] = evaluate_static(ctx, static_child_network(ctx), table,
                                                 "static-child")
    samples = ctx.config.baseline.oracle_children
    oracle_entry = oracle(ctx, metagraph, controller, table, samples) if samples else None
    results, per_image = evaluate(ctx, models, table, oracle_entry,
                                  expected_latency(ctx, controller, table))
    results = {"preset": ctx.config.preset, "dataset": ctx.config.data.dataset,
               "seed": ctx.config.seed, "classes": list(ctx.data.classes), **results,
               "epochs": {"pretrain": ctx.config.pretrain.epochs,
                          "search": ctx.config.search.epochs,
                          "finetune": ctx.config.finetune.epochs,
                          "baseline": ctx.config.baseline_epochs()}}
    candidates = ctx.run_dir / "variants" / "candidates.json"
    if candidates.exists():
        results["variants"] = json.loads(candidates.read_text())
    policies = per_image.arrays["policies"]
    buffer = io.BytesIO()
    np.save(buffer, policies.reshape(len(policies), -1), allow_pickle=False)
    atomic_write_bytes(ctx.run_dir / "test_policies.npy", buffer.getvalue())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **per_image.arrays)
    atomic_write_bytes(ctx.run_dir / "test_per_image.npz", buffer.getvalue())
    write_json(ctx.run_dir / "results.json", results)
    write_results_markdown(results, ctx.run_dir / "results.md")
    return results


def trained_variants(ctx: RunContext) -> dict[str, Path]:
    """Variant letter -> fine-tuned checkpoint, for the variants the run has finished."""
    if not stage_path(ctx, "variants").exists():
        return {}
    summary = json.loads(stage_path(ctx, "variants").read_text())
    return {letter: ctx.run_dir / v["model"] for letter, v in summary.items()}


def trained_references(ctx: RunContext) -> dict[str, ChildNetwork]:
    """The extra standalone baselines the run has trained, loaded."""
    networks = {}
    for name, net in reference_networks(ctx).items():
        path = reference_path(ctx, name)
        if path.exists():
            load_checkpoint(path, {"network": net}, expect=run_identity(ctx))
            networks[name] = net
    return networks


def _previous_timings(run_dir: Path) -> dict[str, float]:
    path = run_dir / "timings.json"
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        # Only wall times: not worth stopping a run for; they are rewritten from here on.
        log.warning("%s is unreadable (%s); earlier stage timings are dropped", path, exc)
        return {}


def save_timings(run_dir: Path, timings: dict[str, float]) -> None:
    write_json(run_dir / "timings.json", {**_previous_timings(run_dir), **timings})


def run_all(ctx: RunContext, resume: bool = False) -> dict[str, float]:
    """Profile, then every stage in order; with ``resume`` the finished stages are skipped.

    On resume, evaluation runs again only when some stage ran (its numbers would be stale) or
    when it never finished; a finished run is left as it is and the result has no stage times.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    latency_table(ctx)
    timings["profile"] = time.perf_counter() - start
    ran = False
    for stage in STAGES:
        if stage in OPTIONAL and not OPTIONAL[stage](ctx.config):
            log.info("%s switched off in the config, skipping", stage)
            continue
        finished = stage_path(ctx, stage).exists() if stage != "evaluate" else \
            not ran and (ctx.run_dir / "results.json").exists()
        if resume and finished:
            log.info("%s already done, skipping", stage)
            continue
        run_stage(ctx, stage, timings)
        save_timings(ctx.run_dir, timings)
        ran = True
    return timings if ran else {}


def finalize_results(ctx: RunContext) -> dict:
    """Add the wall time of every stage to results.json and rewrite results.md."""
    path = ctx.run_dir / "results.json"
    results = json.loads(path.read_text())
    results["wall_time_s"] = _previous_timings(ctx.run_dir)
    records = [json.loads(line) for line in
               (ctx.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results["undertrained"] = undertrained(records)
    write_json(path, results)
    write_results_markdown(results, ctx.run_dir / "results.md")
    md, html = write_report(ctx.run_dir)
    log.info("report: %s, %s", md, html)
    return results
