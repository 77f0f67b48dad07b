"""The one-shot meta-graph: a policy-driven supernet and its materialised children.

Every stage (pretraining, search, fine-tuning, evaluation, inference) goes through
:meth:`MetaGraph.forward` with a per-image policy, so the empty-cell rule and the module sum are
the same everywhere. Two execution modes compute the same function:

* ``"sparse"`` (default): each module runs only on the rows whose policy selects it (gather,
  run, scatter-add). A module no row selects does not run at all.
* ``"grouped"`` (inference): images with the same resolved child form a group, and each group
  runs its child's modules on its rows only. Best when few distinct children share a batch.
* ``"dense"``: every module runs on every row and its output is multiplied by the mask. Kept as
  the reference the other paths are tested against, never used for speed.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..nn.batchnorm import batch_statistics
from ..nn.ops import ConvBNAct, build_candidate, fold_batchnorm
from ..nn.rows import gather_row_sets, sum_row_sets
from ..space import (
    MBV2_PATH_MODULE,
    CellSpec,
    ChildArchitecture,
    SearchSpace,
    apply_empty_cell_rule,
)


def run_stack(x: torch.Tensor, cells: Iterable[Sequence[nn.Module]]) -> torch.Tensor:
    """The cell stack when the whole batch runs the same modules in each cell: every cell's
    output is the sum of its modules' outputs; a cell without modules is the identity.

    The one executor of static children: the meta-graph's batch-wide and batch-1 paths, the
    materialised :class:`ChildNetwork` and the deployed predictor all run through it.
    """
    for modules in cells:
        out = None
        for module in modules:
            y = module(x)
            out = y if out is None else out + y
        x = x if out is None else out
    return x


class Cell(nn.Module):
    """One cell: the candidate modules with separate weights; output is the sum of the selected."""

    def __init__(self, spec: CellSpec, space: SearchSpace) -> None:
        super().__init__()
        self.spec = spec
        self.candidates = nn.ModuleList(
            build_candidate(c, spec.in_channels, spec.out_channels, spec.stride)
            for c in space.candidates
        )

    def forward_sparse(
        self, x: torch.Tensor, policy: torch.Tensor, counts: list[int], has_empty: bool = True
    ) -> torch.Tensor:
        """``policy`` bool [B, modules] already resolved by the empty-cell rule; ``counts``
        the rows per module and ``has_empty`` whether some row selects nothing, both read by
        the caller (host values: no device synchronisation here)."""
        batch = x.shape[0]
        out: torch.Tensor | None = None
        if not self.spec.forced_default and has_empty:
            empty = ~policy.any(dim=1)
            out = x * empty.view(-1, 1, 1, 1).to(x.dtype)
        partial: list[int] = []
        for m, count in enumerate(counts):
            if count == batch:  # every row: no gather, no scatter
                y = self.candidates[m](x)
                out = y if out is None else out + y
            elif count > 0:  # a module no row selects does not run
                partial.append(m)
        if partial:
            # The sizes are known on the host: nonzero_static does not wait for the device.
            row_sets = [
                torch.nonzero_static(policy[:, m], size=counts[m]).squeeze(1) for m in partial
            ]
            inputs = gather_row_sets(x, row_sets)
            outputs = [self.candidates[m](rows_in) for m, rows_in in zip(partial, inputs)]
            out = sum_row_sets(out, batch, row_sets, outputs)
        assert out is not None, "resolved policies never leave a shape-changing cell empty"
        return out

    def forward_dense(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        mask = policy.to(x.dtype)
        out = sum(
            module(x) * mask[:, m].view(-1, 1, 1, 1) for m, module in enumerate(self.candidates)
        )
        if not self.spec.forced_default:
            empty = (mask.sum(dim=1) == 0).to(x.dtype)
            out = out + x * empty.view(-1, 1, 1, 1)
        return out


def sparse_row_counts(policies: torch.Tensor) -> list[list[list[int]]]:
    """What sparse execution needs on the host, for resolved policies [sets, B, cells,
    modules]: per set and cell, the rows of each module and then 1 if some row selects nothing.
    One device-to-host transfer for every set (the one synchronisation of a training step)."""
    empty = (~policies.any(dim=3)).any(dim=1, keepdim=True).transpose(1, 2)
    return torch.cat([policies.sum(dim=1), empty], dim=2).tolist()


@dataclass
class ChildScores:
    """Per row of stacked policy sets (:meth:`MetaGraph.score_policy_sets`)."""

    correct: torch.Tensor  # bool: the child's prediction is the label
    log_prob: torch.Tensor  # log-likelihood of the label under the child
    resolved: torch.Tensor  # the child's policy after the empty-cell rule


class Head(nn.Module):
    def __init__(self, in_channels: int, head_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(in_channels, head_channels, 1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Global average pooling, never a fixed kernel: any input size works.
        return self.classifier(self.conv(x).mean(dim=(2, 3)))


class MetaGraph(nn.Module):
    """Stem, cells of candidate modules, head."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.stem = ConvBNAct(space.input_channels, space.stem_out_channels, 3, space.stem_stride)
        self.cells = nn.ModuleList(Cell(spec, space) for spec in space.cells())
        self.head = Head(space.cells()[-1].out_channels, space.head_out_channels, space.num_classes)
        self.register_buffer("forced", space.forced_mask(), persistent=False)

    def resolve(self, policy: torch.Tensor) -> torch.Tensor:
        """Apply the empty-cell rule to a [B, cells, modules] policy."""
        return apply_empty_cell_rule(policy, self.forced, self.space.forced_module)

    def forward(
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None = None,
        execution: str = "sparse",
        row_counts: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Logits for images ``x`` [B, C, H, W] under per-image ``policy`` [B, cells, modules].

        ``policy=None`` selects every module of every cell. ``row_counts``: the policy's
        :func:`sparse_row_counts` entry when the caller read it already (several forwards, one
        read).
        """
        if policy is None:
            return self.forward_resolved(
                x, tuple(tuple(range(len(cell.candidates))) for cell in self.cells)
            )
        x = self.stem(x)
        policy = self.resolve(policy.to(x.device))
        if execution == "dense":
            for c, cell in enumerate(self.cells):
                x = cell.forward_dense(x, policy[:, c])
        elif execution == "sparse":
            host = row_counts if row_counts is not None else sparse_row_counts(policy[None])[0]
            for c, cell in enumerate(self.cells):
                x = cell.forward_sparse(x, policy[:, c], host[c][:-1], bool(host[c][-1]))
        elif execution == "grouped":
            x = self.forward_groups(x, policy)
        else:
            raise ValueError(f"unknown execution {execution!r}: use 'sparse', 'grouped' or 'dense'")
        return self.head(x)

    def score_policy_sets(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        policies: torch.Tensor,
        own_statistics: bool,
    ) -> ChildScores:
        """How the children of several policy sets do on the same ``images`` [B, ...]: ``policies``
        [sets*B, cells, modules] stacks the sets (e.g. [sampled; greedy], or K samples and the
        greedy children), and so do the rows of the result.

        ``own_statistics``: BatchNorm normalises each set with that set's own batch statistics
        (one forward per set, running statistics untouched; what sparse execution needs of every
        set is read from the device at once), so a set is scored as it would run alone. Otherwise
        the running statistics normalise every row alike, and one forward runs every set.
        """
        resolved = self.resolve(policies)
        size = len(labels)
        sets = len(policies) // size
        if not own_statistics:  # rows are independent: one forward for every set
            logits = self(torch.cat([images] * sets), resolved)
        else:
            parts = resolved.view(sets, size, *resolved.shape[1:])
            counts = sparse_row_counts(parts)
            with batch_statistics(self):
                logits = torch.cat([self(images, p, row_counts=c) for p, c in zip(parts, counts)])
        targets = torch.cat([labels] * sets)
        log_prob = torch.log_softmax(logits.float(), 1).gather(1, targets[:, None]).squeeze(1)
        return ChildScores(logits.argmax(1) == targets, log_prob, resolved)

    def forward_groups(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Cell stack for stem features ``x`` with rows grouped by identical resolved child."""
        children, group_of = torch.unique(policy.flatten(1), dim=0, return_inverse=True)
        if len(children) == 1:
            return self.run_cells(x, ChildArchitecture.from_policy(policy[0]).cells)
        row_sets = [(group_of == g).nonzero().squeeze(1) for g in range(len(children))]
        outputs = [
            self.run_cells(rows_in, ChildArchitecture.from_policy(child).cells)
            for rows_in, child in zip(
                gather_row_sets(x, row_sets), children.view(-1, *policy.shape[1:])
            )
        ]
        return sum_row_sets(None, x.shape[0], row_sets, outputs)

    def run_cells(self, x: torch.Tensor, cells: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """The cell stack with the same resolved module set per cell for the whole batch."""
        return run_stack(
            x, ([cell.candidates[m] for m in modules] for cell, modules in zip(self.cells, cells))
        )

    def forward_resolved(self, x: torch.Tensor, cells: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """Logits when every image of the batch runs the resolved module sets ``cells``."""
        return self.head(self.run_cells(self.stem(x), cells))

    def forward_child(self, x: torch.Tensor, child: ChildArchitecture) -> torch.Tensor:
        """Logits when every image of the batch runs ``child``; only its modules execute."""
        return self.forward_resolved(x, self.resolved_cells(child))

    def resolved_cells(self, child: ChildArchitecture) -> tuple[tuple[int, ...], ...]:
        policy = self.resolve(child.to_policy().to(self.forced.device))
        return ChildArchitecture.from_policy(policy).cells

    def materialize(self, child: ChildArchitecture) -> "ChildNetwork":
        """A plain static network holding copies of only ``child``'s modules and weights."""
        return ChildNetwork(self, child)

    def deploy(self) -> "MetaGraph":
        """Eval-only copy with BatchNorm folded into the convolutions, for timing and inference."""
        return fold_batchnorm(self)


class ChildNetwork(nn.Module):
    """A child architecture extracted from a meta-graph (or trained standalone as a baseline)."""

    def __init__(self, metagraph: MetaGraph, child: ChildArchitecture) -> None:
        super().__init__()
        self.space = metagraph.space
        self.child = child
        self.cell_modules = metagraph.resolved_cells(child)
        self.stem = copy.deepcopy(metagraph.stem)
        self.cells = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(cell.candidates[m]) for m in modules)
            for cell, modules in zip(metagraph.cells, self.cell_modules)
        )
        self.head = copy.deepcopy(metagraph.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(run_stack(self.stem(x), self.cells))

    def deploy(self) -> "ChildNetwork":
        return fold_batchnorm(self)


def mbv2_path(space: SearchSpace) -> ChildArchitecture:
    """The MobileNetV2 path as a child: module 0 (an inverted residual) in every cell."""
    return ChildArchitecture.uniform(space.num_cells, MBV2_PATH_MODULE, space.num_modules)


def mbv2_path_network(space: SearchSpace) -> ChildNetwork:
    """The MobileNetV2 path (:func:`mbv2_path`) as a standalone network."""
    return MetaGraph(space).materialize(mbv2_path(space))


def build_min_network(space: SearchSpace) -> ChildNetwork:
    """The minimum network: no module selected, so only the forced defaults run (spec L_min)."""
    empty = ChildArchitecture(tuple(() for _ in range(space.num_cells)), space.num_modules)
    return MetaGraph(space).materialize(empty)


def scaled_space(space: SearchSpace, factor: float) -> SearchSpace:
    """``space`` with every width-scaled channel count multiplied by ``factor``."""
    return dataclasses.replace(space, width=space.width * factor)
