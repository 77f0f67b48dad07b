"""What the stages share: new models of the run's shape, where each stage keeps its output in
the run directory and how it is read back, and the run's latency table."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .. import stage_specs
from ..checkpoint import (
    check_identity,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ..deploy.inference import DEPLOYED_CHILDREN, deployed_children, escalation_rule
from ..errors import CheckpointError, ConfigError
from ..latency.backends import Backend, make_backend
from ..latency.profiling import load_or_profile, profile_table
from ..latency.table import LatencyTable, default_cache_path, table_key
from ..models import build_models
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..models.predictor import InstaNASPredictor
from ..run_context import RunContext, run_identity
from ..runtime import sha256_file
from ..space import ChildArchitecture, ranked_children
from ..utils import atomic_copy, write_json

log = logging.getLogger("instanas")
# Validation images on which the static child's and the peer's choices time the main model
# beside their candidates: its mean includes the few escalated images, each several times
# dearer than the rest, so a few hundred images leave it noisy by several percent.
CHOICE_TIMED_IMAGES = 1000


def new_models(ctx: RunContext) -> tuple[MetaGraph, Controller]:
    """An untrained meta-graph and controller of this run's space and controller shape."""
    return build_models(ctx.space, ctx.config.controller_spec())


def searched_models(ctx: RunContext) -> tuple[MetaGraph, Controller]:
    """The meta-graph and controller the search selected: where the later stages start."""
    metagraph, controller = new_models(ctx)
    load_stage(ctx, "search", {"metagraph": metagraph, "controller": controller})
    return metagraph, controller


def load_candidate(
    ctx: RunContext, path: Path, weights: Path | None = None
) -> tuple[MetaGraph, Controller]:
    """Controller of checkpoint ``path``, meta-graph of ``weights`` (default: the same file)."""
    metagraph, controller = new_models(ctx)
    load_checkpoint(path, {"controller": controller}, expect=run_identity(ctx))
    load_checkpoint(weights or path, {"metagraph": metagraph}, expect=run_identity(ctx))
    return ctx.prepare(metagraph), ctx.prepare(controller).eval()


def stage_path(ctx: RunContext, stage: str) -> Path:
    """The file that marks ``stage`` as done in this run."""
    return ctx.run_dir / stage_specs.get(stage).output


def save_stage(ctx: RunContext, path: Path, modules: dict[str, nn.Module], meta: dict) -> None:
    save_checkpoint(path, modules, {**run_identity(ctx), **meta})


def load_stage(ctx: RunContext, stage: str, modules: dict[str, nn.Module]) -> dict:
    path = stage_path(ctx, stage)
    if not path.exists():
        raise CheckpointError(
            f"{ctx.run_dir} has no {stage} output "
            f"({stage_specs.get(stage).output}): run `instanas {stage} --output "
            f"{ctx.run_dir}` first"
        )
    return load_checkpoint(path, modules, expect=run_identity(ctx))


def verify_output(ctx: RunContext, stage: str) -> None:
    """Read the stage's output, if there is one, and check that it belongs to this run."""
    path = stage_path(ctx, stage)
    if path.exists() and path.suffix == ".safetensors":
        _, meta = read_checkpoint(path)
        check_identity(path, meta, run_identity(ctx))


def require_previous(run_dir: Path, stage: str) -> None:
    """Fail before anything is written when the stages ``stage`` builds on have not run."""
    for before in stage_specs.get(stage).needs:
        output = stage_specs.get(before).output
        if not (run_dir / output).exists():
            raise CheckpointError(
                f"{run_dir} has no {before} output ({output}): "
                f"run `instanas {before} --output {run_dir}` before "
                f"`instanas {stage}`"
            )


def checkpoint_order(path: Path) -> tuple[int, int]:
    """Chronological sort key of search/epoch_EEE[_partK].safetensors (end of epoch last)."""
    match = re.fullmatch(r"epoch_(\d+)(?:_part(\d+))?\.safetensors", path.name)
    if match is None:
        raise ValueError(f"{path} is not a search checkpoint name")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else 1 << 30


def search_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint the search kept, in the order they were written."""
    return sorted((run_dir / "search").glob("epoch_*.safetensors"), key=checkpoint_order)


def latency_table(ctx: RunContext, fresh: bool = False) -> LatencyTable:
    """The run's table: the one given with ``latency.table`` as it is, else reused from the run
    directory or the per-device cache when it fits this setup.

    ``fresh`` measures anew even when a matching table exists (and replaces it); a given table
    is never measured again nor overwritten.
    """
    cfg = ctx.config.latency
    local = ctx.run_dir / "latency_table.json"
    if cfg.table:
        table = given_table(ctx, Path(cfg.table))
        if Path(cfg.table).resolve() != local.resolve():
            atomic_copy(Path(cfg.table), local)
        return table
    metagraph, controller = new_models(ctx)
    target = latency_backend(ctx)
    path = default_cache_path(table_key(metagraph, controller, target, cfg.threads))
    if local.exists():
        path = local
    options = {
        "threads": cfg.threads,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "seed": ctx.config.seed,
        "calibration_children": cfg.calibration_children,
    }
    if fresh:
        profile_table(metagraph, controller, target, **options).save(path)
    table = load_or_profile(path, metagraph, controller, target, **options)
    if path.resolve() != local.resolve():
        atomic_copy(path, local)
    return table


def table_device(ctx: RunContext) -> torch.device:
    """Where the latency table is profiled (``latency.device``)."""
    device = torch.device(ctx.config.latency.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("latency.device is cuda but no CUDA GPU is visible: use cpu")
    return device


def latency_backend(ctx: RunContext) -> Backend:
    """The runtime every latency of the run is measured in (``latency.backend``)."""
    cfg = ctx.config.latency
    try:
        return make_backend(cfg.backend, cfg.threads, table_device(ctx))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# What a given table must share with the run. The device, torch version and thread count may
# differ: that is the point of profiling on the deployment device (docs/deploy.md).
_MODEL_KEYS = ("input_shape", "space", "controller", "dtype", "format", "backend")


def given_table(ctx: RunContext, path: Path) -> LatencyTable:
    """The table passed with ``--latency.table``, checked against this run's model shape."""
    try:
        table = LatencyTable.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"latency.table {path} cannot be read ({exc}): pass a table written "
            "by `instanas profile`"
        ) from exc
    with torch.random.fork_rng(devices=[]):  # building models must not move the seeded stream
        metagraph, controller = new_models(ctx)
    key = table_key(metagraph, controller, latency_backend(ctx), ctx.config.latency.threads)
    differ = [k for k in _MODEL_KEYS if table.key.get(k) != key[k]]
    if differ:
        raise ConfigError(
            f"latency.table {path} was profiled for another model "
            f"({', '.join(differ)} differ): profile on the target with `instanas "
            "profile --output DIR` and this run's config, then pass "
            "DIR/latency_table.json"
        )
    log.info(
        "latency table %s, profiled on %s (%s threads, torch %s)",
        path,
        table.key.get("device"),
        table.key.get("threads"),
        table.key.get("torch"),
    )
    return table


def finetuned_predictor(ctx: RunContext, escalate: bool = True) -> InstaNASPredictor:
    """The main model as deployed, on the CPU: the fine-tuned controller and meta-graph, its
    deployed child set (``controller.deployed_children``) and (``escalate``) the escalation
    rule when the run has one."""
    metagraph, controller = new_models(ctx)
    load_stage(ctx, "finetune", {"metagraph": metagraph, "controller": controller})
    escalation = escalation_rule(ctx.run_dir, ctx.space) if escalate else None
    predictor = InstaNASPredictor(metagraph.cpu().eval(), controller.cpu().eval(), escalation)
    predictor.set_children(main_model_children(ctx, predictor))
    return predictor


def main_model_children(
    ctx: RunContext, predictor: InstaNASPredictor
) -> list[ChildArchitecture] | None:
    """The main model's deployed child set: the ``controller.deployed_children`` children its
    fine-tuned controller picks most on the validation split (saved beside the fine-tuned
    weights; None when the setting is 0). Fine-tuning leaves the controller as it is, so the
    set chosen before fine-tuning (:func:`children_to_finetune`) is this one."""
    count = ctx.config.controller.deployed_children
    saved = deployed_children(ctx.run_dir, ctx.space, count)
    if count == 0 or saved is not None:
        return saved
    free = predictor.without_escalation()
    free.set_children(None)
    children = validation_children(ctx, free, count)
    _save_children(ctx, children, model_sha256=sha256_file(stage_path(ctx, "finetune")))
    return children


def children_to_finetune(ctx: RunContext, controller: Controller) -> list[ChildArchitecture] | None:
    """The child set the main model will deploy, chosen from the searched ``controller``'s
    picks on the validation split before fine-tuning, which then trains these children alone
    (docs/decisions.md). Saved with the search output's hash; None when the setting is 0."""
    count = ctx.config.controller.deployed_children
    if count == 0:
        return None
    source = sha256_file(stage_path(ctx, "search"))
    path = ctx.run_dir / DEPLOYED_CHILDREN
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("count") == count and saved.get("search_sha256") == source:
        return [ChildArchitecture.from_string(c, ctx.space.num_modules) for c in saved["children"]]
    metagraph, _ = new_models(ctx)  # the policies need only the space's empty-cell rule
    predictor = InstaNASPredictor(metagraph.eval(), copy.deepcopy(controller).cpu().eval())
    children = validation_children(ctx, predictor, count)
    _save_children(ctx, children, search_sha256=source)
    return children


def record_finetuned_children(ctx: RunContext) -> None:
    """Key the child set chosen before fine-tuning to the fine-tuned weights as well."""
    path = ctx.run_dir / DEPLOYED_CHILDREN
    if path.exists():
        saved = json.loads(path.read_text())
        saved["model_sha256"] = sha256_file(stage_path(ctx, "finetune"))
        write_json(path, saved)


def _save_children(ctx: RunContext, children: list[ChildArchitecture], **keys: str) -> None:
    count = ctx.config.controller.deployed_children
    write_json(ctx.run_dir / DEPLOYED_CHILDREN,
               {"count": count, "children": [str(c) for c in children], **keys})  # fmt: skip
    log.info("the main model deploys %d children: %s", len(children),
             ", ".join(str(c) for c in children))  # fmt: skip


def validation_children(
    ctx: RunContext, predictor: InstaNASPredictor, limit: int | None = None
) -> list[ChildArchitecture]:
    """The children the controller picks on the validation split, most used first: the ones a
    deployed graph holds (the predictor's child set when it has one)."""
    if predictor.child_set is not None:
        return list(predictor.child_set[:limit])
    images = validation_images(ctx)
    policies = torch.cat(
        [predictor.policies(images[i : i + 500]) for i in range(0, len(images), 500)]
    )
    return [child for child, _ in ranked_children(policies, limit)]


def validation_images(ctx: RunContext, limit: int | None = None) -> torch.Tensor:
    """Normalised validation images on the CPU (the first ``limit``)."""
    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.val, 500, train=False)])
    return (images if limit is None else images[:limit]).contiguous()


def closest_not_below(times: dict, target: float):
    """The key whose time is the smallest at or above ``target``; else the slowest."""
    above = {k: t for k, t in times.items() if t >= target}
    if above:
        return min(above, key=above.get)
    return max(times, key=times.get)
