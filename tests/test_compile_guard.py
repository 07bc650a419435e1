"""The guard must notice a shape that escaped the buckets, on the real XLA path."""

import pytest
import torch

from runtime.buckets import pad_to_bucket
from runtime.compile_guard import CompileGuard, RecompilationError, xla_compilation_count
from runtime.device import open_device

BUCKETS = (1, 2, 4)


def _run(layer, device, rows):
    out = layer(torch.ones(rows, 16, device=device.torch_device))
    device.sync()
    return out


@pytest.fixture
def warm_layer():
    device = open_device("xla")
    layer = torch.nn.Linear(16, 16).to(device.torch_device)
    guard = CompileGuard(device, strict=True, name="test")
    guard.start_warmup()
    for bucket in BUCKETS:
        _run(layer, device, bucket)
    guard.mark_warm()
    return device, layer, guard


def test_bucketed_shapes_never_recompile(warm_layer):
    device, layer, guard = warm_layer
    before = xla_compilation_count()
    for n in [1, 3, 2, 4, 1, 3]:
        _run(layer, device, pad_to_bucket(n, BUCKETS))
        guard.check(f"rows={n}")
    assert xla_compilation_count() == before
    assert guard.compilations_after_warmup == 0


def test_strict_guard_raises_on_planted_recompilation(warm_layer):
    device, layer, guard = warm_layer
    _run(layer, device, 3)  # 3 is not a bucket: a new graph
    with pytest.raises(RecompilationError, match="after warm-up at rows=3"):
        guard.check("rows=3")


def test_lenient_guard_counts_and_keeps_going(warm_layer, caplog):
    device, layer, _ = warm_layer
    guard = CompileGuard(device, strict=False, name="lenient")
    guard.mark_warm()
    _run(layer, device, 5)
    guard.check("rows=5")
    _run(layer, device, 5)  # now cached: nothing new
    guard.check("rows=5 again")
    assert guard.compilations_after_warmup == 1
    assert "after warm-up at rows=5" in caplog.text


def test_guard_is_idle_before_warmup():
    device = open_device("xla")
    guard = CompileGuard(device, strict=True, name="cold")
    layer = torch.nn.Linear(16, 16).to(device.torch_device)
    _run(layer, device, 7)
    guard.check("cold start")  # compiling before warm-up is expected, not an error
    assert not guard.is_warm


def test_eager_devices_count_nothing():
    guard = CompileGuard(open_device("cpu"), strict=True, name="eager")
    guard.mark_warm()
    torch.nn.Linear(4, 4)(torch.ones(3, 4))
    guard.check("eager step")
    assert guard.compilations() == 0


def test_step_blames_only_graphs_made_inside_it(warm_layer):
    device, layer, guard = warm_layer
    _run(layer, device, 6)  # a neighbour in the same process compiles a new graph...
    with guard.step("rows=4"):
        _run(layer, device, 4)  # ...but this step only reuses a warm one
    assert guard.compilations_after_warmup == 0
    with pytest.raises(RecompilationError, match="after warm-up at rows=13"):
        with guard.step("rows=13"):
            _run(layer, device, 13)  # a size no other test in this process has run
