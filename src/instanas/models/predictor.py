"""The deployed InstaNAS network: the BatchNorm-folded controller picks a child per image, then
only that child's modules of the folded meta-graph run.

One network for every place that runs a trained controller and meta-graph as deployed: the
evaluation, ``instanas.load``, the latency table's validation and the static child's choice.
"""

from __future__ import annotations

import torch
from torch import nn

from .controller import Controller
from .metagraph import MetaGraph


class InstaNASPredictor(nn.Module):
    """BatchNorm-folded controller and meta-graph for inference at any batch size."""

    def __init__(self, metagraph: MetaGraph, controller: Controller) -> None:
        super().__init__()
        self.space = metagraph.space
        self.metagraph = metagraph.deploy()
        self.controller = controller.deploy()
        self.forced_cells = self.space.forced_mask().tolist()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of normalised images, each through the child its policy picks."""
        return self.logits(images)[0]

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
            cells.append(modules if modules or not forced else (self.space.forced_module,))
        return cells

    @torch.inference_mode()
    def logits_one(self, image: torch.Tensor) -> torch.Tensor:
        """Batch-1 path: controller, then only the selected modules of each cell."""
        return self.metagraph.forward_resolved(image, self.child_cells(image))

    @torch.inference_mode()
    def policies(self, images: torch.Tensor) -> torch.Tensor:
        """Resolved greedy policies [B, cells, modules] the controller picks (p >= 0.5)."""
        return self.metagraph.resolve(self.controller.policy_logits(images) >= 0)

    @torch.inference_mode()
    def logits(
        self, images: torch.Tensor, execution: str = "sparse"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched path with per-image policies; returns (logits, policies).

        ``execution``: ``"sparse"`` (each selected module runs once on the rows that chose it),
        ``"grouped"`` (one pass per distinct child) or ``"dense"`` (masked reference). Sparse is
        the default because children share most modules and grouping repeats them per child
        (docs/decisions.md, "Sparse execution is the deployed model's default").
        """
        policy = self.policies(images)
        return self.metagraph(images, policy, execution=execution), policy
