"""Where latency is measured: onnxruntime (what ``instanas export`` ships) or eager PyTorch.

A backend turns a deployed (BatchNorm-folded) network and an input shape into a zero-argument
call that runs it once at batch 1, the way that runtime runs it:

* ``onnxruntime``: the network is written as an ONNX graph (:mod:`instanas.onnx_graphs`, the
  same graphs an export holds) and run by an ``InferenceSession`` on the CPU provider with the
  configured threads; input and outputs are bound once (IO binding), as a serving loop does.
  Calls are timed warm: each runs twice or more in a row and the first is not timed.
* ``eager``: the module called under ``torch.inference_mode`` (the paper's timing); calls are
  timed one each per round, as the project always timed them.

The latency table, its check against whole children and the side-by-side timing of every
model all time through a backend, so the search prices what the deployed model costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..models.controller import Controller
from ..models.metagraph import ChildNetwork
from ..models.predictor import InstaNASPredictor
from ..runtime import BoundSession, RoutedSessions, onnx_session, resolve_policies
from ..space import ChildArchitecture, SearchSpace

BACKENDS = ("onnxruntime", "eager")
Call = Callable[[], object]
ImageCall = Callable[[torch.Tensor], object]  # one image [1, C, H, W] through a deployed model


class Backend(Protocol):
    name: str
    device: torch.device
    burst: int  # calls per timing round; all but the first are timed

    def runtime_version(self) -> str: ...
    def call(self, network: nn.Module, shape: Sequence[int]) -> Call: ...
    def call_overhead(self, shape: Sequence[int]) -> Call | None: ...
    def controller_call(self, controller: Controller, space: SearchSpace) -> Call: ...
    def routed_call(self, predictor: InstaNASPredictor, child: ChildArchitecture) -> Call: ...
    def model_image_call(
        self, model: InstaNASPredictor | ChildNetwork, children: Sequence[ChildArchitecture] = ()
    ) -> ImageCall: ...


class EagerBackend:
    """Eager PyTorch on ``device`` (CPU or CUDA); the caller sets threads and synchronises."""

    name = "eager"
    burst = 1

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")

    def runtime_version(self) -> str:
        return f"torch {torch.__version__}"

    def call(self, network: nn.Module, shape: Sequence[int]) -> Call:
        network = network.to(self.device).eval()
        x = torch.randn(tuple(shape), device=self.device)
        return lambda: network(x)

    def call_overhead(self, shape: Sequence[int]) -> Call | None:
        return None  # an eager call is its operators

    def controller_call(self, controller: Controller, space: SearchSpace) -> Call:
        return self.call(controller, _image(space))

    def routed_call(self, predictor: InstaNASPredictor, child: ChildArchitecture) -> Call:
        """Controller, then the materialised child: what the eager batch-1 path runs."""
        space = predictor.space
        controller = predictor.controller.to(self.device)
        network = predictor.metagraph.cpu().materialize(child).to(self.device).eval()
        x = torch.randn(_image(space), device=self.device)

        def run() -> torch.Tensor:
            controller(x)  # the deployed path always pays for the controller first
            return network(x)

        return run

    def model_image_call(
        self, model: InstaNASPredictor | ChildNetwork, children: Sequence[ChildArchitecture] = ()
    ) -> ImageCall:
        """The deployed batch-1 path in torch: the predictor's ``logits_one`` (controller,
        the chosen child's modules, escalation), or the BatchNorm-folded static network."""
        if isinstance(model, InstaNASPredictor):
            return model.logits_one
        return model.deploy().eval()


class OnnxRuntimeBackend:
    """onnxruntime's CPU provider with ``threads`` intra-op threads and IO binding.

    onnx and onnxruntime are imported when a graph is first built (about a second): the
    configuration reads this module, and most commands never time anything.
    """

    name = "onnxruntime"
    burst = 3
    device = torch.device("cpu")

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def runtime_version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"

    def session(self, model):
        return onnx_session(model.SerializeToString(), self.threads)

    def model_call(self, model, shape: Sequence[int]) -> Call:
        """A call of an ONNX model on a fixed random input."""
        return bound_call(self.session(model), np.random.randn(*shape).astype(np.float32))

    def call(self, network: nn.Module, shape: Sequence[int]) -> Call:
        from ..models.onnx_graph import network_model

        return self.model_call(network_model(network, shape), shape)

    def call_overhead(self, shape: Sequence[int]) -> Call:
        """A graph that only returns its input: the runtime's own cost of one call."""
        from ..models.onnx_graph import identity_model

        return self.model_call(identity_model(shape), shape)

    def controller_call(self, controller: Controller, space: SearchSpace) -> Call:
        """The controller's graph and the runtime's routing after it, as deployed: the image's
        own child is among the exported ones (with the minimum network), so the routing takes
        its common path, one lookup."""
        from ..models.onnx_graph import deployed_controller_model, router_for

        session = BoundSession(self.session(deployed_controller_model(controller, space)))
        image = np.random.randn(*_image(space)).astype(np.float32)
        logits = session(image)[1]
        own = resolve_policies(logits, space.forced_mask().tolist(), space.forced_module)[0]
        children = [ChildArchitecture.from_policy(torch.from_numpy(own)), space.minimum_child()]
        router = router_for(space, children)
        return lambda: router(*session(image))

    def routed_call(self, predictor: InstaNASPredictor, child: ChildArchitecture) -> Call:
        """The deployed path (controller with routing, then the child) with ``child`` as its
        only exported child, so every image runs it."""
        from ..models.onnx_graph import routed_graphs

        path = self.routed_sessions(routed_graphs(predictor, [child], keep_controller=True))
        image = np.random.randn(*_image(predictor.space)).astype(np.float32)
        return lambda: path(image)

    def model_image_call(
        self, model: InstaNASPredictor | ChildNetwork, children: Sequence[ChildArchitecture] = ()
    ) -> ImageCall:
        """A model as exported (a routed predictor with ``children`` exported, or a static
        network), run the way ``instanas.runtime`` runs an export, as a batch-1 function of an
        image."""
        from ..models.onnx_graph import RoutedGraphs, routed_graphs, static_model

        if isinstance(model, InstaNASPredictor):
            graphs = routed_graphs(model, list(children))
        else:
            graphs = RoutedGraphs(None, [static_model(model.deploy().eval())], None, 0.0)
        path = self.routed_sessions(graphs)
        return lambda image: path(image.numpy())

    def routed_sessions(self, graphs) -> RoutedSessions:
        """``RoutedGraphs`` as the sessions an export's runtime runs."""

        def session(graph):
            return self.session(graph) if graph is not None else None

        children = [self.session(g) for g in graphs.children]
        return RoutedSessions(session(graphs.controller), children, session(graphs.escalation),
                              graphs.threshold, graphs.router)  # fmt: skip


def _image(space: SearchSpace) -> tuple[int, int, int, int]:
    return (1, space.input_channels, space.input_size, space.input_size)


def image_call(session) -> Callable[[torch.Tensor], None]:
    """``session`` as a batch-1 function of an image tensor [1, C, H, W]: the image is copied
    into the bound input buffer, outputs stay in the runtime's buffers."""
    binding = session.io_binding()
    buffer = np.zeros(session.get_inputs()[0].shape, dtype=np.float32)
    binding.bind_cpu_input(session.get_inputs()[0].name, buffer)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")

    def run(image: torch.Tensor) -> None:
        np.copyto(buffer, image.numpy())
        session.run_with_iobinding(binding)

    return run


def bound_call(session, image: np.ndarray) -> Call:
    """``session`` on ``image``: the image is copied into a bound input buffer per call (the
    copy a serving loop makes), outputs stay in buffers the runtime owns."""
    binding = session.io_binding()
    buffer = np.zeros_like(image)
    binding.bind_cpu_input(session.get_inputs()[0].name, buffer)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")

    def run() -> None:
        np.copyto(buffer, image)
        session.run_with_iobinding(binding)

    return run


def make_backend(name: str, threads: int, device: torch.device) -> Backend:
    if name == "eager":
        return EagerBackend(device)
    if name == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(
                f"latency.backend onnxruntime times on the CPU, not {device}: use "
                "--latency.backend eager for a GPU table"
            )
        return OnnxRuntimeBackend(threads)
    raise ValueError(f"unknown latency backend {name!r}: use one of {', '.join(BACKENDS)}")


def backend_info(backend: Backend) -> dict:
    """Which runtime timed a figure, recorded next to it."""
    return {"backend": backend.name, "runtime": backend.runtime_version()}
