import pytest
import torch

from instanas.models.controller import (
    Controller,
    ControllerSpec,
    bound_probabilities,
    greedy_policy,
    policy_log_prob,
    sample_policy,
)
from instanas.search.reward import LatencyBounds, instance_reward, latency_reward, window_bounds
from instanas.stages.pretrain import drop_path_keep

BOUNDS = LatencyBounds(all_modules=100.0, mbv2_path=20.0, minimum=4.0)


def test_latency_reward_shape():
    z = torch.tensor([4.0, 12.0, 20.0, 25.0, 2.0])
    r = latency_reward(z, 4.0, 20.0)
    assert r.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0])
    assert 0 < latency_reward(torch.tensor([8.0]), 4.0, 20.0).item() < 1


def test_dynamic_window_schedule():
    assert window_bounds(BOUNDS, 0.0) == pytest.approx((4.0, 70.0))
    assert window_bounds(BOUNDS, 1.0) == pytest.approx((4.0, 10.0))
    assert window_bounds(BOUNDS, 0.5) == pytest.approx((4.0, 40.0))
    assert window_bounds(BOUNDS, 0.3, "static") == (4.0, 100.0)
    with pytest.raises(ValueError):
        window_bounds(BOUNDS, 0.3, "shrinking")


def test_instance_reward_weights():
    correct = torch.tensor([True, False])
    z = torch.tensor([12.0, 12.0])
    r = instance_reward(correct, z, 4.0, 20.0, pos_w=30.0, neg_w=-1.0)
    assert r.tolist() == pytest.approx([30.0, -1.0])


def test_drop_path_schedule():
    assert drop_path_keep(0.0, 0.5) == 1.0
    assert drop_path_keep(0.49, 0.5) == 1.0
    assert drop_path_keep(0.75, 0.5) == pytest.approx(0.75)
    assert drop_path_keep(1.0, 0.5) == pytest.approx(0.5)
    # pretrain.drop_path_start moves the start of the fall, the end stays at final_keep
    assert drop_path_keep(0.24, 0.5, start=0.25) == 1.0
    assert drop_path_keep(0.625, 0.5, start=0.25) == pytest.approx(0.75)
    assert drop_path_keep(1.0, 0.5, start=0.25) == pytest.approx(0.5)


def test_probability_bounding_and_policies():
    p = torch.tensor([0.0, 0.5, 1.0])
    assert bound_probabilities(p, 0.8).tolist() == pytest.approx([0.2, 0.5, 0.8])
    assert greedy_policy(p).tolist() == [False, True, True]
    gen = torch.Generator().manual_seed(0)
    samples = sample_policy(torch.full((20000,), 0.3), gen)
    assert samples.float().mean().item() == pytest.approx(0.3, abs=0.02)
    lp = policy_log_prob(torch.tensor([[0.25, 0.5]]), torch.tensor([[True, False]]))
    assert lp.item() == pytest.approx(float(torch.log(torch.tensor(0.25 * 0.5))))


def test_controller_output_shape():
    ctrl = Controller(1, 17, 5, ControllerSpec(14, (8, 16, 32)))
    p = ctrl(torch.randn(3, 1, 28, 28))
    assert p.shape == (3, 17, 5) and ((p > 0) & (p < 1)).all()
    ctrl.eval()
    assert torch.allclose(
        ctrl.deploy()(torch.ones(1, 1, 28, 28)), ctrl(torch.ones(1, 1, 28, 28)), atol=1e-5
    )


def test_proportional_gain_reacts_to_the_last_overshoot():
    from instanas.search.reward import DualWeight

    plain, damped = DualWeight(), DualWeight()
    for mean in (2.0, 2.0, 0.5):  # twice over the target of 1.0, then well under it
        plain.update(mean, 1.0, step=0.1)
        damped.update(mean, 1.0, step=0.1, gain=0.3)
    assert damped.value == plain.value == pytest.approx(0.15)  # the same integral
    assert plain.weight == pytest.approx(0.15)
    assert damped.weight == pytest.approx(0.0)  # 0.15 - 0.3 x 0.5, kept non-negative
    damped.update(3.0, 1.0, step=0.1, gain=0.3)
    assert damped.weight == pytest.approx(0.25 + 0.3)


def test_the_latency_weight_is_saved_and_restored_with_the_search_epoch():
    """The search's epoch record keeps the dual weight under the names runs have always saved,
    so a run saved before the weight was an object of the loop resumes as it did."""
    import json

    from instanas.search.reward import DualWeight
    from instanas.stages.loop import EpochLoop

    dual = DualWeight()
    dual.update(3.0, 2.0, 0.05, gain=2.0)
    loop = EpochLoop("search", 3, {}, {}, state={"history": [1]}, stateful=(dual,))
    record = json.loads(json.dumps(loop.record()))  # as saved with the epoch state
    assert list(record) == ["history", "latency_weight", "latency_weight_p"]
    resumed = DualWeight()
    again = EpochLoop("search", 3, {}, {}, state={"history": []}, stateful=(resumed,))
    again.restore(record)
    assert (resumed.value, resumed.proportional) == (dual.value, dual.proportional)
    assert again.state == {"history": [1]}
    old = DualWeight()
    EpochLoop("search", 3, {}, {}, stateful=(old,)).restore({"history": [], "latency_weight": 0.5})
    assert (old.value, old.proportional) == (0.5, 0.0)
