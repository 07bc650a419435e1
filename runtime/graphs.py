"""Which graphs of a family are compiled, and which compiled graph a step should use.

A family is a list of planned graphs, each a tuple of bucket sizes (for the decoder's decode
family: (sequences, KV blocks)). A replica compiles a *covering* set first: the largest
graph, which every step fits by padding up, so it can serve at once. The rest compile later,
outside any step, smallest first (`next_pending`), and each step runs on the cheapest
compiled graph whose every size is at least what it needs (`fit`). Once all are compiled,
`fit` is exactly `pad_to_bucket` in every dimension.

>>> plan = GraphPlan([(1, 2), (1, 4), (2, 2), (2, 4)])
>>> plan.covering
(2, 4)
>>> plan.mark_compiled((2, 4)); plan.fit((1, 1))
(2, 4)
>>> plan.mark_compiled(plan.next_pending()); plan.fit((1, 1))
(1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

# Told during a warm-up: (graphs compiled, graphs to compile before serving, graphs planned).
WarmupProgress = Callable[[int, int, int], None]


def warmup_reporter(progress: WarmupProgress | None, compiled: Callable[[], int], planned: int,
                    full: bool) -> Callable[[], None]:
    """What a warm-up calls before its first compile and after each: tells `progress` how far
    it is. Before serving, a replica compiles its covering graph alone, or with `full` all."""
    before_serving = planned if full else 1

    def report() -> None:
        if progress is not None:
            progress(compiled(), before_serving, planned)

    return report


class GraphPlan:
    def __init__(self, planned: Sequence[tuple[int, ...]]) -> None:
        if not planned:
            raise ValueError("a graph family needs at least one graph")
        self.planned = sorted(set(planned), key=lambda g: (math.prod(g), g))
        self.covering = tuple(max(g[i] for g in self.planned) for i in range(len(self.planned[0])))
        if self.covering not in self.planned:
            raise ValueError(f"no planned graph covers every other one ({self.covering} is missing)")
        self.compiled: list[tuple[int, ...]] = []  # cheapest first

    @property
    def complete(self) -> bool:
        return len(self.compiled) == len(self.planned)

    def mark_compiled(self, graph: tuple[int, ...]) -> None:
        if graph not in self.planned:
            raise ValueError(f"graph {graph} is not planned")
        if graph not in self.compiled:
            self.compiled.append(graph)
            self.compiled.sort(key=lambda g: (math.prod(g), g))

    def next_pending(self) -> tuple[int, ...] | None:
        return next((g for g in self.planned if g not in self.compiled), None)

    def fit(self, need: tuple[int, ...]) -> tuple[int, ...]:
        """The cheapest compiled graph at least as large as `need` in every dimension."""
        graph = self.fitting(need)
        if graph is None:
            raise ValueError(f"no compiled graph fits {need} (compiled: {self.compiled})")
        return graph

    def fitting(self, need: tuple[int, ...]) -> tuple[int, ...] | None:
        """`fit`, or None when no compiled graph fits."""
        return next((g for g in self.compiled if all(x >= n for x, n in zip(g, need))), None)
