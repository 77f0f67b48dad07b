"""A trained run as an ``nn.Module``: ``instanas.load(run_dir)`` gives an :class:`InstaNASModel`
that takes images in any form ``preprocess`` accepts and routes each through the child the
controller picks (:class:`~instanas.models.predictor.InstaNASPredictor`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import yaml
from torch import nn

from .. import stage_specs
from ..checkpoint import load_tensors, read_checkpoint
from ..config import from_dict
from ..errors import CheckpointError
from ..models import build_models
from ..models.metagraph import ChildNetwork, MetaGraph, scaled_space
from ..models.predictor import Escalation
from ..models.predictor import InstaNASPredictor as InstaNASPredictor  # importable here too
from ..nn.backend import enlarge_primitive_cache
from ..runtime import preprocess_image, read_image, sha256_file
from ..space import ChildArchitecture, SearchSpace

if TYPE_CHECKING:
    import PIL.Image


# Float images a little outside [0, 1] (resampling overshoot) are fine; 0..255 floats are not.
_RANGE_SLACK = 0.05
# The main model's name; variants are called by their letter ("A".."E").
MAIN_MODEL = "instanas"
ImageInput = Union[
    torch.Tensor, str, Path, "PIL.Image.Image", Sequence[Union[str, Path, "PIL.Image.Image"]]
]


class InstaNASModel(nn.Module):
    """A trained InstaNAS model as an ``nn.Module``: ``instanas.load(run_dir)``.

    ``model(x)`` maps normalised images ``x`` [N, C, H, W] (``preprocess`` makes them) to logits
    [N, classes]: the controller picks a child per image, then only that child's modules run,
    with BatchNorm folded into the convolutions. ``predict``, ``predict_proba`` and ``route``
    take anything ``preprocess`` takes and work in chunks of ``batch_size`` images.
    ``results`` holds the run's ``results.json`` and ``metrics`` this model's entry in it
    (test accuracy, measured latency, device).
    """

    def __init__(
        self,
        predictor: InstaNASPredictor,
        classes: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        results: dict | None = None,
        name: str = MAIN_MODEL,
    ) -> None:
        super().__init__()
        self.predictor = predictor
        self.classes = list(classes)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.results = results or {}
        self.eval()

    @property
    def space(self) -> SearchSpace:
        return self.predictor.space

    @property
    def metrics(self) -> dict:
        """This model's entry of results.json (empty when the run has not been evaluated)."""
        key = self.name if self.name == MAIN_MODEL else f"{MAIN_MODEL}-{self.name}"
        return self.results.get("models", {}).get(key, {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] of normalised images (the output of ``preprocess``)."""
        return self.predictor.logits(x)[0]

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> the network's normalised float input [N, C, H, W] on the model's device.

        Takes a uint8 tensor (0..255) or a float tensor in [0, 1], [C, H, W] or [N, C, H, W] at
        the model's input size; a PIL image, an image file path, or a list of PIL images and
        paths, of any size and colour mode (converted to the model's mode, centre-cropped to a
        square and resized bilinearly, as class-folder training images are).
        """
        if isinstance(images, torch.Tensor):
            return self.normalise(images)
        items = (
            [images] if isinstance(images, (str, Path)) or hasattr(images, "mode") else list(images)
        )
        channels, size = self.space.input_channels, self.space.input_size
        arrays = [
            read_image(i, channels, size)
            if isinstance(i, (str, Path))
            else preprocess_image(i, channels, size)
            for i in items
        ]
        if not arrays:
            raise ValueError("no images given: pass a tensor, a PIL image, a path or a list")
        return self.normalise(torch.from_numpy(np.stack(arrays)))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (0..255) or float in [0, 1] -> the network's input."""
        images = _check_images(images, self.space)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values: clean the input")
        if images.is_floating_point() and (x.min() < -_RANGE_SLACK or x.max() > 1 + _RANGE_SLACK):
            raise ValueError(
                f"float images range over [{float(x.min()):.3g}, "
                f"{float(x.max()):.3g}], expected [0, 1]: divide 0..255 values by "
                "255 or pass uint8"
            )
        return ((x.to(self.mean.device) - self.mean) / self.std).contiguous()

    def _chunks(
        self, images: ImageInput, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, resolved policies) per chunk of ``batch_size`` preprocessed images."""
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}: pass a positive number, e.g. 256")
        x = self.preprocess(images)
        for start in range(0, len(x), batch_size):
            yield self.predictor.logits(x[start : start + batch_size])

    def predict(self, images: ImageInput, batch_size: int = 256) -> torch.Tensor:
        """Class indices [N]."""
        return torch.cat([logits.argmax(1) for logits, _ in self._chunks(images, batch_size)])

    def predict_proba(self, images: ImageInput, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities [N, classes] (softmax of the logits)."""
        return torch.cat([logits.softmax(1) for logits, _ in self._chunks(images, batch_size)])

    def route(self, images: ImageInput, batch_size: int = 256) -> list[str]:
        """The child each image runs, as a string (``"0-13-_-4"``, the empty-cell rule applied)."""
        return [
            str(ChildArchitecture.from_policy(p))
            for _, policy in self._chunks(images, batch_size)
            for p in policy.cpu()
        ]

    def policies(self, images: ImageInput, batch_size: int = 256) -> torch.Tensor:
        """Resolved per-image policies [N, cells, modules] the controller picks."""
        return torch.cat([policy for _, policy in self._chunks(images, batch_size)])


def _check_images(images: torch.Tensor, space: SearchSpace) -> torch.Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(0)
    channels, size = space.input_channels, space.input_size
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"images have shape {tuple(images.shape)}, expected [N, {channels}, "
            f"{size}, {size}]: resize them first, or pass PIL images or paths "
            "(preprocess resizes those)"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images are {images.dtype}: pass uint8 (0..255) or float (0..1)")
    return images


def model_checkpoint(run_dir: Path, model: str) -> tuple[str, Path]:
    """(canonical name, checkpoint) of ``model``: "instanas" or a variant letter "A".."E"."""
    name = model.removeprefix(f"{MAIN_MODEL}-") if model != MAIN_MODEL else model
    if name == MAIN_MODEL:
        return name, run_dir / stage_specs.get("finetune").output
    summary = run_dir / stage_specs.get("variants").output
    variants = json.loads(summary.read_text()) if summary.exists() else {}
    if name not in variants:
        known = ", ".join([MAIN_MODEL, *sorted(variants)])
        raise CheckpointError(f"{run_dir} has no model {model!r}: choose one of {known}")
    return name, run_dir / variants[name]["model"]


ESCALATION_RULE = "escalation/rule.json"
# The main model's deployed child set (controller.deployed_children), with the fine-tuned
# checkpoint it was read from: a set from other weights is stale.
DEPLOYED_CHILDREN = "finetune/children.json"


def deployed_children(run_dir: Path, space: SearchSpace, count: int) -> list | None:
    """The saved child set of ``count`` children, or None when there is none for these
    fine-tuned weights and this count."""
    path = run_dir / DEPLOYED_CHILDREN
    if count == 0 or not path.exists():
        return None
    saved = json.loads(path.read_text())
    model = run_dir / stage_specs.get("finetune").output
    if saved.get("count") != count or saved.get("model_sha256") != sha256_file(model):
        return None
    return [ChildArchitecture.from_string(c, space.num_modules) for c in saved["children"]]


def escalation_rule(run_dir: Path, space: SearchSpace) -> Escalation | None:
    """The main model's escalation (the threshold the escalation stage chose and the trained
    larger network), or None when the run has none."""
    path = run_dir / ESCALATION_RULE
    if not path.exists():
        return None
    rule = json.loads(path.read_text())
    network = load_network(run_dir, rule["network"], space)
    return Escalation(network.deploy().eval(), float(rule["threshold"]))


def static_checkpoints(run_dir: Path) -> dict[str, Path]:
    """Every static network a run has trained, by model name."""
    found = {"mbv2-path": run_dir / stage_specs.get("baseline").output,
             "static-child": run_dir / stage_specs.get("static-child").output}  # fmt: skip
    found.update({p.stem: p for p in (run_dir / "baseline").glob("*.safetensors")})
    found.pop("mbv2", None)  # the MobileNetV2 path's own file, named above
    return {name: path for name, path in found.items() if path.exists()}


def load_network(run_dir: Path, name: str, space: SearchSpace) -> ChildNetwork:
    """A trained static network of the run (``static_checkpoints``), in eval mode."""
    path = static_checkpoints(run_dir).get(name)
    if path is None:
        known = ", ".join(sorted(static_checkpoints(run_dir)))
        raise CheckpointError(f"{run_dir} has no network {name!r}: choose one of {known}")
    tensors, meta = read_checkpoint(path)
    if "metagraph" in {key.split(".")[0] for key in tensors}:  # the best static child
        metagraph = MetaGraph(space)
        load_tensors(path, tensors, meta, {"metagraph": metagraph})
        child = ChildArchitecture(tuple(tuple(m) for m in meta["child"]), space.num_modules)
        return metagraph.materialize(child).eval()
    width = float(meta.get("width", space.width)) / space.width
    child = ChildArchitecture.from_string(meta["child"], space.num_modules)
    network = MetaGraph(scaled_space(space, width)).materialize(child)
    load_tensors(path, tensors, meta, {"network": network})
    return network.eval()


def read_results(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}): run `instanas evaluate "
            f"--output {run_dir}` again to rewrite it"
        ) from exc


def load(run_dir: str | Path, model: str = MAIN_MODEL) -> InstaNASModel:
    """Load a trained model of a run directory as an :class:`InstaNASModel` (in eval mode).

    ``model``: ``"instanas"`` (the fine-tuned main model) or a variant letter ``"A"``..``"E"``.
    """

    enlarge_primitive_cache()
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(
            f"{run_dir} is not an instanas run directory (no config.yaml): "
            "pass the --output folder of `instanas run`"
        )
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    name, path = model_checkpoint(run_dir, model)
    tensors, meta = read_checkpoint(path)  # read once: metadata first, weights below
    space = SearchSpace.from_dict(meta["space"])
    metagraph, controller = build_models(space, config.controller_spec())
    load_tensors(path, tensors, meta, {"metagraph": metagraph, "controller": controller})
    results = read_results(run_dir)
    norm = meta["normalization"]
    escalation = escalation_rule(run_dir, space) if name == MAIN_MODEL else None
    children = (
        deployed_children(run_dir, space, config.controller.deployed_children)
        if name == MAIN_MODEL
        else None
    )
    return InstaNASModel(
        InstaNASPredictor(metagraph.eval(), controller.eval(), escalation, children),
        meta["classes"],
        tuple(norm["mean"]),
        tuple(norm["std"]),
        results,
        name,
    )
