"""Instance-aware routing: the budget reward, its dual weight, entropy forms, routing metrics,
shuffled routing, the random share of meta-graph batches and the static child's choice."""

import math

import pytest
import torch

from instanas.config import load_preset
from instanas.models.controller import policy_entropy
from instanas.search.policy import mix_random_children
from instanas.search.reward import (
    LOG_PROB_FLOOR,
    DualWeight,
    LatencyBounds,
    RewardFunction,
    budget_reward,
    budget_target,
    prediction_score,
)
from instanas.space import ranked_children, routing_summary
from instanas.stages.common import closest_not_below

BOUNDS = LatencyBounds(all_modules=100.0, mbv2_path=20.0, minimum=4.0)


def test_budget_reward_charges_latency_in_proportion():
    score = prediction_score(
        torch.tensor([True, True, False]), torch.zeros(3), "correct", pos_w=30.0, neg_w=-3.0
    )
    assert score.tolist() == [30.0, 30.0, -3.0]
    reward = budget_reward(score, torch.tensor([10.0, 20.0, 10.0]), weight=0.5, reference=20.0)
    assert reward.tolist() == pytest.approx([22.5, 15.0, -10.5])
    # Without a latency weight only the prediction counts.
    assert (
        budget_reward(score, torch.tensor([1.0, 99.0, 5.0]), 0.0, 20.0).tolist() == score.tolist()
    )


def test_log_prob_signal_is_graded_and_floored():
    log_prob = torch.tensor([-0.01, -1.0, -50.0])
    score = prediction_score(torch.tensor([True, False, False]), log_prob, "log_prob", 30.0)
    assert score.tolist() == pytest.approx([-0.3, -30.0, 30.0 * LOG_PROB_FLOOR])
    with pytest.raises(ValueError):
        prediction_score(torch.tensor([True]), torch.zeros(1), "margin")


def test_dual_weight_rises_over_budget_and_stays_non_negative():
    dual = DualWeight()
    assert dual.update(mean_latency=15.0, target=10.0, step=0.1) == pytest.approx(0.05)
    assert dual.update(100.0, 10.0, 0.1) == pytest.approx(0.15)  # overshoot clipped to 1
    dual.update(0.0, 10.0, 0.1)
    dual.update(0.0, 10.0, 0.1)
    assert dual.value == 0.0


def test_the_recorded_latency_weight_is_the_one_in_use():
    ccfg = load_preset("fashion-cpu").controller  # budget reward with dual_kp > 0
    reward_of = RewardFunction(ccfg, BOUNDS, DualWeight())
    reward_of.update(torch.tensor([30.0]))  # under the starting target of 0.7 x 100
    reward_of.update(torch.tensor([100.0]))  # then over it
    state = reward_of.describe()
    assert state["latency_weight"] == pytest.approx(reward_of.dual.weight)
    assert state["latency_weight_integral"] == pytest.approx(reward_of.dual.value)
    assert state["latency_weight"] > state["latency_weight_integral"]  # the proportional part


def test_budget_target_warms_up_then_holds():
    assert budget_target(BOUNDS, 0.0, 0.4, 0.5) == pytest.approx(70.0)
    assert budget_target(BOUNDS, 0.25, 0.4, 0.5) == pytest.approx((70.0 + 8.0) / 2)
    assert budget_target(BOUNDS, 0.5, 0.4, 0.5) == pytest.approx(8.0)
    assert budget_target(BOUNDS, 0.9, 0.4, 0.5) == pytest.approx(8.0)
    assert budget_target(BOUNDS, 0.0, 0.4, 0.0) == pytest.approx(8.0)


def test_entropy_forms():
    p = torch.tensor([[[0.5, 1 / math.e]]])
    paper = policy_entropy(p, "paper").item()
    assert paper == pytest.approx(0.5 * math.log(2) + 1 / math.e)
    full = policy_entropy(torch.tensor([[[0.5]]]), "bernoulli").item()
    assert full == pytest.approx(math.log(2))
    # The full entropy is largest at the greedy threshold, the paper's below it.
    grid = torch.linspace(0.01, 0.99, 99).view(-1, 1, 1)
    assert float(grid[policy_entropy(grid, "bernoulli").argmax()]) == pytest.approx(0.5)
    assert float(grid[policy_entropy(grid, "paper").argmax()]) == pytest.approx(0.37, abs=0.01)


def _policies(children: list[list[int]]) -> torch.Tensor:
    """[N, 2 cells, 3 modules] from one module id per cell-0 choice (cell 1 always module 0)."""
    out = torch.zeros(len(children), 2, 3, dtype=torch.bool)
    for i, modules in enumerate(children):
        out[i, 0, modules] = True
        out[i, 1, 0] = True
    return out


def test_routing_summary():
    one = routing_summary(_policies([[0]] * 10))
    assert one == {
        "distinct_children": 1,
        "effective_children": pytest.approx(1.0),
        "top_child_share": 1.0,
    }
    even = routing_summary(_policies([[0], [1], [2], [0, 1]] * 5))
    assert even["distinct_children"] == 4
    assert even["effective_children"] == pytest.approx(4.0)
    assert even["top_child_share"] == 0.25
    skewed = routing_summary(_policies([[0]] * 9 + [[1]]))
    assert 1.0 < skewed["effective_children"] < 2.0 and skewed["top_child_share"] == 0.9


def test_ranked_children_most_used_first():
    policies = _policies([[1]] * 3 + [[0, 2]] * 5 + [[2]])
    ranked = ranked_children(policies, limit=2)
    assert [count for _, count in ranked] == [5, 3]
    assert ranked[0][0].cells == ((0, 2), (0,))


def test_static_child_is_closest_not_below():
    assert closest_not_below({0: 0.5, 1: 0.9, 2: 0.7, 3: 1.2}, 0.65) == 2
    assert closest_not_below({0: 0.5, 1: 0.6}, 0.65) == 1  # all faster: the slowest


def test_mix_random_children_replaces_a_share_of_rows():
    policy = torch.zeros(100, 4, 5, dtype=torch.bool)
    mixed = mix_random_children(policy, 0.25, torch.Generator().manual_seed(0))
    assert not mixed[25:].any() and mixed[:25].any()
    rates = mixed[:25].float().mean(dim=(1, 2))
    assert rates.min() < 0.3 and rates.max() > 0.7  # each row its own rate
    assert mix_random_children(policy, 0.0, torch.Generator()) is policy


def test_full_preset_extends_the_main_job():
    main, full = load_preset("fashion-cpu"), load_preset("fashion-cpu-full")
    assert full.preset == "fashion-cpu-full"
    assert main.variants.count == 0 and main.baseline.widths == [1.0]
    assert full.variants.count == 5 and full.baseline.min_net
    assert full.space == main.space and full.controller == main.controller


def test_usage_penalty_only_for_modules_that_cannot_route():
    from instanas.search.reward import usage_penalty

    mixed = torch.linspace(0.05, 0.95, 20).view(20, 1, 1).expand(20, 2, 3)
    assert usage_penalty(mixed, 0.1).item() == 0.0
    always = torch.full((20, 2, 3), 0.9)
    never = torch.full((20, 2, 3), 0.1)
    assert usage_penalty(always, 0.1).item() > 0 and usage_penalty(never, 0.1).item() > 0
    probs = always.clone().requires_grad_(True)
    usage_penalty(probs, 0.1).backward()
    assert (probs.grad > 0).any()  # descending lowers some images' probabilities


def test_best_children_takes_each_images_highest_reward():
    from instanas.search.controller_step import best_children

    policies = torch.arange(6 * 4).view(6, 2, 2)  # 3 candidate sets for 2 images
    reward = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.4])  # image 0: set 1; image 1: set 0
    best = best_children(policies, reward, 2)
    assert torch.equal(best[0], policies[2]) and torch.equal(best[1], policies[1])


def test_imitation_objective_trains_the_controller(tmp_path, monkeypatch):
    from tiny_runs import make_folder_dataset, tiny_config

    from instanas.config import load_config_file
    from instanas.pipeline import open_run
    from instanas.search.reward import DualWeight
    from instanas.stages.common import latency_table, new_models
    from instanas.stages.search import controller_epoch

    monkeypatch.setenv("INSTANAS_CACHE", str(tmp_path / "cache"))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        tiny_config(
            make_folder_dataset(tmp_path / "data"),
            controller="{input_size: 8, widths: [4, 8], objective: imitate, candidates: 3, "
            "reward: budget, signal: log_prob}",
        )
    )
    ctx = open_run(load_config_file(config_path), tmp_path / "run")
    metagraph, controller = new_models(ctx)
    before = [p.detach().clone() for p in controller.parameters()]
    optimizer = torch.optim.Adam(controller.parameters(), lr=1e-2)
    record = controller_epoch(
        ctx, metagraph, controller, optimizer, latency_table(ctx), 0, DualWeight()
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, controller.parameters()))
    assert 0.0 <= record["sampled_train_accuracy"] <= 1.0
    assert record["greedy_cells_ms"] > 0 and record["latency_weight"] >= 0.0


def test_escalation_latency_is_interpolated_between_shares_timed_on_a_stream():
    """A few escalated images cost more each than when every image escalates (the larger
    network's weights are cold): the rule prices shares between the timed points, and a
    timing-noise dip never makes a larger share cheaper."""
    import numpy as np

    from instanas.evaluation.cascade import cascade_curve, choose_threshold, rule_latency

    points = [[0.0, 0.18], [1.0, 0.61], [0.05, 0.24], [0.1, 0.23], [0.2, 0.32]]
    timing = {"never_ms": 0.18, "always_ms": 0.61, "share_points": points}
    latency = rule_latency(timing)
    assert latency(0.05) == pytest.approx(0.24) and latency(0.1) == pytest.approx(0.24)
    assert latency(0.15) == pytest.approx(0.28) and latency(0.025) == pytest.approx(0.21)
    line = rule_latency({"never_ms": 0.18, "always_ms": 0.61})  # a rule without points
    assert line(0.05) == pytest.approx(0.18 + 0.05 * 0.43)
    confident = np.linspace(0.3, 1.0, 100)
    small = confident > 0.5  # the unsure images are the ones the child gets wrong
    large = np.ones(100, dtype=bool)
    curve = cascade_curve(confident, small, large, latency)
    chosen = choose_threshold(curve, budget_ms=0.235)
    assert chosen.share < 0.05 and chosen.latency_ms <= 0.235


def test_fine_tuning_under_a_child_set_trains_only_its_children(tiny_space):
    """Every image's policy becomes the nearest child of the set: the rows training runs."""
    from instanas.models.metagraph import MetaGraph
    from instanas.space import ChildArchitecture
    from instanas.stages.policy_tuning import routed_within

    metagraph = MetaGraph(tiny_space)
    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(64, tiny_space.num_cells, tiny_space.num_modules, generator=generator) < 0.4
    resolved = metagraph.resolve(raw)
    children = [ChildArchitecture.from_policy(resolved[i]) for i in (0, 1)]
    routed = routed_within(metagraph, lambda images: raw, children)(torch.zeros(64, 1))
    allowed = {c.cells for c in children}
    assert {ChildArchitecture.from_policy(p).cells for p in routed} <= allowed
    assert ChildArchitecture.from_policy(routed[0]).cells == children[0].cells
    assert ChildArchitecture.from_policy(routed[1]).cells == children[1].cells
