"""ONNX graphs written straight from the deployed (BatchNorm-folded) networks.


The latency table is profiled in onnxruntime, so every unit it holds (stem, each cell's
candidate modules, head, controller) and every whole child it is checked against must become
an ONNX graph, a few hundred per profile. ``torch.onnx.export`` takes seconds per graph; these
networks are built from five kinds of layer (convolution with an optional ReLU, addition,
global average pooling, a linear layer, a fixed linear resize), so this module writes the
graphs itself in milliseconds, and ``instanas export`` ships the same graphs that were timed.
Tests check every graph against the eager network it was written from.

Graphs take float32 NCHW images with a dynamic batch axis unless a caller fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..nn.ops import BasicBlock, FusedConvAct, InvertedResidual
from ..runtime import Router
from ..space import ChildArchitecture, SearchSpace
from .controller import PLACEMENT_GAIN, Controller, ResidualBlock
from .metagraph import ChildNetwork, Head
from .predictor import InstaNASPredictor

OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.15 reads it
INPUT = "images"


class GraphBuilder:
    """Nodes and weights of one ONNX graph, appended in execution order."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}{base}_{self._count}"

    def constant(self, array: np.ndarray | float | int, base: str = "const") -> str:
        name = self.fresh(base)
        self.weights.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(array)), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], **attributes: Any) -> str:
        output = self.fresh(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [output], name=output, **attributes)
        self.nodes.append(node)
        return output

    # --- layers ---------------------------------------------------------------------------

    def conv(self, x: str, conv: nn.Conv2d, relu: bool) -> str:
        inputs = [x, self.constant(_array(conv.weight), "weight")]
        if conv.bias is not None:
            inputs.append(self.constant(_array(conv.bias), "bias"))
        kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        y = self.op(
            "Conv", inputs, kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4,
            group=conv.groups,
        )  # fmt: skip
        return self.op("Relu", [y]) if relu else y

    def linear(self, x: str, layer: nn.Linear) -> str:
        weight = self.constant(_array(layer.weight), "weight")
        return self.op("Gemm", [x, weight, self.constant(_array(layer.bias), "bias")], transB=1)

    def pooled(self, x: str) -> str:
        """Global average pooling to [N, channels]."""
        return self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)

    def module(self, x: str, module: nn.Module) -> str:
        """Any deployed building block of a child or of the controller."""
        if isinstance(module, FusedConvAct):
            return self.conv(x, module.conv, module.relu)
        if isinstance(module, InvertedResidual):
            y = self.module(self.module(self.module(x, module.expand), module.depthwise),
                            module.project)  # fmt: skip
            return self.op("Add", [x, y]) if module.residual else y
        if isinstance(module, BasicBlock):
            return self.module(self.module(x, module.conv1), module.conv2)
        if isinstance(module, ResidualBlock):
            shortcut = x if module.shortcut is None else self.module(x, module.shortcut)
            y = self.module(self.module(x, module.conv1), module.conv2)
            return self.op("Relu", [self.op("Add", [y, shortcut])])
        if isinstance(module, Head):
            return self.linear(self.pooled(self.module(x, module.conv)), module.classifier)
        raise TypeError(
            f"no ONNX form for {type(module).__name__}: deploy() the network (BatchNorm "
            "folded) before writing it"
        )

    def cell_stack(self, x: str, cells: Sequence[Sequence[nn.Module]]) -> str:
        """The cells in order: each the sum of its modules, the identity when it has none."""
        for modules in cells:
            out = None
            for module in modules:
                y = self.module(x, module)
                out = y if out is None else self.op("Add", [out, y])
            x = x if out is None else out
        return x

    # --- graphs ---------------------------------------------------------------------------

    def graph(
        self,
        name: str,
        inputs: Sequence[tuple[str, Sequence[Any]]],
        outputs: Sequence[tuple[str, int]],
    ) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
            initializer=self.weights,
        )

    def model(
        self,
        inputs: Sequence[tuple[str, Sequence[Any]]],
        outputs: Sequence[tuple[str, int]],
        name: str = "instanas",
    ) -> onnx.ModelProto:
        model = helper.make_model(
            self.graph(name, inputs, outputs), opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="instanas",
        )  # fmt: skip
        model.ir_version = IR_VERSION
        return model


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


def image_input(channels: int, size: int, batch: int | str = "batch") -> tuple[str, list]:
    return INPUT, [batch, channels, size, size]


# --- whole networks ---------------------------------------------------------------------------


def child_model(network: ChildNetwork, batch: int | str = "batch") -> onnx.ModelProto:
    """A deployed child (stem, its modules, head): images -> logits."""
    space = network.space
    b = GraphBuilder()
    x = b.module(INPUT, network.stem)
    logits = b.module(b.cell_stack(x, network.cells), network.head)
    inputs = [image_input(space.input_channels, space.input_size, batch)]
    return b.model(inputs, [(logits, TensorProto.FLOAT)])


def network_model(network: nn.Module, shape: Sequence[int]) -> onnx.ModelProto:
    """A deployed child (batch fixed by ``shape``) or any single building block."""
    if isinstance(network, ChildNetwork):
        return child_model(network, batch=shape[0])
    return unit_model(network, shape)


def unit_model(module: nn.Module, shape: Sequence[int]) -> onnx.ModelProto:
    """One module on its own at a fixed input shape (a latency-table unit)."""
    b = GraphBuilder()
    y = b.module(INPUT, module)
    return b.model([(INPUT, list(shape))], [(b.op("Identity", [y]), TensorProto.FLOAT)])


def identity_model(shape: Sequence[int]) -> onnx.ModelProto:
    """A graph that returns its input: what one call of the runtime costs with no work."""
    b = GraphBuilder()
    return b.model([(INPUT, list(shape))], [(b.op("Identity", [INPUT]), TensorProto.FLOAT)])


def controller_model(controller: Controller, size: int) -> onnx.ModelProto:
    """The deployed controller alone: images [N, channels, size, size] -> policy logits."""
    b = GraphBuilder()
    logits = controller_logits(b, INPUT, controller, size)
    return b.model([image_input(controller.in_channels, size)], [(logits, TensorProto.FLOAT)])


# The outputs of the deployed controller graph, by name, in order.
CONTROLLER_OUTPUTS = ("policy", "policy_logits")


def deployed_controller_model(controller: Controller, space: SearchSpace) -> onnx.ModelProto:
    """The controller graph an export holds: an image [1, C, H, W] -> ``policy`` (uint8, 1
    where a logit is >= 0) and ``policy_logits``, both [1, cells, modules]; the runtime's
    ``Router`` turns the policy into the child to run."""
    b = GraphBuilder()
    logits = controller_logits(b, INPUT, controller, space.input_size)
    selected = b.op("GreaterOrEqual", [logits, b.constant(np.float32(0))])
    policy = b.op("Cast", [selected], to=TensorProto.UINT8)
    outputs = _named(b, [(policy, TensorProto.UINT8), (logits, TensorProto.FLOAT)],
                     CONTROLLER_OUTPUTS)  # fmt: skip
    return b.model([image_input(space.input_channels, space.input_size, 1)], outputs)


def router_for(space: SearchSpace, children: Sequence[ChildArchitecture]) -> Router:
    """The runtime's routing to ``children`` under the space's empty-cell rule."""
    forced = space.forced_mask().tolist()
    return Router([str(c) for c in children], forced, space.forced_module, space.num_modules)


def controller_logits(b: GraphBuilder, x: str, controller: Controller, size: int) -> str:
    """The deployed controller's policy logits [N, cells, modules] for images ``x``.

    A linear controller on a small image is one matrix product: its resize and its read-out
    are both linear, so they are folded into one weight matrix over the image's pixels.
    """
    spec = controller.spec
    channels = controller.in_channels
    if _pools_to_thumbnail(size, spec.input_size):
        x = _pooled_thumbnail(b, x, size // spec.input_size)
        size = spec.input_size
    if not spec.widths and channels * size * size <= _FOLDED_PIXELS:
        if spec.form == "free":
            logits = _folded_linear(b, x, controller, controller.logits, size)
        else:
            difficulty = _folded_linear(b, x, controller, controller.difficulty, size)
            logits = _difficulty_logits(b, difficulty, controller)
    else:
        if size != spec.input_size:
            x = _thumbnail(b, x, controller, size)
        features = _features(b, x, controller)
        if spec.form == "free":
            logits = b.linear(features, controller.logits)
        else:
            logits = _difficulty_logits(b, b.linear(features, controller.difficulty), controller)
    shape = b.constant(np.array([-1, controller.num_cells, controller.num_modules], np.int64))
    return b.op("Reshape", [logits, shape])


def _pools_to_thumbnail(size: int, thumbnail: int) -> bool:
    """Whether the controller's area pooling is a plain average pool (a whole factor down):
    one pooling node is cheaper than folding it into the read-out, whose weight matrix would
    then be ``factor**2`` times larger and crowd the child's weights out of the caches."""
    return size > thumbnail and size % thumbnail == 0


def _pooled_thumbnail(b: GraphBuilder, x: str, factor: int) -> str:
    return b.op("AveragePool", [x], kernel_shape=[factor] * 2, strides=[factor] * 2)


# Above this many input values a folded linear controller would carry a weight per pixel and
# module (85 x 150,528 at 224 px): resize first instead.
_FOLDED_PIXELS = 4096


def _features(b: GraphBuilder, x: str, controller: Controller) -> str:
    if not controller.spec.widths:
        return b.op("Flatten", [x], axis=1)
    y = b.module(x, controller.stem)
    for block in controller.blocks:
        y = b.module(y, block)
    return b.pooled(y)


def _folded_linear(
    b: GraphBuilder, x: str, controller: Controller, layer: nn.Linear, size: int
) -> str:
    """``layer`` applied to the controller's thumbnail of ``x``, as one Gemm over the pixels:
    the affine map read off by applying it to the zero image and to every unit image."""
    pixels = controller.in_channels * size * size
    probes = torch.cat([torch.zeros(1, pixels), torch.eye(pixels)])
    probes = probes.view(-1, controller.in_channels, size, size)
    with torch.no_grad():
        out = layer(controller.thumbnail(probes).flatten(1))
    bias, weight = out[0], out[1:] - out[0]  # weight: [pixels, outputs]
    flat = b.op("Flatten", [x], axis=1)
    return b.op("Gemm", [flat, b.constant(_array(weight.T), "weight"),
                         b.constant(_array(bias), "bias")], transB=1)  # fmt: skip


def _thumbnail(b: GraphBuilder, x: str, controller: Controller, size: int) -> str:
    """The controller's resize (area pooling or bilinear) as two matrix products: both are
    separable linear maps, read off by applying the torch operation to unit images."""
    probe = torch.zeros(size, 1, size, size)
    probe[torch.arange(size), 0, :, torch.arange(size)] = 1.0  # image i: column i lit
    with torch.no_grad():
        columns = controller.thumbnail(probe)[:, 0, 0, :]  # [size, s]: column i -> thumbnail
    right = columns.numpy().astype(np.float32)
    x = b.op("MatMul", [x, b.constant(right, "resize")])
    return b.op("MatMul", [b.constant(right.T.copy(), "resize"), x])


def _difficulty_logits(b: GraphBuilder, difficulty: str, controller: Controller) -> str:
    """``gain * (base + softplus(slope) * (sigmoid(d) - 1/2))``, base and slope folded."""
    hardness = b.op("Sub", [b.op("Sigmoid", [difficulty]), b.constant(np.float32(0.5))])
    slope = PLACEMENT_GAIN * F.softplus(controller.slope).flatten()
    base = PLACEMENT_GAIN * controller.base.flatten()
    placed = b.op("Mul", [hardness, b.constant(_array(slope)[None], "slope")])
    return b.op("Add", [placed, b.constant(_array(base)[None], "base")])


# --- the deployed routed model -----------------------------------------------------------------


@dataclass
class RoutedGraphs:
    """The deployed form of a routed model: what ``instanas.runtime.RoutedSessions`` runs."""

    controller: onnx.ModelProto | None  # None when one child is exported
    children: list[onnx.ModelProto]  # most used first, each image -> logits
    escalation: onnx.ModelProto | None  # the larger network, with its threshold
    threshold: float
    router: Router | None = None  # with a controller: its policy -> the child's index


def routed_graphs(
    predictor: InstaNASPredictor,
    children: Sequence[ChildArchitecture],
    keep_controller: bool = False,
) -> RoutedGraphs:
    """The deployed InstaNAS model as batch-1 graphs: the controller with the routing to one of
    ``children``, each child (shared stem, its modules, head), and, when the predictor has an
    escalation rule that can escalate (a threshold above 0), the larger network that answers
    for an image whose top softmax probability is below the threshold. With one child the
    controller cannot change what runs, so there is none unless ``keep_controller`` (to time
    the deployed path of one child)."""
    space, graph, escalation = predictor.space, predictor.metagraph, predictor.escalation
    if escalation is not None and escalation.threshold <= 0.0:
        escalation = None  # no top probability is below 0: the larger network never runs
    controller, router = None, None
    if len(children) > 1 or keep_controller:
        controller = deployed_controller_model(predictor.controller, space)
        router = router_for(space, children)
    return RoutedGraphs(
        controller,
        [static_model(graph.materialize(child).eval().deploy()) for child in children],
        static_model(escalation.network) if escalation is not None else None,
        escalation.threshold if escalation is not None else 0.0,
        router,
    )


def _named(
    b: GraphBuilder, outputs: list[tuple[str, int]], names: Sequence[str]
) -> list[tuple[str, int]]:
    """The outputs renamed to ``names`` (Identity nodes), so a runtime reads them by name."""
    named = []
    for (value, dtype), name in zip(outputs, names):
        b.nodes.append(helper.make_node("Identity", [value], [name], name=f"output/{name}"))
        named.append((name, dtype))
    return named


def static_model(network: ChildNetwork) -> onnx.ModelProto:
    """A deployed network (a child, a baseline, the escalation's larger network) as the batch-1
    graph an export holds: an image [1, C, H, W] -> ``logits`` [1, classes]."""
    space = network.space
    b = GraphBuilder()
    x = b.module(INPUT, network.stem)
    logits = b.module(b.cell_stack(x, network.cells), network.head)
    outputs = _named(b, [(logits, TensorProto.FLOAT)], ("logits",))
    return b.model([image_input(space.input_channels, space.input_size, 1)], outputs)
