"""The MobileNetV2-path baseline (module 0 in every cell), trained standalone."""

from __future__ import annotations

from ..metagraph import ChildNetwork, build_mbv2_baseline
from ..training import RunContext, accuracy, cosine, sgd, supervised_epoch
from .common import save_stage, stage_path
from .resume import EpochCheckpoints


def train_baseline(ctx: RunContext) -> ChildNetwork:
    cfg = ctx.config.baseline
    epochs = ctx.config.baseline_epochs()
    net = ctx.prepare(build_mbv2_baseline(ctx.space))
    optimizer = sgd(net.parameters(), cfg.lr, cfg.weight_decay)
    checkpoints = EpochCheckpoints(ctx, "baseline", {"network": net}, {"sgd": optimizer})
    start, _ = checkpoints.restore()
    for epoch in range(start, epochs):
        net.train()
        stats = supervised_epoch(ctx, lambda images, progress: net(images), optimizer,
                                 base_lr=cfg.lr, lr_factor=cosine, epoch=epoch, epochs=epochs,
                                 batch_size=cfg.batch_size, stage="baseline")
        net.eval()
        ctx.log_metrics({"stage": "baseline", "epoch": epoch + 1, "train_loss": stats.loss,
                         "train_accuracy": stats.accuracy,
                         "val_accuracy": accuracy(ctx, net, ctx.data.val),
                         "seconds": stats.seconds})
        checkpoints.save(epoch + 1)
    save_stage(ctx, stage_path(ctx, "baseline"), {"network": net}, {"stage": "baseline",
                                                                    "epochs": epochs})
    checkpoints.finish()
    return net
