"""Compile guard: proves that nothing compiles after warm-up.

Discipline (after vLLM's TPU runner): every shape a service runs is one of its
buckets; warm-up runs each bucket once; then `mark_warm()`. From there on every
step ends with `check(what)`. A new XLA compilation at that point means some
shape or graph escaped the buckets: a data-dependent slice, boolean-mask
indexing, a `.item()` inside the step. In strict mode (tests) it raises
`RecompilationError`; otherwise it is logged with `what` and counted in
`compilations_after_warmup`, which the services export as a metric.

To find the culprit, run with `PT_XLA_DEBUG_LEVEL=2`: torch_xla then prints a
"Compilation Analysis" naming the Python frame that forced the graph.

The counter behind it is torch_xla's process-wide count of cached graphs: every
graph the process compiled, or loaded from a persistent compilation cache
(`XLA_PERSISTENT_CACHE_PATH`, which TPU hosts can use to start faster; the CPU
PJRT client cannot load executables back). One guard sees every graph in its
process. Eager devices never compile.

Compiling after warm-up on purpose (the buckets a replica compiles in the background
once it serves) happens inside `compiling()`, never inside a step. Steps and deliberate
compilations of all guards in a process take one lock (`device_work`), so a step never
counts another thread's graph (the colocated layout runs two services in one process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from runtime.device import Device

log = logging.getLogger(__name__)


class RecompilationError(RuntimeError):
    """An XLA compilation happened after warm-up (strict mode only)."""


def xla_compilation_count() -> int:
    """Number of distinct XLA graphs this process has compiled or loaded so far."""
    import torch_xla.runtime as xr

    return int(xr.get_num_cached_compilation_graph())


# torch_xla's graph count is process-wide, and so is its lazy graph: a sync on one thread
# can cut another thread's half-traced graph. Device work of every guard in the process
# (steps, deliberate compilations, device set-up) therefore takes this lock, one at a time;
# services sharing a process (the colocated layout) share the device anyway.
_DEVICE_WORK = threading.RLock()


class CompileGuard:
    def __init__(self, device: Device, *, strict: bool, name: str,
                 counter: Callable[[], int] | None = None) -> None:
        self.name = name
        self.strict = strict
        if counter is None:
            counter = xla_compilation_count if device.is_xla else (lambda: 0)
        self._count = counter
        self._baseline: int | None = None
        self._warmup_start = 0
        self.warmup_compilations = 0
        self.compilations_after_warmup = 0

    @property
    def is_warm(self) -> bool:
        return self._baseline is not None

    def compilations(self) -> int:
        return self._count()

    def start_warmup(self) -> None:
        """Marks where warm-up begins, so `warmup_compilations` counts only its graphs."""
        self._warmup_start = self._count()

    def mark_warm(self) -> None:
        """Ends warm-up: from now on a new compilation is a recompilation."""
        now = self._count()
        self.warmup_compilations = now - self._warmup_start
        self._baseline = now

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Wraps one device step (including its sync): graphs it adds after warm-up are
        recompilations. No-op before warm-up."""
        with _DEVICE_WORK:
            before = self._count()
            yield
            added = self._count() - before
        if self._baseline is not None:
            self._report(added, what)

    @staticmethod
    @contextmanager
    def compiling() -> Iterator[None]:
        """Wraps device work that is not a step: set-up, and deliberate compilations (a bucket
        compiled in the background after warm-up), which are not recompilations."""
        with _DEVICE_WORK:
            yield

    def check(self, what: str) -> None:
        """Graphs added since warm-up (or the last check), by anyone in this process."""
        if self._baseline is None:
            return
        now = self._count()
        new, self._baseline = now - self._baseline, now
        self._report(new, what)

    def _report(self, new: int, what: str) -> None:
        if new <= 0:
            return
        self.compilations_after_warmup += new
        message = (f"{self.name}: {new} XLA compilation(s) after warm-up at {what}; "
                   "a shape escaped the buckets (run with PT_XLA_DEBUG_LEVEL=2 to see where)")
        if self.strict:
            raise RecompilationError(message)
        log.warning(message)
