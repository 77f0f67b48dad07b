"""Training a standalone network: the baselines (the MobileNetV2 path at several widths and the
minimum network).

Each is trained from scratch for as many epochs as the meta-graph gets in all three stages
together (``baseline.epochs``), with the same optimiser and schedule, so that the comparison
with InstaNAS spends the same training budget on each model.
"""

from __future__ import annotations

from functools import partial

from ..models.metagraph import ChildNetwork, build_min_network, mbv2_path_network, scaled_space
from ..run_context import RunContext
from ..training import EpochPlan, accuracy, cosine, sgd, supervised_epoch
from .common import save_stage
from .loop import EpochLoop


def width_name(width: float) -> str:
    """Model name of the MobileNetV2 path at ``width`` times the preset's width."""
    return "mbv2-path" if width == 1.0 else f"mbv2-{width:g}x"


def reference_networks(ctx: RunContext) -> dict[str, ChildNetwork]:
    """The extra baselines this run's config asks for, untrained, by model name."""
    networks = {
        width_name(w): mbv2_path_network(scaled_space(ctx.space, w))
        for w in ctx.config.mbv2_path_widths()
    }
    if ctx.config.baseline.min_net:
        networks["min-net"] = build_min_network(ctx.space)
    return networks


def reference_path(ctx: RunContext, name: str):
    return ctx.run_dir / "baseline" / f"{name}.safetensors"


def train_standalone(
    ctx: RunContext, net: ChildNetwork, name: str, output, extra: dict | None = None
) -> ChildNetwork:
    """Train ``net`` alone under ``baseline.*`` and save it to ``output`` (resumable per epoch);
    ``extra`` goes into the checkpoint's metadata."""
    cfg = ctx.config.baseline
    epochs = ctx.config.baseline_epochs()
    net = ctx.prepare(net)
    optimizer = sgd(net.parameters(), cfg.lr, cfg.weight_decay)
    stage = "baseline" if name == "mbv2-path" else f"baseline/{name}"
    plan = EpochPlan(stage, epochs, cfg.batch_size, cfg.lr, "baseline.lr", cosine)

    def train_epoch(epoch: int) -> dict:
        net.train()
        stats = supervised_epoch(
            ctx, net, lambda images, progress: net(images), optimizer, plan, epoch
        )
        net.eval()
        return stats.record(val_accuracy=accuracy(ctx, net, ctx.data.val))

    meta = {"stage": stage, "epochs": epochs, "model": name, "child": str(net.child),
            "width": net.space.width, **(extra or {})}  # fmt: skip
    write = partial(save_stage, ctx, output, {"network": net}, meta)
    EpochLoop(stage, epochs, {"network": net}, {"sgd": optimizer}).run(ctx, train_epoch, write)
    return net
