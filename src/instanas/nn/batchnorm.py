"""BatchNorm under changing policies: statistics re-estimated for the policies that will run,
and frozen models that normalise each forward with its own batch's statistics.

A weight-sharing module sees very different inputs under different policies (a cell that sums
five modules vs one), so running statistics gathered under one policy distribution are wrong
under another (docs/design.md, "BatchNorm under changing policies").
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .. import distributed


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, forward: Callable[[torch.Tensor], object], batches: Iterable[torch.Tensor]
) -> None:
    """Re-estimate BatchNorm running statistics for the policies ``forward`` now runs.

    A weight-sharing module sees very different inputs under different policies (a cell that sums
    five modules vs one), so running statistics gathered under one policy distribution are wrong
    under another and eval-mode accuracy collapses. The images of ``batches`` go through
    ``forward`` as one batch, in training mode: every BatchNorm then normalises with the
    statistics of all the images that run its module, exactly the statistics it keeps, so each
    layer's statistics are measured on the inputs it gets at evaluation. Batch by batch, a
    module that runs for a few images of a batch is normalised with those few images' statistics
    and every layer after it measures inputs it never gets at evaluation: on the fashion-cpu main
    job that cost 5-40 points of validation accuracy, varying with the batches drawn
    (docs/decisions.md). Modules that no image selects keep their previous statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: of one batch, its statistics exactly
    was_training = model.training
    model.train()
    images = list(batches)
    if images:
        forward(torch.cat(images))
    for m, (mean, var, momentum) in zip(norms, saved):
        if int(m.num_batches_tracked) == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        m.momentum = momentum
    distributed.average_batchnorm_statistics([model])
    model.train(was_training)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Frozen model whose BatchNorm normalises with each batch's own statistics.

    Used where the meta-graph is frozen but the policies change every step (controller epochs):
    each forward normalises for exactly the children it runs. Momentum 0 leaves the running
    statistics untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
