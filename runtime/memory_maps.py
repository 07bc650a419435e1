"""Whether a process has the memory maps left to compile another graph.

XLA's CPU backend JIT-compiles each kernel of a graph into memory of its own: three maps
(code, constants, data) per kernel. Measured on the small decoder: 490-770 maps per graph
(a batch-16 decode graph has ~220 kernels). Linux caps a process at `vm.max_map_count` maps
(65,530 by default); past it LLVM's allocations fail ("LLVM compilation error: Cannot
allocate memory") and the compile does not return. Measured: a decoder planning 104 graphs
hung in warm-up at 65,010 maps, with no error reaching the caller.

`MapBudget.allows_another()` says no once the maps left would not hold two more graphs of
the largest seen so far plus `margin` for everything else the process maps (threads,
buffers, libraries). A runner that asks before each optional compile keeps serving on the
graphs it has, which pad every step up. On a TPU the executables live on the device; where
`/proc` is missing the budget always allows.

>>> counts = iter([1000, 1600, 61000, 60100])
>>> budget = MapBudget(limit=65530, count=counts.__next__, margin=4096)
>>> with budget.measure():
...     pass
>>> budget.largest, budget.allows_another(), budget.allows_another()
(600, False, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

MARGIN = 4096  # maps kept for everything but compiled graphs


def read_max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def count_maps() -> int | None:
    """This process's memory maps now (one line each in /proc/self/maps)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return None


class MapBudget:
    def __init__(self, limit: int | None = None, count: Callable[[], int | None] = count_maps,
                 margin: int = MARGIN) -> None:
        """`limit`: the process's map cap (None: read `vm.max_map_count`)."""
        self.limit = read_max_map_count() if limit is None else limit
        self._count = count
        self.margin = margin
        self.largest = 0  # maps one compile added, the most seen

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Around one compile: records the maps it added."""
        before = self._count()
        yield
        after = self._count()
        if before is not None and after is not None:
            self.largest = max(self.largest, after - before)

    def allows_another(self) -> bool:
        used = self._count() if self.limit is not None else None
        return used is None or used + 2 * self.largest + self.margin <= self.limit

    def describe(self) -> str:
        return (f"{self._count()} of vm.max_map_count {self.limit} memory maps in use, up to "
                f"{self.largest} per graph")
