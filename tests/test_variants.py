"""Variant selection on the validation Pareto front, and the oracle's per-image choice."""

import torch

from instanas.evaluation.oracle import cheapest_correct
from instanas.stages.variants import pareto_front, pick_spread


def test_pareto_front_drops_dominated_points():
    # (latency ms, accuracy)
    points = [(1.0, 0.80), (2.0, 0.85), (1.5, 0.79), (3.0, 0.85), (0.5, 0.70), (2.0, 0.85)]
    front = pareto_front(points)
    # (1.5, .79) loses to (1.0, .80); (3.0, .85) to (2.0, .85); equal points both stay.
    assert front == [0, 1, 4, 5]


def test_pick_spread_keeps_both_ends_and_orders_slowest_first():
    points = [(float(i), 0.5 + i / 100) for i in range(10)]  # all on the front
    picked = pick_spread(points, list(range(10)), 5)
    assert len(picked) == 5
    assert picked[0] == 9 and picked[-1] == 0  # A is the most accurate, E the fastest
    latencies = [points[i][0] for i in picked]
    assert latencies == sorted(latencies, reverse=True)
    gaps = [a - b for a, b in zip(latencies, latencies[1:])]
    assert max(gaps) <= 3  # spread out, not bunched at one end


def test_pick_spread_with_few_points_or_none():
    points = [(1.0, 0.9), (2.0, 0.95)]
    assert pick_spread(points, [0, 1], 5) == [1, 0]
    assert pick_spread(points, [0], 5) == [0]
    assert pick_spread(points, [], 5) == []
    assert pick_spread(points, [0, 1], 0) == []
    assert pick_spread(points, [0, 1], 1) == [1]


def test_cheapest_correct_child_per_image():
    costs = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    hits = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    cost, solved = cheapest_correct(costs, hits)
    assert solved.tolist() == [True, False, True]
    # Image 0: the cheapest correct is column 2; image 1: none, the greedy (column 0) cost.
    assert cost.tolist() == [2.0, 3.0, 1.0]


def test_the_static_child_ladder_grows_the_controllers_child_by_its_preference(tiny_space):
    from instanas.latency.backends import EagerBackend
    from instanas.latency.table import LatencyTable, table_key
    from instanas.latency.timing import TimingStats
    from instanas.models.controller import Controller, ControllerSpec
    from instanas.models.metagraph import MetaGraph
    from instanas.space import ChildArchitecture
    from instanas.stages.static_child import LADDER_STEPS, ladder_children

    torch.manual_seed(0)
    graph = MetaGraph(tiny_space)
    controller = Controller(1, 17, 5, ControllerSpec(12, (4, 8, 8))).eval()
    stat = lambda v: TimingStats(v, v, 0.0, v, v, 30)  # noqa: E731
    modules = [[stat(0.01 * (1 + m)) for m in range(5)] for _ in range(17)]
    fixed = {n: stat(0.05) for n in ("stem", "head", "controller", "call")}
    table = LatencyTable(table_key(graph, controller, EagerBackend(), 1), modules, fixed)
    start = tiny_space.minimum_child()
    images = torch.randn(40, 1, *(tiny_space.input_size,) * 2)
    ladder = ladder_children(graph, controller, images, table, start)

    def ms(child: ChildArchitecture) -> float:
        policy = graph.resolve(child.to_policy().unsqueeze(0))
        return float(table.predict_ms(policy, include_controller=False)[0])

    base = ms(start)
    assert 1 < len(ladder) <= len(LADDER_STEPS)
    times = [ms(child) for child in ladder]
    assert times == sorted(times) and times[0] >= LADDER_STEPS[0] * base
    assert times[-1] >= LADDER_STEPS[-1] * base  # the ladder reaches its last step
    # Nested: each child holds the one before it, and the start's modules stay.
    pairs = [start.module_pairs(), *(c.module_pairs() for c in ladder)]
    assert all(a <= b for a, b in zip(pairs, pairs[1:]))
    # Modules join in the order of the controller's mean probability.
    with torch.no_grad():
        probs = torch.sigmoid(controller.policy_logits(images)).mean(0)
    added = ladder[0].module_pairs() - start.module_pairs()
    rest = {(c, m) for c in range(17) for m in range(5)} - ladder[0].module_pairs()
    assert min(probs[c, m] for c, m in added) >= max(probs[c, m] for c, m in rest)
