"""Whether the engine's cores are shared: its graph calls run slower than their best, or
other processes' threads compete for every core right now.

Every graph has fixed shapes, so a call of it does the same work each time; its best time is
what it costs on a device the engine has to itself. On a host whose CPUs are the device (XLA's
CPU backend, where the encoder replica computes on the decoder's cores), a call that ran
`slowdown` times slower than its graph's best was sharing the cores: measured on the 2-core
development machine, steps ran ~2x slower while the encoder encoded a batch, for seconds at a
time. The scheduler reads `contended` to keep what a step's prefill chunk stalls the running
streams close to what it costs uncontended (scheduler.py, docs/decoder.md).

A slow call is known only once it has run, so the first step of an encoder batch carries a
whole chunk. Where the graphs compute on the host's CPUs, the engine also looks before each
step (`others_computing`, runtime/host_cpu.py): when at least as many other threads are
runnable as the host has CPUs, the step is contended before it starts. Measured served on the
2-core machine, every image new (docs/benchmarks.md, Issue 13): 20 steps beside 12 or more
decodes carried an uncontended 128-token chunk and took over 350 ms; at 14 of them the count
said so beforehand.

Only the engine thread records and reads. The first call of a graph sets its best and says
nothing about contention (there is nothing to compare with yet).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


class GraphTimes:
    def __init__(self, contended_slowdown: float | None,
                 others_computing: Callable[[], bool] | None = None) -> None:
        """`contended_slowdown`: a call this many times slower than its graph's best marks the
        engine contended until a call runs faster; None: never contended. `others_computing`:
        other processes compete for every core now (None: not asked; a device of its own)."""
        if contended_slowdown is not None and contended_slowdown <= 1.0:
            raise ValueError(f"contended_slowdown must be > 1 or None, got {contended_slowdown}")
        self.contended_slowdown = contended_slowdown
        self._others_computing = others_computing if contended_slowdown is not None else None
        self._best: dict[Hashable, float] = {}
        self.last_slowdown = 1.0  # the latest call's time over its graph's best
        self.contended_calls = 0

    def record(self, graph: Hashable, seconds: float) -> None:
        best = self._best.get(graph)
        self._best[graph] = seconds if best is None else min(best, seconds)
        self.last_slowdown = seconds / best if best else 1.0
        self.contended_calls += self.slow

    @property
    def slow(self) -> bool:
        """The latest call ran at least `contended_slowdown` times slower than its best."""
        return self.contended_slowdown is not None and self.last_slowdown >= self.contended_slowdown

    @property
    def watches_host(self) -> bool:
        """Asks the host before each step whether other processes compete for every core."""
        return self._others_computing is not None

    @property
    def contended(self) -> bool:
        """The latest call ran slow, or other processes compete for every core now."""
        return self.slow or (self._others_computing is not None and self._others_computing())

    def best(self, graph: Hashable) -> float | None:
        return self._best.get(graph)
