"""FLOPs of the latency table's units and of static networks (device independent).

Counted once per unit with torch's ``FlopCounterMode`` (2 x multiply-adds of convolutions and
linear layers), over the same units as the latency table (``latency.profiling.timing_units``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from .backends import EagerBackend
from .profiling import timing_units


@dataclass
class FlopsTable:
    modules: torch.Tensor  # [cells, modules]
    fixed: dict[str, float]

    def per_image(
        self, resolved_policy: torch.Tensor, include_controller: bool = True
    ) -> torch.Tensor:
        names = ["stem", "head"] + (["controller"] if include_controller else [])
        cells = (resolved_policy.float().cpu() * self.modules).flatten(-2).sum(-1)
        return cells + sum(self.fixed[n] for n in names)


def count_flops(metagraph: MetaGraph, controller: Controller) -> FlopsTable:
    """Multiply-add FLOPs (x2) of every unit at batch 1, counted by running it once."""
    graph = metagraph.deploy().cpu()
    ctrl = controller.deploy().cpu()
    counts = {}
    units, _ = timing_units(graph, ctrl, EagerBackend())
    for name, fn in units.items():
        mode = FlopCounterMode(display=False)
        with mode, torch.inference_mode():
            fn()
        counts[name] = float(mode.get_total_flops())
    space = metagraph.space
    modules = torch.tensor(
        [
            [counts[f"cell{c}/m{m}"] for m in range(space.num_modules)]
            for c in range(space.num_cells)
        ]
    )
    return FlopsTable(modules, {n: counts[n] for n in ("stem", "head", "controller")})


def network_flops(network: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs (2 x multiply-adds) of one batch-1 forward of a static network."""
    mode = FlopCounterMode(display=False)
    with mode, torch.inference_mode():
        network(torch.zeros(1, *input_shape))
    return float(mode.get_total_flops())
