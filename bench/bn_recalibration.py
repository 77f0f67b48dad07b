"""BatchNorm recalibration of a routed model: batch by batch against one forward.

    .venv/bin/python bench/bn_recalibration.py RUN_DIR [--batches 8] [--draws 3]

The run's fine-tuned meta-graph and controller are loaded with their BatchNorm layers (not
folded). For several draws of ``--batches`` x ``search.batch_size`` training images (not
augmented), its statistics are re-estimated for the controller's greedy policies in two ways
and the model scored on the validation split:

* batch by batch: PyTorch's cumulative average over the batches, each normalised in training
  mode with its own statistics (instanas before this script);
* one forward: the same images as one batch, so every layer normalises with, and keeps, the
  statistics of all the images that run its module (``nn.batchnorm.recalibrate_batchnorm``).

Prints the validation accuracy of the statistics the run saved and of each draw and way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch import nn

from instanas.checkpoint import load_tensors, read_checkpoint
from instanas.config import from_dict
from instanas.data import images_of
from instanas.deploy.inference import MAIN_MODEL, load, model_checkpoint
from instanas.deploy.source import run_data
from instanas.models import build_models
from instanas.nn.batchnorm import recalibrate_batchnorm
from instanas.space import SearchSpace


@torch.no_grad()
def recalibrate_batch_by_batch(model: nn.Module, forward, batches: list[torch.Tensor]) -> None:
    """The former way: a cumulative average of per-batch statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images in batches:
        forward(images)
    model.eval()


def trained_networks(run: Path) -> tuple[nn.Module, nn.Module]:
    """The run's fine-tuned meta-graph and controller as trained, BatchNorm layers kept."""
    config = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    _, path = model_checkpoint(run, MAIN_MODEL)
    tensors, meta = read_checkpoint(path)
    graph, controller = build_models(SearchSpace.from_dict(meta["space"]), config.controller_spec())
    load_tensors(path, tensors, meta, {"metagraph": graph, "controller": controller})
    return graph.eval(), controller.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    model = load(args.run)  # normalisation and data; its networks are BatchNorm-folded
    graph, controller = trained_networks(args.run)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in graph.modules())
    assert norms, "the loaded meta-graph has no BatchNorm layers to recalibrate"
    _, data = run_data(args.run, model.space)
    saved = {k: v.clone() for k, v in graph.state_dict().items()}

    def forward(images: torch.Tensor) -> torch.Tensor:
        return graph(images, graph.resolve(controller.policy_logits(images) >= 0))

    @torch.no_grad()
    def val_accuracy() -> float:
        graph.eval()
        index = torch.arange(len(data.val))
        images, labels = model.normalise(images_of(data.val, index)), data.val.labels[index]
        right = sum(int((forward(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum())
                    for i in range(0, len(images), 500))  # fmt: skip
        return right / len(images)

    print(f"{args.run}: {norms} BatchNorm layers; validation accuracy of the saved statistics "
          f"{100 * val_accuracy():.2f}%")  # fmt: skip
    print("| draw | batch by batch | one forward |")
    print("|---|---|---|")
    size = args.batch_size
    for draw in range(args.draws):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(draw))
        batches = [model.normalise(images_of(data.train, order[i * size : (i + 1) * size]))
                   for i in range(args.batches)]  # fmt: skip
        scores = []
        for way in (recalibrate_batch_by_batch, recalibrate_batchnorm):
            graph.load_state_dict(saved)
            way(graph, forward, batches)
            scores.append(val_accuracy())
        print(f"| {draw} | {100 * scores[0]:.2f}% | {100 * scores[1]:.2f}% |")


if __name__ == "__main__":
    main()
