"""Warm-up progress of replicas still in their constructors, for `splitserve serve` to show.

A replica compiles the graphs it serves with inside its constructor, and until that returns
nothing can ask it anything (`/health` only says which halves are not up yet). So each replica
writes its progress to Ray's internal key-value store while it compiles: one key per replica
(`splitserve-warmup/<app>/<service>/<actor id>`), a JSON value with the graphs compiled, the
graphs it compiles before serving and the graphs planned; the key is deleted once the
constructor is done. The CLI reads every key of its app each poll and prints one part per
service: `encoder 0/1 graphs before serving (4 planned)`.

`Publisher` and `probe` take a `Store` (`ray.experimental.internal_kv`'s functions by default)
so tests can hand in a dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from deploy.startup import READY, Probe, Readiness

PREFIX = "splitserve-warmup"


@dataclass(frozen=True)
class Store:
    put: Callable[[str, bytes], object]
    delete: Callable[[str], object]
    list: Callable[[str], list]
    get: Callable[[str], bytes | None]


def ray_store() -> Store:
    from ray.experimental import internal_kv as kv

    return Store(put=lambda key, value: kv._internal_kv_put(key, value, overwrite=True),
                 delete=kv._internal_kv_del, list=kv._internal_kv_list, get=kv._internal_kv_get)


class Publisher:
    """One replica's progress: call it as a `WarmupProgress`, then `done()`."""

    def __init__(self, app: str, service: str, replica: str, store: Store | None = None) -> None:
        self.key = f"{PREFIX}/{app}/{service}/{replica}"
        self.service = service
        self.store = store or ray_store()

    def __call__(self, compiled: int, before_serving: int, planned: int) -> None:
        self.store.put(self.key, json.dumps({"service": self.service, "compiled": compiled,
                                             "before_serving": before_serving,
                                             "planned": planned}).encode())

    def done(self) -> None:
        self.store.delete(self.key)


def describe(app: str, store: Store) -> str:
    """One part per service with a replica still warming up, or "" when none is."""
    totals: dict[str, list[int]] = {}
    for key in sorted(store.list(f"{PREFIX}/{app}/")):
        value = store.get(key.decode() if isinstance(key, bytes) else key)
        if value is None:  # deleted between list and get: that replica is done
            continue
        entry = json.loads(value)
        total = totals.setdefault(entry["service"], [0, 0, 0, 0])
        total[0] += min(entry["compiled"], entry["before_serving"])
        total[1] += entry["before_serving"]
        total[2] += entry["planned"]
        total[3] += 1  # replicas
    return ", ".join(
        f"{service} {compiled}/{before} graphs before serving ({planned} planned"
        + (f", {replicas} replicas)" if replicas > 1 else ")")
        for service, (compiled, before, planned, replicas) in totals.items())


def probe(app: str, store: Store | None = None) -> Probe:
    """Always ready (readiness comes from the other probes), with the progress as its detail
    while a replica warms up."""

    def read() -> Readiness:
        try:
            line = describe(app, store or ray_store())
        except Exception:  # noqa: BLE001: progress is informative only
            return READY
        return Readiness("ready", f"compiling: {line}") if line else READY

    return read


NOWHERE = Store(put=lambda key, value: None, delete=lambda key: None, list=lambda prefix: [],
                get=lambda key: None)


def for_this_replica(service: str) -> Publisher:
    """A publisher keyed by this replica's app and actor; outside Serve (a server class built
    directly, as a test does) one that publishes nowhere."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        app = serve.get_replica_context().app_name
    except RayServeException:
        return Publisher("", service, "", NOWHERE)
    return Publisher(app, service, ray.get_runtime_context().get_actor_id())
