"""Embedding cache: LRU by bytes, with single-flight for concurrent misses.

Entries map an image key (`runtime.image_key.image_cache_key`) to an `EmbeddingRef`;
what an entry costs is the byte size of the array its ref keeps alive. Inserting
past `capacity_bytes` evicts least recently used entries; `on_evict(ref)` is called
for each (outside the lock). An entry larger than the whole budget is not kept.

Single-flight: `claim(key)` for a key nobody holds makes the caller the owner of a
new in-flight computation; it must end it with `fulfil` or `fail`. Callers that
claim the same key meanwhile join that computation and wait on its future.

Thread-safe: one lock guards everything, and futures are `concurrent.futures`
futures, so callers on any thread or event loop may use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from runtime.messages import EmbeddingRef


@dataclass(frozen=True)
class Claim:
    ref: EmbeddingRef | None  # set on a hit
    future: Future | None  # the in-flight computation, on a miss or a join
    owner: bool  # this caller computes it and must call fulfil or fail


class EmbeddingCache:
    def __init__(self, capacity_bytes: int,
                 on_evict: Callable[[EmbeddingRef], None] | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[EmbeddingRef, int]] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.joins = 0
        self.evictions = 0
        self.forgotten = 0

    def claim(self, key: str) -> Claim:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return Claim(ref=entry[0], future=None, owner=False)
            future = self._inflight.get(key)
            if future is not None:
                self.joins += 1
                return Claim(ref=None, future=future, owner=False)
            future = self._inflight[key] = Future()
            self.misses += 1
            return Claim(ref=None, future=future, owner=True)

    def fulfil(self, key: str, ref: EmbeddingRef, nbytes: int) -> None:
        """Stores the owner's result and wakes everyone who joined."""
        evicted: list[EmbeddingRef] = []
        with self._lock:
            future = self._inflight.pop(key, None)
            if nbytes <= self.capacity_bytes and key not in self._entries:
                self._entries[key] = (ref, nbytes)
                self.bytes += nbytes
                while self.bytes > self.capacity_bytes:
                    _, (old, old_bytes) = self._entries.popitem(last=False)
                    self.bytes -= old_bytes
                    self.evictions += 1
                    evicted.append(old)
        if self._on_evict is not None:  # before waking anyone: what they see next is settled
            for old in evicted:
                self._on_evict(old)
        if future is not None:
            future.set_result(ref)

    def forget(self, key: str) -> bool:
        """Drops `key`'s entry (its embedding was lost): the next claim computes it again.
        An in-flight computation of the key is left alone; it makes a fresh embedding."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self.bytes -= entry[1]
            self.forgotten += 1
        if self._on_evict is not None:
            self._on_evict(entry[0])
        return True

    def fail(self, key: str, error: BaseException) -> None:
        """Ends the owner's computation with `error`; nothing is cached."""
        with self._lock:
            future = self._inflight.pop(key, None)
        if future is not None:
            future.set_exception(error)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "single_flight_joins": self.joins,
                    "evictions": self.evictions, "forgotten": self.forgotten, "bytes": self.bytes,
                    "entries": len(self._entries), "capacity_bytes": self.capacity_bytes}
