"""When the engine may compile one more graph that start-up left out.

Graphs not compiled at start-up compile on the engine thread, between steps: whenever
the engine is idle, and under load only while compiling has taken at most `share` of the
time since the replica became ready (each compile stalls running sequences for its
duration, so the share bounds the stalls). Idle compiles wait while less than half the
host's CPUs are idle (`runtime.host_cpu`): replicas beside this one may still be warming
up, and their readiness comes first.

The replica serves on one graph, the covering prefill graph: until the decode family's
covering graph is compiled, decodes run on it as one-token chunks, a few sequences per
step. Under load that graph compiles, outside the share, once those slow decode steps have
cost as long as compiling the prefill graph took (a ski-rental rule: at most twice the
best stall).

Only the engine thread calls in; the runner's `compile_next` picks which graph is next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from runtime.host_cpu import HostCpu


class BackgroundCompiles:
    def __init__(self, runner, *, share: float = 0.1, host_cpu: HostCpu | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.share = share
        self.host_cpu = host_cpu or HostCpu()
        self._clock = clock
        self._ready_at = clock()
        self._compiling_under_load_s = 0.0
        self.decodes_on_prefill_s = 0.0  # time decode steps have run on the prefill graph

    @contextmanager
    def decoding_on_prefill_graph(self) -> Iterator[None]:
        """Times decodes run on the prefill graph (no decode graph yet): what the ski-rental
        rule weighs against a compile, on the same clock as the compiles."""
        started = self._clock()
        try:
            yield
        finally:
            self.decodes_on_prefill_s += self._clock() - started

    def compile_one(self, busy: bool) -> bool:
        """Compiles one more graph if any is left and the policy allows it now; True if it did."""
        runner = self.runner
        if runner.graphs_compiled >= runner.graphs_planned:
            return False  # all in: nothing to ask the host about
        if not busy and not self.host_cpu.has_spare():
            return False  # replicas beside this one are busy (still warming up?): not now
        if busy and not self._decode_graph_pays():
            if self._compiling_under_load_s >= self.share * (self._clock() - self._ready_at):
                return False
        started = self._clock()
        compiled = runner.compile_next()
        if busy:
            self._compiling_under_load_s += self._clock() - started
        return compiled

    def _decode_graph_pays(self) -> bool:
        """No decode graph yet, and decoding without one has cost a compile's time already."""
        if self.runner.can_decode:
            return False
        cost = max(self.runner.compile_seconds.values(), default=0.0)
        return self.decodes_on_prefill_s >= cost
