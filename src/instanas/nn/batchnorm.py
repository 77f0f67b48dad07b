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
    under another and eval-mode accuracy collapses. This replaces them with the exact average
    over ``batches``; modules that no batch selects keep their previous statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    for images in batches:
        forward(images)
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
