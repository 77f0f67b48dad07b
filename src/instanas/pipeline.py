"""Run directories and the order of the stages: what `instanas run` and each stage command do."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import torch

from . import distributed, stage_specs
from .budgets import describe, resolve_budgets
from .config import Config, load_config_file, to_yaml
from .data import DataBundle, default_augmentation, load_configured
from .errors import ConfigError
from .latency.calibration import random_children
from .latency.table import LatencyTable
from .latency.validation import (
    TableValidation,
    controller_children,
    plot_validation,
    validate_table,
)
from .models.metagraph import mbv2_path
from .models.predictor import InstaNASPredictor
from .nn.backend import enlarge_primitive_cache
from .report.diagnostics import undertrained
from .report.document import write_report, write_results_markdown
from .report.live import require_tensorboard
from .report.plots import MISSING_MATPLOTLIB, plotting_available
from .run_context import RunContext
from .stages import registry
from .stages.common import (
    given_table,
    latency_backend,
    latency_table,
    load_stage,
    new_models,
    require_previous,
    stage_path,
    verify_output,
)
from .stages.resume import newest_readable, stop_after_epoch
from .utils import atomic_write_text, set_seed, write_json

log = logging.getLogger("instanas")


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def existing_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    return load_config_file(path) if path.exists() else None


def check_writable(run_dir: Path) -> None:
    probe = (
        run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    )
    if not probe.is_dir() or not _writable(probe):
        raise ConfigError(
            f"cannot write the run directory {run_dir} ({probe} is not writable): "
            "choose another --output"
        )


def _writable(path: Path) -> bool:
    # Try it: permission bits say nothing for root, nor about read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def open_run(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    command: str | None = None,
    pinned: Collection[str] = (),
    shape: tuple[int, int, int] | None = None,
) -> RunContext:
    """Load the data and check the checkpoints ``command`` reads, then set up.

    ``shape`` (channels, size, classes) stands in for the data where only the model's shape
    matters (``instanas profile --shape``): nothing is read. Every check runs before anything
    is written, so bad input leaves no trace.
    """
    check_writable(run_dir)
    enlarge_primitive_cache()
    if config.tensorboard:
        require_tensorboard()
    if config.latency.table:
        check_table_path(Path(config.latency.table))
    set_seed(config.seed)
    device = _set_up_device(config)
    data = _run_data(config, device, shape, pinned)
    space = config.search_space(data.channels, data.image_size, data.num_classes)
    if space.final_size < 2:
        side = f"{space.final_size}x{space.final_size}"
        log.warning("the last cells work on %s maps; BatchNorm may fail on single images", side)
    ctx = RunContext(config, run_dir, device, data, space, resume=resume)
    verify_inputs(ctx, command)
    check_free_space(ctx, command)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    _log_to_file(run_dir)
    if shape is None:
        sizes = f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test images"
    else:
        sizes = f"no data read, the model's shape only ({data.name}, {data.num_classes} classes)"
    log.info("run directory %s; %s; space %s", run_dir, sizes, space.fingerprint())
    return ctx


def check_table_path(table: Path) -> None:
    """``latency.table`` names a JSON file that exists."""
    if table.is_dir():
        raise ConfigError(f"latency.table {table} is a folder: give a JSON file, e.g. "
                          f"--latency.table {table / 'latency_table.json'}")  # fmt: skip
    if not table.exists():
        raise ConfigError(f"latency.table {table} does not exist: write one with `instanas "
                          "profile --output DIR` on the target device and pass "
                          "DIR/latency_table.json")  # fmt: skip


def _set_up_device(config: Config) -> torch.device:
    # The thread count fixes the order of floating-point sums: saved, a resumed or repeated run
    # adds in the same order (docs/reproducibility.md).
    config.threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(config.threads)
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is visible: use --device cpu")
    device = distributed.init_from_environment(config.device)
    check_shares(config)
    if not distributed.is_main():  # rank 0 logs for everyone
        logging.getLogger("instanas").setLevel(logging.WARNING)
    return device


def check_shares(config: Config) -> None:
    """Under torchrun every training batch must split evenly across the ranks."""
    ranks = distributed.world_size()
    for section in ("baseline", "pretrain", "search", "finetune"):
        size = getattr(config, section).batch_size
        if size % ranks:
            raise ConfigError(
                f"{section}.batch_size {size} does not split across {ranks} processes: "
                f"give a multiple of {ranks} (it is the global batch of all processes)"
            )


def _run_data(
    config: Config, device: torch.device, shape: tuple[int, int, int] | None, pinned
) -> DataBundle:
    """The run's data with its budgets resolved, or only its shape (nothing read)."""
    if shape is not None:
        return DataBundle.shape_only(*shape)
    data = on_device(_load_data(config), device)
    resolve_budgets(config, len(data.train), pinned)
    return data


def _load_data(config: Config) -> DataBundle:
    """The run's data; unset augmentation options take the data set's defaults and a folder
    tree's unset channels and image size the inferred ones, so config.yaml shows what runs."""
    data = load_configured(config)
    d = config.data
    if d.stream is None:  # the automatic choice, pinned: a resume reads the data the same way
        d.stream = hasattr(data.train, "stream_batches")
    if d.dataset == "folder":
        # The shape inferred from the images, pinned as well: a resume, the stage commands and
        # `instanas export` decode the tree at the shape the model was built for.
        d.channels, d.image_size = data.channels, data.image_size
    for key, value in default_augmentation(data).items():
        if getattr(d, key) is None:
            setattr(d, key, value)
    return data


def on_device(data: DataBundle, device: torch.device) -> DataBundle:
    """On a GPU, in-memory splits move there whole as uint8 (a few hundred MB for CIFAR), so
    batches are sliced and augmented on the GPU without host-to-device copies per step."""
    if device.type != "cuda" or hasattr(data.train, "stream_batches"):
        return data
    data.train, data.val, data.test = (s.to(device) for s in (data.train, data.val, data.test))
    return data


def verify_inputs(ctx: RunContext, command: str | None) -> None:
    """Fail early on a corrupt or foreign checkpoint that ``command`` would read later."""
    if command is None:
        return
    if ctx.config.latency.table:
        given_table(ctx, Path(ctx.config.latency.table))
    training = [stage.name for stage in stage_specs.training_stages()]
    if command == "run":
        stages = training
    elif command in stage_specs.names():
        stages = [*stage_specs.get(command).needs, command]
    else:
        return
    for stage in stages:
        verify_output(ctx, stage)
        if ctx.resume and stage in training:
            newest_readable(ctx, stage)


def check_free_space(ctx: RunContext, command: str | None) -> None:
    """Fail before training when the disk cannot hold the checkpoints ``command`` will write."""
    if command not in ("run", *(stage.name for stage in stage_specs.training_stages())):
        return
    probe = next(p for p in (ctx.run_dir, *ctx.run_dir.parents) if p.exists())
    free, need = shutil.disk_usage(probe).free, _bytes_needed(ctx, command)
    if free < need:
        raise ConfigError(
            f"{probe} has {free / 2**20:.0f} MiB free but {command} writes about "
            f"{need / 2**20:.0f} MiB of checkpoints: free space or choose another "
            "--output"
        )


def _bytes_needed(ctx: RunContext, command: str) -> int:
    names = [s.name for s in stage_specs.training_stages()] if command == "run" else [command]
    todo = [name for name in names if not stage_path(ctx, name).exists()]
    if not todo:
        return 0
    # fork_rng: building the models must not move the seeded generator the stages start from.
    with torch.random.fork_rng(devices=[]):
        metagraph, controller = new_models(ctx)
    weights = sum(
        t.numel() * t.element_size()
        for module in (metagraph, controller)
        for t in module.state_dict().values()
    )
    # Two epoch states and one being written, each weights plus up to two optimiser moments;
    # the stage output; and, when searching, one checkpoint per search epoch still to run.
    search_epochs = 0
    if "search" in todo:
        done = len(list((ctx.run_dir / "search").glob("epoch_*.safetensors")))
        search_epochs = max(ctx.config.search.epochs - done, 0)
    snapshots = search_epochs * ctx.config.search.snapshots_per_epoch
    return weights * (3 * 3 + 1 + snapshots + ctx.config.variants.count)


def _log_to_file(run_dir: Path) -> None:
    if not distributed.is_main():
        return
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


def validate_latency_table(
    ctx: RunContext, table: LatencyTable, random_count: int
) -> TableValidation:
    """``instanas profile --validate``: random children, plus the controller's own children on
    the validation split when the run has a searched or fine-tuned controller."""
    cfg = ctx.config.latency
    metagraph, controller = new_models(ctx)
    children = [(c, "random", 0) for c in random_children(metagraph, random_count, ctx.config.seed)]
    children.append((mbv2_path(ctx.space), "mbv2-path", 0))
    children += trained_controller_children(ctx, metagraph, controller)
    log.info("validating with %d random children and %d of the run's controller",
             random_count, len(children) - random_count - 1)  # fmt: skip
    options = {"threads": cfg.threads, "warmup": cfg.warmup, "repeats": cfg.repeats,
               "seed": ctx.config.seed}  # fmt: skip
    graph, ctrl = metagraph.cpu().eval(), controller.cpu().eval()
    result = validate_table(table, graph, ctrl, children, latency_backend(ctx), **options)
    result.save(ctx.run_dir / "latency_validation.json")
    plot_validation(result, ctx.run_dir / "latency_validation.png")
    return result


def trained_controller_children(ctx: RunContext, metagraph, controller) -> list[tuple]:
    """(child, "controller", images) for the children the run's fine-tuned (else searched)
    controller picks on the validation split; none before the search. Loads those weights."""
    trained = next((s for s in ("finetune", "search") if stage_path(ctx, s).exists()), None)
    if trained is None or len(ctx.data.val) == 0:  # no data read (profile --shape)
        return []
    load_stage(ctx, trained, {"metagraph": metagraph, "controller": controller})
    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.val, 500, train=False)])
    predictor = InstaNASPredictor(metagraph.cpu().eval(), controller.cpu().eval())
    used = controller_children(predictor, images.contiguous())
    return [(child, "controller", n) for child, n in used.values()]


def run_stage(ctx: RunContext, name: str, timings: dict[str, float]) -> None:
    stage, run = stage_specs.get(name), registry.MODULES[name].run
    require_previous(ctx.run_dir, name)
    start = time.perf_counter()
    # Every stage starts from the seed, so a stage run on its own (`instanas search`) builds the
    # same initial weights as the same stage inside `instanas run`.
    set_seed(ctx.config.seed)
    budget = describe(ctx.config, name, len(ctx.data.train))
    if budget:
        log.info(budget)
    with contextlib.ExitStack() as scope:
        if stage.resumable:
            scope.enter_context(stop_after_epoch())
        if not stage.data_parallel and distributed.active():
            if distributed.is_main():
                with distributed.alone():
                    run(ctx)
        else:
            run(ctx)
    distributed.barrier()  # the next stage may read this one's output
    timings[name] = time.perf_counter() - start
    log.info("%s done in %.0f s", name, timings[name])


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
    """Merge ``timings`` into the run's timings.json; ``total`` is the sum of every stage's
    time, so a resumed run's total counts the stages its earlier invocations ran."""
    merged = {**_previous_timings(run_dir), **timings}
    merged.pop("total", None)
    write_json(run_dir / "timings.json", {**merged, "total": sum(merged.values())})


def run_all(ctx: RunContext, resume: bool = False) -> dict[str, float]:
    """Profile, then every stage in order; with ``resume`` the finished stages are skipped.

    On resume, evaluation runs again only when some stage ran (its numbers would be stale) or
    when it never finished; a finished run is left as it is and the result has no stage times.
    """
    if not plotting_available():
        log.warning(MISSING_MATPLOTLIB)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    distributed.main_first(lambda: latency_table(ctx))
    if not (resume and "profile" in _previous_timings(ctx.run_dir)):
        # A resumed run reuses its table: the first invocation's profiling time stands.
        timings["profile"] = time.perf_counter() - start
    ran = False
    for stage in stage_specs.STAGES:
        if not stage.enabled(ctx.config):
            log.info("%s switched off in the config, skipping", stage.name)
            continue
        finished = stage_path(ctx, stage.name).exists() and not (stage.refresh and ran)
        if resume and finished:
            log.info("%s already done, skipping", stage.name)
            continue
        run_stage(ctx, stage.name, timings)
        save_timings(ctx.run_dir, timings)
        ran = True
    return timings if ran else {}


def finalize_results(ctx: RunContext) -> dict:
    """Add the wall time of every stage to results.json and rewrite results.md."""
    path = ctx.run_dir / "results.json"
    results = json.loads(path.read_text())
    results["wall_time_s"] = _previous_timings(ctx.run_dir)
    records = [
        json.loads(line)
        for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    results["undertrained"] = undertrained(records)
    write_json(path, results)
    write_results_markdown(results, ctx.run_dir / "results.md")
    md, html = write_report(ctx.run_dir)
    log.info("report: %s, %s", md, html)
    return results
