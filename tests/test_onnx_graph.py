"""The ONNX graphs instanas writes compute what the eager networks compute: every module kind,
whole children, both controller forms with and without a resize, the routing (the exported
child each image runs, the empty-cell rule and the nearest-child fallback) and escalation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instanas.models import build_models
from instanas.models.onnx_graph import (
    GraphBuilder,
    child_model,
    controller_model,
    routed_graphs,
    unit_model,
)
from instanas.models.predictor import Escalation, InstaNASPredictor
from instanas.runtime import RoutedSessions, onnx_session
from instanas.space import CellGroup, ChildArchitecture, ControllerSpec, SearchSpace, nearest_child

ort = pytest.importorskip("onnxruntime")


def _space(forced_module: int = 4, channels: int = 1, size: int = 16) -> SearchSpace:
    stages = (CellGroup(8, 1, 1), CellGroup(8, 2, 2), CellGroup(16, 2, 2))
    return SearchSpace(
        input_channels=channels, input_size=size, num_classes=5, width=1.0, stem_channels=8,
        stem_stride=1, stages=stages, head_channels=16, forced_module=forced_module,
    )  # fmt: skip


def _randomise_batchnorm(module: torch.nn.Module, generator: torch.Generator) -> None:
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            shape = bn.running_mean.shape
            bn.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)


def _models(spec: ControllerSpec, space: SearchSpace | None = None):
    torch.manual_seed(0)
    space = space or _space()
    metagraph, controller = build_models(space, spec)
    generator = torch.Generator().manual_seed(1)
    _randomise_batchnorm(metagraph, generator)
    _randomise_batchnorm(controller, generator)
    with torch.no_grad():  # logits of both signs, so routing has something to decide
        for p in controller.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return metagraph.eval(), controller.eval()


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_every_module_kind_and_the_head_match_eager():
    metagraph, _ = _models(ControllerSpec(input_size=8, widths=(4,)))
    graph = metagraph.deploy()
    for cell in graph.cells:
        spec = cell.spec
        x = torch.randn(2, spec.in_channels, spec.input_size, spec.input_size)
        for module in cell.candidates:
            (out,) = _run(unit_model(module, tuple(x.shape)), x.numpy())
            np.testing.assert_allclose(out, module(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("child", ["0-0-0-0-0", "13-_-24-4-_", "4-_-_-1-0123"])
def test_children_match_eager(child):
    metagraph, _ = _models(ControllerSpec(input_size=8, widths=(4,)))
    network = metagraph.materialize(ChildArchitecture.from_string(child)).deploy()
    x = torch.randn(3, 1, 16, 16)
    (out,) = _run(child_model(network), x.numpy())
    np.testing.assert_allclose(out, network(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["free", "difficulty"])
@pytest.mark.parametrize("widths,size", [((4, 8), 8), ((4,), 16), ((), 8), ((), 5), ((), 32)])
def test_controller_logits_match_eager(form, widths, size):
    _, controller = _models(ControllerSpec(input_size=size, widths=widths, form=form))
    deployed = controller.deploy()
    x = torch.randn(3, 1, 16, 16)
    (out,) = _run(controller_model(deployed, 16), x.numpy())
    np.testing.assert_allclose(out, deployed.policy_logits(x).numpy(), rtol=1e-4, atol=1e-4)


def test_routing_picks_the_child_the_eager_model_runs_and_falls_back_to_the_nearest():
    metagraph, controller = _models(ControllerSpec(input_size=8, widths=()))
    predictor = InstaNASPredictor(metagraph, controller)
    images = torch.randn(200, 1, 16, 16)
    picked = [str(ChildArchitecture.from_policy(p)) for p in predictor.policies(images)]
    counts: dict[str, int] = {}
    for child in picked:
        counts[child] = counts.get(child, 0) + 1
    ranked = sorted(counts, key=lambda c: -counts[c])
    exported = [ChildArchitecture.from_string(c) for c in ranked[:7]]
    assert len(ranked) > len(exported), "the test needs children that were not exported"
    path = _sessions(routed_graphs(predictor, exported))
    names = [str(c) for c in exported]
    for image, child in zip(images[:60], picked[:60]):
        logits, index, escalated, policy_logits = path(image[None].numpy())
        assert names[index] == nearest_child(child, names)
        eager = predictor.metagraph.forward_child(image[None], exported[index])
        np.testing.assert_allclose(logits, eager[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            policy_logits, predictor.controller.policy_logits(image[None]).numpy(), atol=1e-4
        )
        assert not escalated


def test_a_child_set_routes_the_eager_model_as_the_exported_router_does():
    """controller.deployed_children: the batched policies, the batch-1 path and the exported
    graphs all map a policy outside the set to the same nearest child."""
    metagraph, controller = _models(ControllerSpec(input_size=8, widths=()))
    free = InstaNASPredictor(metagraph, controller)
    images = torch.randn(200, 1, 16, 16)
    picked = [str(ChildArchitecture.from_policy(p)) for p in free.policies(images)]
    ranked = sorted(set(picked), key=lambda c: (-picked.count(c), picked.index(c)))
    children = [ChildArchitecture.from_string(c) for c in ranked[:3]]
    assert len(ranked) > 3, "the test needs policies outside the set"
    names = [str(c) for c in children]
    capped = InstaNASPredictor(metagraph, controller, children=children)
    mapped = [str(ChildArchitecture.from_policy(p)) for p in capped.policies(images)]
    assert mapped == [nearest_child(c, names) for c in picked]
    assert set(mapped) <= set(names) and any(c not in names for c in picked)
    path = _sessions(routed_graphs(capped, children))
    logits, _ = capped.logits(images[:40])
    for i, image in enumerate(images[:40]):
        one = capped.logits_one(image[None])
        np.testing.assert_allclose(one[0].numpy(), logits[i].numpy(), rtol=1e-4, atol=1e-5)
        exported, index, _, _ = path(image[None].numpy())
        assert names[index] == mapped[i]
        np.testing.assert_allclose(exported, logits[i].numpy(), rtol=1e-4, atol=1e-5)
    assert capped.without_escalation().child_set == children


def test_an_empty_forced_cell_routes_to_the_child_with_the_forced_module():
    """The empty-cell rule in the routing: a policy that leaves a forced cell empty is the
    child with the forced module there, not a child one module away."""
    space = _space(forced_module=1)
    metagraph, controller = _models(ControllerSpec(input_size=8, widths=()), space)
    with torch.no_grad():
        controller.logits.weight.zero_()
        wanted = ChildArchitecture.from_string("_-_-_-_-_")  # every cell empty
        controller.logits.bias.copy_(torch.where(wanted.to_policy().flatten(), 5.0, -5.0))
    predictor = InstaNASPredictor(metagraph, controller)
    resolved = ChildArchitecture.from_policy(predictor.policies(torch.zeros(1, 1, 16, 16))[0])
    decoy = ChildArchitecture.from_string("0-0-_-0-_")  # one module away from the raw policy
    path = _sessions(routed_graphs(predictor, [decoy, resolved]))
    _, index, _, _ = path(np.zeros((1, 1, 16, 16), "f4"))
    assert str(resolved) == "1-1-_-1-_" and index == 1


def test_escalation_runs_the_larger_network_only_for_unsure_images():
    """In the graph and in the eager predictor alike."""
    metagraph, controller = _models(ControllerSpec(input_size=8, widths=()))
    predictor = InstaNASPredictor(metagraph, controller)
    child = ChildArchitecture.from_policy(predictor.policies(torch.zeros(1, 1, 16, 16))[0])
    larger = metagraph.materialize(ChildArchitecture.from_string("0-0-0-0-0")).deploy()
    images = torch.randn(40, 1, 16, 16)
    with torch.no_grad():
        small = predictor.metagraph.forward_child(images, child)
        confidence = torch.softmax(small, 1).max(1).values
        big = larger(images)
    threshold = float(confidence.median())
    predictor.escalation = Escalation(larger, threshold)
    graphs = routed_graphs(predictor, [child])
    assert graphs.controller is None and graphs.threshold == threshold
    path = _sessions(graphs)
    for i in range(len(images)):
        logits, _, escalated, _ = path(images[i : i + 1].numpy())
        unsure = bool(confidence[i] < threshold)
        assert escalated == unsure
        expected = big[i] if unsure else small[i]
        np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)
    eager_logits, _, eager_escalated = predictor.without_escalation().answer(images)
    assert not eager_escalated.any()
    routed, _, escalated = predictor.answer(images)
    assert torch.equal(escalated, predictor.escalation.unsure(eager_logits))
    np.testing.assert_allclose(routed[escalated], big[escalated], rtol=1e-5, atol=1e-6)


def _sessions(graphs) -> RoutedSessions:
    def session(graph):
        return onnx_session(graph.SerializeToString(), 1) if graph is not None else None

    return RoutedSessions(session(graphs.controller), [session(g) for g in graphs.children],
                          session(graphs.escalation), graphs.threshold,
                          graphs.router)  # fmt: skip


def test_a_graph_builder_refuses_a_module_it_cannot_write():
    with pytest.raises(TypeError, match="deploy"):
        GraphBuilder().module("x", torch.nn.BatchNorm2d(4))
