import torch

from instanas.models.metagraph import MetaGraph, mbv2_path, mbv2_path_network
from instanas.space import ChildArchitecture


def _random_policy(space, batch, density):
    return torch.rand(batch, space.num_cells, space.num_modules) < density


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5, relative to the tensor's scale once that exceeds 1: float32 gradients of
    ~100 summed in another order (sparse vs dense) differ by ~2e-5 on one thread."""
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def test_cell_output_is_sum_of_selected_modules(tiny_space):
    graph = MetaGraph(tiny_space).eval()
    cell = graph.cells[4]  # shape-preserving
    x = torch.randn(3, cell.spec.in_channels, cell.spec.input_size, cell.spec.input_size)
    policy = torch.zeros(3, 5, dtype=torch.bool)
    policy[0, [1, 3]] = True
    policy[1, 4] = True
    with torch.no_grad():
        out = cell.forward_sparse(x, policy, policy.sum(0).tolist())
        assert torch.allclose(
            out[0], (cell.candidates[1](x[:1]) + cell.candidates[3](x[:1]))[0], atol=1e-5
        )
        assert torch.allclose(out[1], cell.candidates[4](x[1:2])[0], atol=1e-5)
        assert torch.equal(out[2], x[2])  # empty shape-preserving cell is the identity


def test_empty_forced_cell_runs_module_4(tiny_space):
    graph = MetaGraph(tiny_space).eval()
    x = torch.randn(2, 1, 12, 12)
    empty = torch.zeros(2, tiny_space.num_cells, tiny_space.num_modules, dtype=torch.bool)
    explicit = graph.resolve(empty)
    assert explicit[:, 0, 4].all()
    with torch.no_grad():
        assert torch.allclose(graph(x, empty), graph(x, explicit), atol=1e-6)


def test_sparse_equals_dense_outputs_and_gradients(tiny_space):
    graph = MetaGraph(tiny_space).eval()  # eval: BatchNorm uses running stats in both paths
    x = torch.randn(6, 1, 12, 12)
    for density in (0.2, 0.5, 0.9):
        policy = _random_policy(tiny_space, 6, density)
        grads = []
        for execution in ("sparse", "dense"):
            graph.zero_grad()
            out = graph(x, policy, execution=execution)
            out.square().sum().backward()
            grads.append(
                [
                    p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                    for p in graph.parameters()
                ]
            )
            if execution == "sparse":
                sparse_out = out.detach()
            else:
                assert torch.allclose(sparse_out, out.detach(), atol=1e-5)
        for a, b in zip(*grads):
            assert _close(a, b)


def test_unselected_module_does_not_run(tiny_space):
    graph = MetaGraph(tiny_space).eval()
    calls = []
    graph.cells[5].candidates[2].register_forward_hook(lambda *a: calls.append(1))
    policy = torch.ones(4, tiny_space.num_cells, tiny_space.num_modules, dtype=torch.bool)
    policy[:, 5, 2] = False
    with torch.no_grad():
        graph(torch.randn(4, 1, 12, 12), policy)
    assert calls == []
    policy[1, 5, 2] = True
    with torch.no_grad():
        graph(torch.randn(4, 1, 12, 12), policy)
    assert calls == [1]


def test_materialized_child_equals_masked_metagraph(tiny_space):
    graph = MetaGraph(tiny_space)
    # A few training steps so BatchNorm statistics are not the identity.
    graph.train()
    with torch.no_grad():
        for _ in range(3):
            graph(torch.randn(8, 1, 12, 12))
    graph.eval()
    child = ChildArchitecture.from_policy(_random_policy(tiny_space, 1, 0.4)[0])
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        masked = graph(x, child.to_policy().expand(5, -1, -1), execution="dense")
        static = graph.materialize(child).eval()(x)
        fused = graph.materialize(child).deploy()(x)
        direct = graph.forward_child(x, child)
    assert torch.allclose(static, masked, atol=1e-5)
    assert torch.allclose(fused, masked, atol=1e-4)
    assert torch.allclose(direct, masked, atol=1e-5)
    # Only the selected modules' weights are held.
    n_modules = sum(len(cell) for cell in graph.materialize(child).cells)
    assert n_modules == graph.resolve(child.to_policy()).sum()


def test_mbv2_baseline_is_module_0_path(tiny_space):
    net = mbv2_path_network(tiny_space)
    assert all(len(c) == 1 for c in net.cells)
    assert net.child == mbv2_path(tiny_space)
    assert net(torch.randn(2, 1, 12, 12)).shape == (2, 4)


def test_deployed_metagraph_matches(tiny_space):
    graph = MetaGraph(tiny_space)
    graph.train()
    with torch.no_grad():
        graph(torch.randn(8, 1, 12, 12))
    graph.eval()
    policy = _random_policy(tiny_space, 4, 0.5)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(graph.deploy()(x, policy), graph(x, policy), atol=1e-4)


def _outputs_and_grads(graph, x, policy, execution="sparse"):
    graph.zero_grad()
    out = graph(x, policy, execution=execution)
    out.square().sum().backward()
    return out.detach(), [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in graph.parameters()
    ]


def test_channels_last_sparse_equals_dense(tiny_space):
    torch.manual_seed(1)
    graph = MetaGraph(tiny_space).eval().to(memory_format=torch.channels_last)
    x = torch.randn(24, 1, 12, 12).contiguous(memory_format=torch.channels_last)
    policy = _random_policy(tiny_space, 24, 0.3)
    out_s, grads_s = _outputs_and_grads(graph, x, policy, "sparse")
    out_d, grads_d = _outputs_and_grads(graph, x, policy, "dense")
    assert torch.allclose(out_s, out_d, atol=1e-5)
    for a, b in zip(grads_s, grads_d):
        assert _close(a, b)


def test_grouped_execution_equals_dense(tiny_space):
    torch.manual_seed(2)
    graph = MetaGraph(tiny_space).eval()
    x = torch.randn(12, 1, 12, 12)
    children = _random_policy(tiny_space, 3, 0.4)
    policy = children[torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 0, 2])]
    with torch.no_grad():
        dense = graph(x, policy, execution="dense")
        assert torch.allclose(graph(x, policy, execution="grouped"), dense, atol=1e-5)
        assert torch.allclose(graph.deploy()(x, policy, execution="grouped"), dense, atol=1e-4)
        one = policy[:1].expand(12, -1, -1)
        assert torch.allclose(
            graph(x, one, execution="grouped"), graph(x, one, execution="dense"), atol=1e-5
        )


def test_grouped_execution_runs_each_child_once(tiny_space):
    graph = MetaGraph(tiny_space).eval()
    calls = []
    graph.cells[3].candidates[1].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    policy = torch.zeros(6, tiny_space.num_cells, tiny_space.num_modules, dtype=torch.bool)
    policy[:, :, 0] = True
    policy[[1, 4], 3, 1] = True  # two images share a child that adds module 1 in cell 3
    with torch.no_grad():
        graph(torch.randn(6, 1, 12, 12), policy, execution="grouped")
    assert calls == [2]


def test_sparse_forward_reads_the_device_once(tiny_space, monkeypatch):
    """One host transfer per sparse forward (a GPU step would wait at each): no per-cell
    checks, no data-dependent nonzero()."""
    graph = MetaGraph(tiny_space)
    policy = torch.rand(6, graph.space.num_cells, graph.space.num_modules) < 0.4
    policy[0] = False  # some cells get empty rows
    x = torch.randn(6, 1, 12, 12)
    calls = []
    for name in ("tolist", "item", "__bool__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with torch.no_grad():
        graph(x, policy)
    assert calls == ["tolist"]
