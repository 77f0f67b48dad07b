"""Deployed inference: the controller picks a child per image, then only its modules run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from .controller import Controller
from .metagraph import MetaGraph
from .space import FORCED_DEFAULT_MODULE, SearchSpace


class InstaNASPredictor:
    """BatchNorm-folded controller and meta-graph for inference at any batch size."""

    def __init__(self, metagraph: MetaGraph, controller: Controller) -> None:
        self.space = metagraph.space
        self.metagraph = metagraph.deploy()
        self.controller = controller.deploy()
        self.forced_cells = self.space.forced_mask().tolist()

    def to(self, device: torch.device | str) -> "InstaNASPredictor":
        self.metagraph.to(device)
        self.controller.to(device)
        return self

    @torch.inference_mode()
    def child_cells(self, image: torch.Tensor) -> list[tuple[int, ...]]:
        """Resolved module ids per cell chosen by the controller for one image [1, C, H, W].

        The same greedy policy and empty-cell rule as the batched path, decoded in plain Python
        from one host copy: at batch 1 every extra tensor operation costs about as much as a
        small convolution (tests check both paths agree).
        """
        rows = (self.controller.policy_logits(image)[0] >= 0).tolist()
        cells = []
        for row, forced in zip(rows, self.forced_cells):
            modules = tuple(m for m, on in enumerate(row) if on)
            cells.append(modules if modules or not forced else (FORCED_DEFAULT_MODULE,))
        return cells

    @torch.inference_mode()
    def logits_one(self, image: torch.Tensor) -> torch.Tensor:
        """Batch-1 path: controller, then only the selected modules of each cell."""
        cells = self.child_cells(image)
        graph = self.metagraph
        x = graph.stem(image)
        for cell, modules in zip(graph.cells, cells):
            x = cell.forward_modules(x, modules)
        return graph.head(x)

    @torch.inference_mode()
    def policies(self, images: torch.Tensor) -> torch.Tensor:
        """Resolved greedy policies [B, cells, modules] the controller picks (p >= 0.5)."""
        return self.metagraph.resolve(self.controller.policy_logits(images) >= 0)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, execution: str = "sparse"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched path with per-image policies; returns (logits, policies).

        ``execution``: ``"sparse"`` (each selected module runs once on the rows that chose it),
        ``"grouped"`` (one pass per distinct child) or ``"dense"`` (masked reference). Sparse is
        the default (bench/inference.py): as fast with one child per batch, faster with
        several, since children share most modules and grouping repeats them per child.
        """
        policy = self.policies(images)
        return self.metagraph(images, policy, execution=execution), policy


# Float images a little outside [0, 1] (resampling overshoot) are fine; 0..255 floats are not.
_RANGE_SLACK = 0.05


class InstaNASModel:
    """A trained run loaded for use from Python: ``instanas.load(run_dir).predict(images)``."""

    def __init__(self, predictor: InstaNASPredictor, classes: list[str], mean: tuple[float, ...],
                 std: tuple[float, ...], results: dict | None = None) -> None:
        self.predictor = predictor
        self.classes = classes
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.results = results or {}

    @property
    def space(self) -> SearchSpace:
        return self.predictor.space

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (0..255) or float in [0, 1] -> the network's input."""
        space = self.space
        if images.dim() == 3:
            images = images.unsqueeze(0)
        expected = (space.input_channels, space.input_size, space.input_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected [N, "
                             f"{expected[0]}, {expected[1]}, {expected[2]}]: resize them first")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images are {images.dtype}: pass uint8 (0..255) or float (0..1)")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values: clean the input")
        if images.is_floating_point() and (x.min() < -_RANGE_SLACK or x.max() > 1 + _RANGE_SLACK):
            raise ValueError(f"float images range over [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}], expected [0, 1]: divide 0..255 values by "
                             "255 or pass uint8")
        return (x - self.mean) / self.std

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices for a batch of images."""
        logits, _ = self.predictor.logits(self.normalise(images))
        return logits.argmax(1)

    def policies(self, images: torch.Tensor) -> torch.Tensor:
        """Resolved per-image policies [N, cells, modules] the controller picks."""
        _, policy = self.predictor.logits(self.normalise(images))
        return policy


def load(run_dir: str | Path) -> InstaNASModel:
    """Load the fine-tuned InstaNAS model of a finished run directory."""
    from .checkpoint import CheckpointError, load_tensors, read_checkpoint
    from .config import from_dict

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"{run_dir} is not an instanas run directory (no config.yaml): "
                              "pass the --output folder of `instanas run`")
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    path = run_dir / "finetune" / "model.safetensors"
    tensors, meta = read_checkpoint(path)  # read once: metadata first, weights below
    space = SearchSpace.from_dict(meta["space"])
    metagraph = MetaGraph(space)
    controller = Controller(space.input_channels, space.num_cells, space.num_modules,
                            config.controller_spec())
    load_tensors(path, tensors, meta, {"metagraph": metagraph, "controller": controller})
    results_path = run_dir / "results.json"
    results = None
    if results_path.exists():
        try:
            results = json.loads(results_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{results_path} is not valid JSON ({exc}): run `instanas "
                                  f"evaluate --output {run_dir}` again to rewrite it") from exc
    norm = meta["normalization"]
    return InstaNASModel(InstaNASPredictor(metagraph.eval(), controller.eval()), meta["classes"],
                         tuple(norm["mean"]), tuple(norm["std"]), results)
