"""Cross-request batching: items from concurrent callers, gathered for one worker thread.

Threads and queues:
- `submit(item)` may be called from any thread or event loop; it puts `(item, future, arrival)` on
  a `queue.SimpleQueue` and returns a `concurrent.futures.Future` for the item's result.
- One worker thread (named `<name>-batcher`) is the only caller of `run_batch`. It waits for
  a first item, then keeps gathering until `max_items` are in hand or no item has arrived
  for `wait_s`, and runs them as one batch; never longer than `max_wait_s` after the first
  item arrived. Items that do not fit stay queued for the next batch, so a burst larger than
  `max_items` becomes several full batches, and items that queued while a batch ran start the
  next one at once.
- `incoming()` (if given) counts the items on their way to `submit` (an encoder: images still
  being decoded and resized). While it is above zero the batch keeps gathering, within
  `max_wait_s`: a burst of requests whose images finish preprocessing a few milliseconds
  apart becomes one batch instead of a batch of the first image and a batch of the rest.
- With nothing queued, the worker calls `on_idle()` (if given) until it returns False, then
  waits for an item, asking `on_idle()` again every `IDLE_POLL_S` (it may have declined for
  now); the encoder compiles its remaining buckets there, between batches. Once the hook has
  nothing left to do ever, it calls `retire_idle_work()` and the idle worker just waits.
- `close()` stops the worker after its current batch; items still queued fail.

`run_batch(items) -> results` gets at most `max_items` items and returns one result per item,
in order. If it raises, every item of that batch fails with the error; later batches go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()
IDLE_POLL_S = 1.0  # how often an idle worker asks `on_idle` again
INCOMING_POLL_S = 0.002  # how often a gathering batch asks `incoming` again


class BatcherClosed(RuntimeError):
    """The batcher was closed before the item ran."""


class Batcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], *, max_items: int,
                 wait_s: float, max_wait_s: float | None = None, name: str = "encoder",
                 on_idle: Callable[[], bool] | None = None,
                 incoming: Callable[[], int] | None = None) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        max_wait_s = wait_s if max_wait_s is None else max_wait_s
        if max_wait_s < wait_s:
            raise ValueError(f"max_wait_s ({max_wait_s}) must be >= wait_s ({wait_s})")
        self._run_batch = run_batch
        self._on_idle = on_idle
        self._incoming = incoming
        self.max_items = max_items
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()  # nothing is queued after the stop marker
        self.batches = 0  # batches run, and the items in them
        self.items = 0
        self._thread = threading.Thread(target=self._work, name=f"{name}-batcher", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def worker_ended(self) -> bool:
        """The worker thread has returned: no batch runs or will run."""
        return not self._thread.is_alive()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        with self._close_lock:
            if not self._closed:
                self._queue.put((item, future, time.monotonic()))
                return future
        future.set_exception(BatcherClosed("the encoder batcher is closed"))
        return future

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Stops the worker after its current batch (waits up to `timeout_s` for it)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        """The batch that starts with `first`, and whether a stop came while gathering."""
        batch = [first]
        while len(batch) < self.max_items:
            timeout_s = self._gather_timeout(first_at=first[2], last_at=batch[-1][2])
            try:
                entry = self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                if timeout_s > 0:
                    continue  # a poll for items on their way, or the quiet time ended: look again
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _gather_timeout(self, first_at: float, last_at: float) -> float:
        """How long to block for the next item (0: take only what is queued): until `wait_s`
        after the last arrival, then in short polls while items are on their way (one may
        fail before it is submitted), never past `max_wait_s` after the first."""
        now = time.monotonic()
        left_s = first_at + self.max_wait_s - now
        if left_s <= 0:
            return 0.0
        quiet_s = last_at + self.wait_s - now
        if quiet_s > 0:
            return min(quiet_s, left_s)
        if self._incoming is not None and self._incoming() > 0:
            return min(INCOMING_POLL_S, left_s)
        return 0.0

    def _work(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                if self._idle():
                    continue
                try:
                    first = self._queue.get(timeout=IDLE_POLL_S) if self._on_idle else self._queue.get()
                except queue.Empty:
                    continue
            if first is _STOP:
                break
            batch, stopping = self._gather(first)
            # A waiter that was cancelled while queued gives up its row.
            batch = [(item, future) for item, future, _ in batch if future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
        self._fail_queued()

    def retire_idle_work(self) -> None:
        """The idle hook is done for good: an idle worker stops asking it (and waking up for
        it); items are served as before."""
        self._on_idle = None

    def _idle(self) -> bool:
        """Runs the idle hook once; True if it did something (so look at the queue again)."""
        if self._on_idle is None:
            return False
        try:
            return bool(self._on_idle())
        except Exception:  # noqa: BLE001: idle work failing must not stop the batches
            log.exception("%s: idle work failed; not trying it again", self._thread.name)
            self._on_idle = None
            return False

    def _run(self, batch: list[tuple]) -> None:
        try:
            results = self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as error:  # the whole batch failed (device error): fail its items only
            log.exception("encoder batch of %d items failed", len(batch))
            for _, future in batch:
                future.set_exception(error)
            return
        self.batches += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def _fail_queued(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(BatcherClosed("the encoder batcher closed before this item ran"))
