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
