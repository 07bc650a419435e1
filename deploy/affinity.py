"""Image-affinity request router for the encoder and decoder deployments (Serve's
request-router API: `request_router_config` on the deployment, set by `deploy/app.py`).

Every handle to a deployment routes through one instance of this class, in the
caller's process (a router replica), on the handle's event loop. For each call it
takes the call's image key, `route_key=` for `encode`, `GenerateRequest.route_key`
(the first image's key) for `generate`, and picks with `runtime.affinity.choose`
over the live replicas: the key's owner on a consistent-hash ring, unless the
owner's queue is longer than the least loaded replica's by more than
`imbalance_threshold` requests. Queue lengths are Serve's own cache of each
replica's ongoing requests (updated as calls are sent and finish, probed when
missing) plus the calls this router assigned that are not sent yet
(`runtime.affinity.InTransit`: without them a burst for one image all went to its
owner). A call without a key (text only, `info`, `stats`) goes to the least loaded.

The ring is rebuilt when Serve reports a new replica set: a replica that dies or is
added moves only its share of keys. Each routed call counts in the Prometheus
counter `splitserve_routed_calls{deployment, replica, route}` with route one of
"affinity", "fallback" or "load".
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from runtime.affinity import DEFAULT_VIRTUAL_NODES, InTransit, Ring, choose

ROUTER_CLASS = "deploy.affinity.ImageAffinityRouter"


def route_key(pending_request: PendingRequest | None) -> str | None:
    """The call's image key: `route_key=` (encode), or its first argument's `route_key`
    (a GenerateRequest); None for anything else."""
    if pending_request is None:
        return None
    key = (pending_request.kwargs or {}).get("route_key")
    if key is None and pending_request.args:
        key = getattr(pending_request.args[0], "route_key", None)
    return key if isinstance(key, str) else None


class ImageAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 4,
                         virtual_nodes: int = DEFAULT_VIRTUAL_NODES, **_: Any) -> None:
        from ray.util import metrics

        self._imbalance_threshold = imbalance_threshold
        self._virtual_nodes = virtual_nodes
        self._ring = Ring.of((), virtual_nodes)
        self._in_transit = InTransit()
        self._routed = metrics.Counter(
            "splitserve_routed_calls", description="Calls routed to a replica, by why it was chosen",
            tag_keys=("deployment", "replica", "route"))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._ring = Ring.of((r.replica_id.unique_id for r in replicas), self._virtual_nodes)
        self._in_transit.forget(r.replica_id.unique_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)  # before the controller says so: its keys move now
        self._ring = Ring.of((r.replica_id.unique_id for r in self._replicas_list), self._virtual_nodes)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks: the chosen replica, then the others least loaded first (tried in turn when
        the chosen one's queue is full)."""
        if not candidate_replicas:
            return []
        lens = await self._queue_lens(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ring = self._ring if set(self._ring.owners) == set(by_id) else Ring.of(by_id, self._virtual_nodes)
        chosen = choose(route_key(pending_request), lens, ring,
                        imbalance_threshold=self._imbalance_threshold).replica_id
        others = sorted((rid for rid in by_id if rid != chosen), key=lambda rid: lens[rid])
        if pending_request is not None:  # every replica is offered: wait before the next round
            pending_request.routing_context.should_backoff = True
        return [[by_id[chosen]], *([by_id[rid]] for rid in others)]

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Requests ongoing at each replica: Serve's cache, probing the replicas it lacks,
        plus the calls assigned to it and not yet sent. A replica that does not answer
        counts as full (it is tried last)."""
        lens: dict[str, int] = {}
        missing = []
        for r in replicas:
            # Without Serve's strict max_ongoing_requests the cache is not kept current on
            # each send: probe every replica then.
            cached = (self._replica_queue_len_cache.get(r.replica_id)
                      if self._use_replica_queue_len_cache else None)
            if cached is None:
                missing.append(r)
            else:
                lens[r.replica_id.unique_id] = cached
        for r, queue_len in (await self._probe_queue_lens(missing, 0) if missing else ()):
            lens[r.replica_id.unique_id] = r.max_ongoing_requests if queue_len is None else queue_len
        return {rid: n + self._in_transit.count(rid) for rid, n in lens.items()}

    def _fulfill_next_pending_request(self, replica: RunningReplica,
                                      request_metadata: Any = None) -> None:
        """Give `replica` to exactly the call it was chosen for.

        Serve's base router finds that call by `internal_request_id`, but calls made while
        a replica handles one request inherit that request's id (a chat's image encodes,
        its n choices), and its index keeps only the first of them: the others were never
        fulfilled and waited forever (9 of 12 requests of a start-up burst). The call is
        found by its metadata object instead, which each handle call has its own of.
        """
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                self._in_transit.assigned(replica.replica_id.unique_id)
                return

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve's cache counts it from now on
        self._in_transit.sent(replica_id.unique_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        key = route_key(pending_request)
        if key is None:
            route = "load"
        elif replica_id.unique_id in self._ring.owners and self._ring.owner(key) == replica_id.unique_id:
            route = "affinity"
        else:
            route = "fallback"
        self._routed.inc(tags={"deployment": replica_id.deployment_id.name,
                               "replica": replica_id.unique_id, "route": route})
