"""Where a decoder step's device time goes, op by op: XLA's own trace of each kernel.

`decoder_bench.py --profile DIR` runs a few decode steps under torch_xla's profiler
(`torch_xla.debug.profiler`), whose trace of XLA:CPU's thunk executor times every kernel
of the graph on the thread that ran it. `breakdown` reads the trace back (the Chrome trace
that the profiler writes beside its XPlane) and splits each step's wall time among the ops
that ran in it, an instant shared equally by the ops running at once:

- `head`: the last dot of the step (the LM head), until the first op after it starts (its
  `end:` event can come later than that);
- `sampler: <op>`: what started after the head (the sampler's fusions, its top-k);
- `<op>` (dot, copy_bitcast_fusion, ...): everything before, i.e. the layers.

A kernel's span is its start event to its `end:` event: XLA:CPU runs a dot asynchronously
on its thread pool, so the start event alone covers only its dispatch.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

STEP_EVENT = "ThunkExecutor::Execute (wait for completion)"
NOT_OPS = ("Threadpool", "Wait for", "ThunkExecutor", "PjRt", "D2H", "DeviceBarrier", "Common",
           "update_placeholder", "call")


def trace_steps(step: Callable[[], object], steps: int, logdir: Path) -> Path:
    """Runs `step` `steps` times under the profiler; returns the trace file written."""
    import torch_xla.debug.profiler as xp

    xp.start_server(9012)  # the profiler records only in a process that serves it
    xp.start_trace(str(logdir))
    for _ in range(steps):
        step()
    xp.stop_trace()
    return max(logdir.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)


def op_kind(name: str) -> str:
    """`dot.3488` -> `dot`, `copy_bitcast_fusion.46.clone` -> `copy_bitcast_fusion`."""
    return re.sub(r"(\.\d+)*(\.clone)?$", "", name)


def _spans(events: list[dict]) -> list[tuple[str, float, float]]:
    """(op, start, end) of every kernel among one step's events, sorted by time."""
    started, spans = {}, []
    for e in events:
        name = e["name"]
        if name.startswith("end: "):
            if (start := started.pop(name[5:], None)) is not None:
                spans.append((name[5:], start, e["ts"] + e["dur"]))
        elif not name.startswith(NOT_OPS):
            started[name] = e["ts"]
    return spans


def _split_step(spans: list[tuple[str, float, float]]) -> collections.Counter:
    dots = [s for s in spans if s[0].startswith("dot.")]
    head = max(dots, key=lambda s: s[1]) if dots else None
    if head is not None:  # its `end:` event can come late: it ended when the sampler began
        after = [s[1] for s in spans if s[1] > head[1]]
        head = (head[0], head[1], min([head[2], *after]))
        spans = [head if s[0] == head[0] else s for s in spans]
    share: collections.Counter = collections.Counter()
    times = sorted({t for _, a, b in spans for t in (a, b)})
    for a, b in zip(times, times[1:]):
        running = [s for s in spans if s[1] <= a and s[2] >= b]
        for s in running:
            kind = ("head" if s is head else
                    f"sampler: {op_kind(s[0])}" if head and s[1] > head[1] else op_kind(s[0]))
            share[kind] += (b - a) / len(running)
    return share


def breakdown(trace: Path, last: int = 8) -> dict:
    """Milliseconds per step by op kind, over the `last` steps of the trace."""
    events = json.load(gzip.open(trace))["traceEvents"]
    events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    steps = [e for e in events if e["name"] == STEP_EVENT][-last:]
    total: collections.Counter = collections.Counter()
    for step in steps:
        end = step["ts"] + step["dur"]
        total.update(_split_step(_spans([e for e in events if step["ts"] <= e["ts"] <= end])))
    n = max(len(steps), 1)
    return {"steps": len(steps), "step_ms": sum(s["dur"] for s in steps) / n / 1e3,
            "ops_ms": {k: v / n / 1e3 for k, v in total.most_common()}}


def report(result: dict, top: int = 14) -> str:
    lines = [f"device trace: {result['steps']} steps, {result['step_ms']:.1f} ms each "
             "(ops sharing an instant share its time)", "", "| op | ms per step |", "|---|---|"]
    ops = result["ops_ms"]
    lines += [f"| {k} | {v:.2f} |" for k, v in list(ops.items())[:top]]
    if len(ops) > top:
        lines.append(f"| {len(ops) - top} other kinds | {sum(list(ops.values())[top:]):.2f} |")
    return "\n".join(lines)
