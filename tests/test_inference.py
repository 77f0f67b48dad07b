import pytest
import torch

from instanas.models.controller import Controller, ControllerSpec
from instanas.models.metagraph import MetaGraph
from instanas.models.predictor import InstaNASPredictor


def _predictor(space, bias: float | None = None) -> InstaNASPredictor:
    graph = MetaGraph(space).eval()
    controller = Controller(1, space.num_cells, space.num_modules, ControllerSpec(6, (4, 8))).eval()
    with torch.no_grad():
        if bias is None:
            controller.logits.weight.normal_(std=2.0)  # varied per-image policies
            controller.logits.bias.normal_(std=1.0)
        else:
            controller.logits.bias.fill_(bias)
    return InstaNASPredictor(graph, controller)


@pytest.mark.parametrize("bias", [None, -20.0, 20.0])
def test_batch_one_path_equals_batched_paths(tiny_space, bias):
    """The batch-1 decoding (plain Python) and the batched paths pick and compute the same."""
    predictor = _predictor(tiny_space, bias)
    images = torch.randn(8, 1, 12, 12)
    dense, policies = predictor.logits(images, execution="dense")
    for execution in ("sparse", "grouped"):
        logits, again = predictor.logits(images, execution=execution)
        assert torch.equal(policies, again)
        assert torch.allclose(logits, dense, atol=1e-4)
    for i in range(len(images)):
        cells = predictor.child_cells(images[i : i + 1])
        expected = [tuple(m for m, on in enumerate(row) if on) for row in policies[i].tolist()]
        assert cells == expected
        assert torch.allclose(predictor.logits_one(images[i : i + 1]), dense[i : i + 1], atol=1e-4)
    if bias == -20.0:  # nothing selected: stage-first cells run the basic block, others are empty
        forced = tiny_space.forced_mask().tolist()
        assert cells == [(4,) if f else () for f in forced]


def test_linear_controller(tiny_space):
    controller = Controller(1, tiny_space.num_cells, tiny_space.num_modules, ControllerSpec(6, ()))
    probs = controller(torch.randn(3, 1, 12, 12))
    assert probs.shape == (3, tiny_space.num_cells, tiny_space.num_modules)
    assert len(list(controller.parameters())) == 2  # one linear layer on the 6x6 thumbnail
    predictor = InstaNASPredictor(MetaGraph(tiny_space).eval(), controller.eval())
    assert predictor.logits_one(torch.randn(1, 1, 12, 12)).shape == (1, tiny_space.num_classes)
