"""The kernel-trace breakdown of `decoder_bench.py --profile` (benchmarks/step_profile.py),
on a hand-written trace whose shares can be computed by hand."""

import gzip
import json

import pytest

from benchmarks.step_profile import STEP_EVENT, breakdown, op_kind


def _kernel(name, start, end, tid=1):
    """A kernel as XLA:CPU's trace has it: a start event, then an `end:` event (times in us)."""
    return [{"ph": "X", "tid": tid, "name": name, "ts": start, "dur": 1.0},
            {"ph": "X", "tid": tid, "name": f"end: {name}", "ts": end - 0.5, "dur": 0.5}]


def test_a_step_splits_into_layers_head_and_sampler(tmp_path):
    # One 10 ms step: two dots of the layers overlap for 2 ms, a fusion, then the head
    # (last dot), whose `end:` event comes late, after the sampler's top-k has started.
    events = [{"ph": "X", "tid": 0, "name": STEP_EVENT, "ts": 0.0, "dur": 10000.0},
              *_kernel("dot.10", 0, 3000), *_kernel("dot.11", 1000, 3000, tid=2),
              *_kernel("multiply_fusion.3.clone", 3000, 4000),
              *_kernel("dot.99", 4000, 9500),  # the head: really done when the top-k starts
              *_kernel("custom-call", 8000, 10000, tid=2)]
    trace = tmp_path / "vm.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)

    result = breakdown(trace)

    assert result["steps"] == 1 and result["step_ms"] == pytest.approx(10.0)
    assert result["ops_ms"] == pytest.approx(
        {"dot": 3.0, "multiply_fusion": 1.0, "head": 4.0, "sampler: custom-call": 2.0})


def test_op_kinds_drop_the_instance_suffixes():
    assert op_kind("dot.3488") == "dot"
    assert op_kind("copy_bitcast_fusion.46.clone") == "copy_bitcast_fusion"
    assert op_kind("custom-call") == "custom-call"
