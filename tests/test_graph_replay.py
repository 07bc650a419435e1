"""A replayed graph computes what lazy tracing computes, compiles nothing after capture,
keeps its state's values through the capture, and refuses what it cannot replay."""

import numpy as np
import pytest
import torch

from runtime.compile_guard import xla_compilation_count
from runtime.device import open_device
from runtime.graph_replay import ReplayedGraph

ROWS, BLOCKS, WIDTH = 4, 6, 8


@pytest.fixture
def device():
    return open_device("xla")


def _step(weight, state):
    """Writes each row into both state tensors (the second one first, so the graph reaches
    them out of list order) and reads the updated rows back through a constant weight."""
    def fn(t):
        rows = t["rows"] @ weight
        state[1].index_put_((t["slots"],), rows * 2)
        state[0].index_put_((t["slots"],), rows)
        return state[0].index_select(0, t["reads"]).sum(1) + state[1].index_select(0, t["reads"]).sum(1)
    return fn


def _inputs(rng, dev):
    return {"rows": torch.from_numpy(rng.standard_normal((ROWS, WIDTH)).astype(np.float32)).to(dev),
            "slots": torch.from_numpy(rng.permutation(BLOCKS)[:ROWS]).to(dev),
            "reads": torch.from_numpy(rng.integers(0, BLOCKS, ROWS)).to(dev)}


def test_replay_matches_lazy_tracing_and_keeps_state_through_capture(device):
    dev = device.torch_device
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)).to(dev)
    start = [rng.standard_normal((BLOCKS, WIDTH)).astype(np.float32) for _ in range(2)]
    replayed_state = [torch.from_numpy(a).to(dev) for a in start]
    lazy_state = [torch.from_numpy(a).to(dev) for a in start]
    device.sync()

    graph = ReplayedGraph.capture(_step(weight, replayed_state), _inputs(rng, dev), replayed_state)
    for kept, original in zip(replayed_state, start):  # tracing wrote nothing
        np.testing.assert_array_equal(kept.cpu().numpy(), original)

    lazy = _step(weight, lazy_state)
    compiled = xla_compilation_count()
    for _ in range(4):  # each call reads what the previous ones wrote
        inputs = _inputs(rng, dev)
        out, replayed_state = graph.run(inputs, replayed_state)
        expected = lazy(inputs)
        device.sync()
        np.testing.assert_allclose(out.cpu().numpy(), expected.cpu().numpy(), rtol=1e-6)
    for replayed, traced in zip(replayed_state, lazy_state):
        np.testing.assert_allclose(replayed.cpu().numpy(), traced.cpu().numpy(), rtol=1e-6)
    assert xla_compilation_count() == compiled + 1  # the lazy path's graph; replays compile none


def test_replay_refuses_other_inputs_and_random_numbers(device):
    dev = device.torch_device
    rng = np.random.default_rng(1)
    weight = torch.eye(WIDTH).to(dev)
    state = [torch.zeros(BLOCKS, WIDTH).to(dev) for _ in range(2)]
    graph = ReplayedGraph.capture(_step(weight, state), _inputs(rng, dev), state)
    renamed = {("values" if k == "rows" else k): v for k, v in _inputs(rng, dev).items()}
    with pytest.raises(ValueError, match="differ from the captured"):
        graph.run(renamed, state)

    def noisy(t):
        state[0].index_put_((t["slots"],), torch.rand(ROWS, WIDTH, device=dev))
        return state[0].sum(1)
    with pytest.raises(ValueError, match="RNG"):
        ReplayedGraph.capture(noisy, {"slots": _inputs(rng, dev)["slots"]}, state[:1])
    assert not state[0].cpu().any()  # the refused trace wrote nothing
