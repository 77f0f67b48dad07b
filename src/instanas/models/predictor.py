"""The deployed InstaNAS network: the BatchNorm-folded controller picks a child per image, then
only that child's modules of the folded meta-graph run; with an escalation rule, an image the
child is unsure of (top softmax probability below the threshold) runs a larger network instead.

One network for every place that runs a trained controller and meta-graph as deployed: the
evaluation, ``instanas.load``, the latency table's validation and the static child's choice.
The exported graphs (``models/onnx_graph.routed_graphs``, run by ``instanas.runtime``) compute
the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..space import ChildArchitecture
from .controller import Controller
from .metagraph import MetaGraph


@dataclass
class Escalation:
    """The second decision: ``network`` (deployed) answers when the child's top softmax
    probability is below ``threshold``."""

    network: nn.Module
    threshold: float

    def unsure(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool [N]: the rows the child is unsure of."""
        return torch.softmax(logits, dim=1).amax(dim=1) < self.threshold


class InstaNASPredictor(nn.Module):
    """BatchNorm-folded controller and meta-graph for inference at any batch size.

    ``children``: the deployed child set (``controller.deployed_children``); a policy that is
    none of them runs the one differing in the fewest (cell, module) entries, ties to the
    earlier (more used), as the exported router does. None: every policy runs as picked.
    """

    def __init__(
        self,
        metagraph: MetaGraph,
        controller: Controller,
        escalation: Escalation | None = None,
        children: Sequence[ChildArchitecture] | None = None,
    ) -> None:
        super().__init__()
        self.space = metagraph.space
        self.metagraph = metagraph.deploy()
        self.controller = controller.deploy()
        self.forced_cells = self.space.forced_mask().tolist()
        self.escalation = escalation
        if escalation is not None:
            self.larger = escalation.network  # registered, so .to() and .eval() reach it
        self.child_set: list[ChildArchitecture] | None = None
        self.set_children(children)

    def set_children(self, children: Sequence[ChildArchitecture] | None) -> None:
        """Route within ``children`` from now on (None: no set)."""
        self.child_set = list(children) if children else None
        bits = None
        if self.child_set is not None:
            bits = child_policy_bits(self.child_set)
            self._child_cells = {c.cells for c in self.child_set}
        self.register_buffer("child_bits", bits, persistent=False)

    def nearest_policies(self, resolved: torch.Tensor) -> torch.Tensor:
        """Resolved policies [B, cells, modules] -> the deployed child each runs."""
        if self.child_bits is None:
            return resolved
        return nearest_child_policies(resolved, self.child_bits)

    def _nearest_cells(self, cells: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if self.child_set is None:
            return cells
        if tuple(cells) in self._child_cells:
            return cells
        wanted = {(c, m) for c, modules in enumerate(cells) for m in modules}
        best = min(self.child_set, key=lambda child: len(wanted ^ child.module_pairs()))
        return list(best.cells)

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
        return self._nearest_cells(cells)

    @torch.inference_mode()
    def logits_one(self, image: torch.Tensor) -> torch.Tensor:
        """Batch-1 path: controller, then only the selected modules of each cell (then the
        larger network if the child is unsure)."""
        logits = self.metagraph.forward_resolved(image, self.child_cells(image))
        if self.escalation is not None and bool(self.escalation.unsure(logits)[0]):
            return self.escalation.network(image)
        return logits

    @torch.inference_mode()
    def policies(self, images: torch.Tensor) -> torch.Tensor:
        """Resolved greedy policies [B, cells, modules] the controller picks (p >= 0.5),
        each mapped to the nearest deployed child when there is a child set."""
        resolved = self.metagraph.resolve(self.controller.policy_logits(images) >= 0)
        return self.nearest_policies(resolved)

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
        logits, policy, _ = self.answer(images, execution)
        return logits, policy

    @torch.inference_mode()
    def answer(
        self, images: torch.Tensor, execution: str = "sparse"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, resolved policies, escalated [N] bool) of a batch."""
        policy = self.policies(images)
        logits = self.metagraph(images, policy, execution=execution)
        escalated = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        if self.escalation is not None:
            escalated = self.escalation.unsure(logits)
            if escalated.any():
                logits = logits.clone()
                logits[escalated] = self.escalation.network(images[escalated])
        return logits, policy, escalated

    def without_escalation(self) -> "InstaNASPredictor":
        """The same routed model answering every image with its child."""
        plain = InstaNASPredictor.__new__(InstaNASPredictor)
        nn.Module.__init__(plain)
        plain.space, plain.metagraph, plain.controller = self.space, self.metagraph, self.controller
        plain.forced_cells, plain.escalation = self.forced_cells, None
        plain.set_children(self.child_set)
        return plain


def child_policy_bits(children: Sequence[ChildArchitecture]) -> torch.Tensor:
    """Each child's policy, flattened: the rows :func:`nearest_child_policies` picks from."""
    return torch.stack([c.to_policy().flatten() for c in children])


def nearest_child_policies(resolved: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Resolved policies [B, cells, modules] -> the policy of the child in ``bits`` (one
    flattened policy per row) that differs from each in the fewest (cell, module) choices."""
    bits = bits.to(resolved.device)
    distance = (resolved.flatten(1).bool()[:, None, :] != bits[None]).sum(-1)
    return bits[distance.argmin(1)].view_as(resolved).to(resolved.dtype)
