"""What ``instanas export`` exports: a routed model of a run or one of its static networks,
with the run's data loaded the way the run loaded it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, from_dict
from ..data import DataBundle, load_configured
from ..errors import ExportError
from ..models.metagraph import ChildNetwork
from ..space import SearchSpace
from .inference import MAIN_MODEL, InstaNASModel, load, load_network, static_checkpoints


@dataclass
class Source:
    """What is exported: a routed model (``routed``) or a static network of the run."""

    name: str
    model: InstaNASModel  # the run's main model: classes, normalisation, and the routed model
    network: ChildNetwork | None = None  # set for a static network

    @property
    def space(self) -> SearchSpace:
        return self.network.space if self.network is not None else self.model.space


def open_source(run_dir: Path, model: str) -> Source:
    """The model to export: routed (main model, variant) or a static network of the run."""
    statics = static_checkpoints(run_dir)
    if model in statics:
        main = load(run_dir)
        network = load_network(run_dir, model, main.space).deploy().eval()
        return Source(model, main, network)
    try:
        routed = load(run_dir, model)
    except Exception as exc:  # an unknown name: say every model the run can export
        known = ", ".join([MAIN_MODEL, *sorted(statics)])
        raise ExportError(
            f"{run_dir} has no model {model!r} to export ({exc}): choose one of {known} or a "
            "variant letter"
        ) from None
    return Source(routed.name, routed)


def run_data(run_dir: Path, space: SearchSpace | None = None) -> tuple[Config, DataBundle]:
    """The run's config and its data splits, loaded the way the run loaded them; a folder tree
    whose shape config.yaml leaves open (runs made before it recorded the inferred one) is read
    at the shape of the model's ``space``."""
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if space is not None and config.data.dataset == "folder":
        config.data.channels = config.data.channels or space.input_channels
        config.data.image_size = config.data.image_size or space.input_size
    return config, load_configured(config)
