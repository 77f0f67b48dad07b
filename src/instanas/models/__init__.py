"""The networks InstaNAS trains: the meta-graph (a supernet whose children are
architectures), the children materialised as plain networks, and the controller."""

from __future__ import annotations

from ..space import ControllerSpec, SearchSpace
from .controller import Controller
from .metagraph import MetaGraph


def build_models(space: SearchSpace, spec: ControllerSpec) -> tuple[MetaGraph, Controller]:
    """An untrained meta-graph of ``space`` and a controller of shape ``spec`` for it."""
    metagraph = MetaGraph(space)  # first: the seeded initial weights depend on the order
    return metagraph, Controller(space.input_channels, space.num_cells, space.num_modules, spec)
