"""Image affinity: which replica should serve an image key, as pure functions.

A consistent-hash ring over the live replicas, `virtual_nodes` points per replica,
maps a key to its owner; a replica joining or leaving moves only the keys whose
nearest point was (or becomes) one of its own. `choose` adds the load fallback:
when the owner's queue is longer than the least loaded replica's by more than
`imbalance_threshold` requests, the call goes to the least loaded one instead
(which then caches that image too). A call without a key (a text-only prompt, an
`info()` call) goes to the least loaded replica.

Shared by the Serve request router (`deploy/affinity.py`) and its tests; no Ray here.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

DEFAULT_VIRTUAL_NODES = 256


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Ring:
    """Sorted ring points, each naming its replica."""

    points: tuple[int, ...]
    owners: tuple[str, ...]

    @classmethod
    def of(cls, replica_ids: Iterable[str], virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> Ring:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        placed = sorted((_point(f"{rid}#{i}"), rid) for rid in set(replica_ids)
                        for i in range(virtual_nodes))
        return cls(tuple(p for p, _ in placed), tuple(r for _, r in placed))

    def owner(self, key: str) -> str:
        """The replica whose point follows the key's hash on the ring (wrapping around)."""
        if not self.points:
            raise ValueError("the ring has no replicas")
        index = bisect.bisect_right(self.points, _point(key)) % len(self.points)
        return self.owners[index]


@dataclass(frozen=True)
class Choice:
    replica_id: str
    route: str  # "affinity": the key's owner; "fallback": the owner was too busy; "load": no key


def choose(key: str | None, queue_lens: Mapping[str, int], ring: Ring, *,
           imbalance_threshold: int) -> Choice:
    """The replica for `key` among `queue_lens` (replica id -> requests in its queue), all on
    `ring`. Ties between equally loaded replicas go to the first id in sorted order."""
    if not queue_lens:
        raise ValueError("no replicas to choose from")
    least = min(sorted(queue_lens), key=lambda rid: queue_lens[rid])
    if key is None:
        return Choice(least, "load")
    owner = ring.owner(key)
    if queue_lens[owner] - queue_lens[least] > imbalance_threshold:
        return Choice(least, "fallback")
    return Choice(owner, "affinity")


class InTransit:
    """Calls assigned to a replica but not yet counted in Serve's queue-length cache.

    Serve counts a call at a replica only once the caller, woken up later on the event
    loop, sends it; until then every routing decision sees the old count, and a burst of
    calls for one image all went to its owner (measured: nine in a row at 0 vs 2). A call
    is added when assigned and taken off when sent; one never sent (its caller gave up)
    stops counting after `ttl_s`.
    """

    def __init__(self, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._assigned: defaultdict[str, deque[float]] = defaultdict(deque)

    def assigned(self, replica_id: str) -> None:
        self._assigned[replica_id].append(self._clock())

    def sent(self, replica_id: str) -> None:
        times = self._assigned.get(replica_id)
        if times:
            times.popleft()

    def count(self, replica_id: str) -> int:
        times = self._assigned.get(replica_id)
        if not times:
            return 0
        oldest_alive = self._clock() - self._ttl_s
        while times and times[0] < oldest_alive:
            times.popleft()
        return len(times)

    def forget(self, live: Iterable[str]) -> None:
        """Drops replicas no longer live."""
        for replica_id in set(self._assigned) - set(live):
            del self._assigned[replica_id]
