"""How much slower the engine's graph calls run than their best: whether the cores are shared.

Every graph has fixed shapes, so a call of it does the same work each time; its best time is
what it costs on a device the engine has to itself. On a host whose CPUs are the device (XLA's
CPU backend, where the encoder replica computes on the decoder's cores), a call that ran
`slowdown` times slower than its graph's best was sharing the cores: measured on the 2-core
development machine, steps ran ~2x slower while the encoder encoded a batch, for seconds at a
time. The scheduler reads `contended` to keep what a step's prefill chunk stalls the running
streams close to what it costs uncontended (scheduler.py, docs/decoder.md).

Only the engine thread records and reads. The first call of a graph sets its best and says
nothing about contention (there is nothing to compare with yet).
"""

from __future__ import annotations

from collections.abc import Hashable


class GraphTimes:
    def __init__(self, contended_slowdown: float | None) -> None:
        """`contended_slowdown`: a call this many times slower than its graph's best marks the
        engine contended until a call runs faster; None: never contended."""
        if contended_slowdown is not None and contended_slowdown <= 1.0:
            raise ValueError(f"contended_slowdown must be > 1 or None, got {contended_slowdown}")
        self.contended_slowdown = contended_slowdown
        self._best: dict[Hashable, float] = {}
        self.last_slowdown = 1.0  # the latest call's time over its graph's best
        self.contended_calls = 0

    def record(self, graph: Hashable, seconds: float) -> None:
        best = self._best.get(graph)
        self._best[graph] = seconds if best is None else min(best, seconds)
        self.last_slowdown = seconds / best if best else 1.0
        self.contended_calls += self.contended

    @property
    def contended(self) -> bool:
        """The latest call ran at least `contended_slowdown` times slower than its best."""
        return self.contended_slowdown is not None and self.last_slowdown >= self.contended_slowdown

    def best(self, graph: Hashable) -> float | None:
        return self._best.get(graph)
