"""The difficulty form of the controller: one learned difficulty per image, each module placed
along it by the policy gradient."""

import json

import pytest
import torch
from tiny_runs import tiny_main_model_run

import instanas
from instanas.config import ConfigError, load_preset, validate
from instanas.models.controller import Controller, ControllerSpec, greedy_policy
from instanas.search.controller_step import HARD_IMAGES, difficulty_loss

SPEC = ControllerSpec(input_size=7, widths=(4, 8), form="difficulty")


def test_greedy_children_form_a_ladder_along_the_difficulty():
    controller = Controller(1, 3, 2, SPEC).eval()
    images = torch.randn(64, 1, 28, 28)
    # A new controller: every image at difficulty 0, every probability 0.5.
    assert torch.equal(controller(images), torch.full((64, 3, 2), 0.5))
    with torch.no_grad():
        controller.difficulty.weight.normal_()
        controller.slope.normal_()  # negative raw slopes too: the ladder holds anyway
        # Each module starts at its own quantile of these images' difficulties.
        hardness = torch.sigmoid(controller.logits_and_difficulty(images)[1]) - 0.5
        starts = torch.quantile(hardness, torch.linspace(0.1, 0.9, 6)).view(3, 2)
        controller.base.copy_(-torch.nn.functional.softplus(controller.slope) * starts)
    logits, difficulty = controller.logits_and_difficulty(images)
    assert logits.shape == (64, 3, 2) and difficulty.shape == (64,)
    policies = greedy_policy(torch.sigmoid(logits))[difficulty.argsort()]
    # Sorted by difficulty, each image runs every module the easier one before it runs.
    assert torch.all(policies[1:] >= policies[:-1])
    assert len({tuple(p.flatten().tolist()) for p in policies}) > 1
    assert torch.allclose(controller(images), torch.sigmoid(logits))


def test_difficulty_learns_from_its_target_and_the_policy_only_places_modules():
    controller = Controller(1, 3, 2, SPEC)
    images = torch.randn(8, 1, 28, 28)
    logits, difficulty = controller.logits_and_difficulty(images)
    logits.sum().backward(retain_graph=True)
    assert controller.difficulty.weight.grad is None  # the policy gradient stops at d
    assert controller.base.grad is not None and controller.slope.grad is not None
    controller.zero_grad(set_to_none=True)
    hard = torch.tensor([True, False] * 4)
    difficulty_loss(difficulty, hard).backward()
    assert controller.difficulty.weight.grad.abs().sum() > 0
    assert controller.base.grad is None


def test_free_form_identity_is_unchanged():
    # Checkpoints and cached latency tables written before the form existed keep matching.
    assert ControllerSpec(7, (8, 16)).to_dict() == {"input_size": 7, "widths": (8, 16)}
    assert SPEC.to_dict()["form"] == "difficulty"
    with pytest.raises(ValueError, match="free"):
        Controller(1, 3, 2, ControllerSpec(7, (4,), form="other"))


def test_difficulty_form_needs_the_reinforce_objective():
    config = load_preset("fashion-cpu")
    config.controller.form, config.controller.objective = "difficulty", "imitate"
    with pytest.raises(ConfigError, match="controller.objective reinforce"):
        validate(config)


def test_a_run_with_the_difficulty_form_loads_and_predicts(tmp_path):
    controller = "{input_size: 8, widths: [4, 8], form: difficulty}"
    run = tiny_main_model_run(tmp_path, controller=controller)
    assert json.loads((run / "results.json").read_text())["models"]["instanas"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    search = [r for r in map(json.loads, lines) if r["stage"] == "search"]
    assert search and all(0.0 <= r["hard_train_share"] <= 1.0 for r in search)
    model = instanas.load(run)
    assert model.predictor.controller.spec.form == "difficulty"
    assert model(torch.rand(3, 3, 8, 8)).shape == (3, 2)


def test_hard_images_are_wrong_or_fixable():
    greedy = torch.tensor([True, False, False, True])
    every = torch.tensor([True, True, False, False])

    def unused() -> torch.Tensor:
        raise AssertionError("the wrong target needs no forward of the every-module child")

    assert HARD_IMAGES["wrong"](greedy, unused).tolist() == [False, True, True, False]
    # Only the image the child with every module gets right is worth more modules.
    assert HARD_IMAGES["helped"](greedy, lambda: every).tolist() == [False, True, False, False]
