"""Prometheus metrics through Ray's metrics API (exported on each node's metrics port).

The services keep plain cumulative counters in their `stats()` dicts and know
nothing of Ray. A `StatsExporter` per replica polls that dict on a daemon thread
and mirrors it: counters advance by the delta since the last poll, gauges take
the value. Latency histograms (TTFT, inter-token) are observed by the router as
tokens arrive. All names start with `splitserve_` (Ray adds its `ray_` prefix).
Inside a Serve replica every series carries a `replica` tag (its unique id), so
per-replica cache hit rates and loads can be told apart; the request router's
`splitserve_routed_calls{route}` (deploy/affinity.py) counts affinity vs fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass(frozen=True)
class Series:
    name: str  # metric name
    path: tuple[str, ...]  # keys into the stats dict
    kind: str  # "counter" or "gauge"
    description: str


ENCODER_SERIES = (
    Series("splitserve_encoder_cache_hits", ("hits",), "counter", "Embedding cache hits"),
    Series("splitserve_encoder_cache_misses", ("misses",), "counter", "Embedding cache misses"),
    Series("splitserve_encoder_cache_evictions", ("evictions",), "counter", "Embeddings evicted"),
    Series("splitserve_encoder_cache_forgotten", ("forgotten",), "counter",
           "Entries dropped because their embedding was lost (re-encoded on request)"),
    Series("splitserve_encoder_cache_single_flight_joins", ("single_flight_joins",), "counter",
           "Requests that joined an in-flight encode of the same image"),
    Series("splitserve_encoder_cache_bytes", ("bytes",), "gauge", "Bytes held by the cache"),
    Series("splitserve_encoder_cache_entries", ("entries",), "gauge", "Embeddings held by the cache"),
    Series("splitserve_encoder_cache_hit_rate", ("cache_hit_rate",), "gauge",
           "Cache hits / lookups since the replica started"),
)
DECODER_SERIES = (
    Series("splitserve_decoder_running", ("running",), "gauge", "Sequences prefilling or decoding"),
    Series("splitserve_decoder_waiting", ("waiting",), "gauge", "Sequences waiting for KV blocks"),
    Series("splitserve_decoder_kv_blocks_used", ("kv_blocks_used",), "gauge",
           "KV pool blocks held by running sequences"),
    Series("splitserve_decoder_kv_blocks_total", ("kv_blocks_total",), "gauge", "KV pool blocks"),
    Series("splitserve_decoder_kv_blocks_cached", ("kv_blocks_cached",), "gauge",
           "KV blocks named in the prefix cache (held or evictable)"),
    Series("splitserve_decoder_prefix_cache_queried_tokens", ("prefix_cache_queried_tokens",),
           "counter", "Prompt tokens looked up in the prefix cache"),
    Series("splitserve_decoder_prefix_cache_hit_tokens", ("prefix_cache_hit_tokens",), "counter",
           "Prompt tokens found in the prefix cache (not computed again)"),
    Series("splitserve_decoder_prefix_cache_hit_rate", ("prefix_cache_hit_rate",), "gauge",
           "Prefix cache hit tokens / queried tokens since the replica started"),
    Series("splitserve_decoder_preemptions", ("preemptions",), "counter",
           "Sequences preempted for KV blocks (recomputed later)"),
    Series("splitserve_decoder_contended_graph_calls", ("contended_graph_calls",), "counter",
           "Graph calls that ran slower than their best by contended_slowdown (cores shared)"),
    Series("splitserve_decoder_step_errors", ("step_errors",), "counter",
           "Requests failed by a fault inside the engine (the engine kept serving)"),
    Series("splitserve_decoder_prompt_tokens", ("prompt_tokens",), "counter",
           "Tokens prefilled (prompts, and sequences recomputed after preemption)"),
    Series("splitserve_decoder_generated_tokens", ("generated_tokens",), "counter", "Tokens generated"),
)
ROUTER_SERIES = (
    Series("splitserve_router_image_hits", ("router_image_hits",), "counter",
           "Images whose embedding reference the router reused (no encoder call)"),
    Series("splitserve_router_images_encoded", ("images_encoded",), "counter",
           "Images the router sent to the encoder"),
    Series("splitserve_router_reencoded_lost", ("reencoded_lost",), "counter",
           "Requests whose lost embeddings were encoded again"),
    Series("splitserve_router_known_refs_bytes", ("known_refs_bytes",), "gauge",
           "Bytes of embeddings kept alive by the router's remembered references"),
)
BUCKET_SERIES = (  # per encoder item-batch bucket, from stats["buckets"][bucket]
    Series("splitserve_encoder_batches", ("batches",), "counter", "Encoder batches run"),
    Series("splitserve_encoder_batch_items", ("items",), "counter", "Real items in encoder batches"),
    Series("splitserve_encoder_padding_rows", ("padding_rows",), "counter", "Padded rows run"),
)
COMPILATIONS = Series("splitserve_compilations_after_warmup", ("compilations_after_warmup",), "gauge",
                      "XLA compilations after warm-up (should stay 0)")
GRAPHS = (  # a replica serves once its covering graphs are in; the rest compile in the background
    Series("splitserve_graphs_compiled", ("graphs_compiled",), "gauge", "XLA graphs compiled so far"),
    Series("splitserve_graphs_planned", ("graphs_planned",), "gauge", "XLA graphs the replica will compile"),
)


def hit_rate(hits: int, lookups: int) -> float:
    return hits / lookups if lookups else 0.0


def replica_tag() -> dict[str, str]:
    """{"replica": unique id} inside a Serve replica; {} anywhere else."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return {"replica": serve.get_replica_context().replica_id.unique_id}
    except RayServeException:
        return {}


def _lookup(stats: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(stats, dict) or key not in stats:
            return None
        stats = stats[key]
    return stats


class StatsExporter:
    """Mirrors `read_stats()` into Ray metrics every `interval_s` seconds, on a daemon thread."""

    def __init__(self, deployment: str, read_stats: Callable[[], dict], series: tuple[Series, ...],
                 *, buckets: bool = False, interval_s: float = 2.0) -> None:
        from ray.util import metrics

        self._read = read_stats
        self._series = series + (COMPILATIONS, *GRAPHS)
        self._buckets = buckets
        self._interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._metrics = {}
        default_tags = {"deployment": deployment, **replica_tag()}
        for s in self._series + (BUCKET_SERIES if buckets else ()):
            kind = metrics.Counter if s.kind == "counter" else metrics.Gauge
            tags = tuple(default_tags) + (("bucket",) if s in BUCKET_SERIES else ())
            self._metrics[s.name] = kind(s.name, description=s.description, tag_keys=tags)
            self._metrics[s.name].set_default_tags(default_tags)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{deployment}-metrics", daemon=True)
        self._thread.start()

    def _record(self, series: Series, value, tags: dict | None = None) -> None:
        if value is None:
            return
        metric = self._metrics[series.name]
        if series.kind == "gauge":
            metric.set(float(value), tags=tags)
            return
        key = (series.name, str(tags))
        delta = float(value) - self._last.get(key, 0.0)
        if delta > 0:
            metric.inc(delta, tags=tags)
        self._last[key] = float(value)

    def export_once(self) -> None:
        stats = self._read()
        for s in self._series:
            self._record(s, _lookup(stats, s.path))
        if self._buckets:
            for bucket, values in (stats.get("buckets") or {}).items():
                for s in BUCKET_SERIES:
                    self._record(s, values.get(s.path[0]), {"bucket": str(bucket)})

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.export_once()
            except Exception:  # noqa: BLE001: metrics must never take a replica down
                log.exception("metrics export failed")

    def stop(self) -> None:
        self._stop.set()


class LatencyMetrics:
    """The router's view of latency: time to first token and between tokens, per request."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._ttft = metrics.Histogram("splitserve_time_to_first_token_seconds",
                                       description="Request arrival to first generated token",
                                       boundaries=LATENCY_BOUNDARIES_S)
        self._itl = metrics.Histogram("splitserve_inter_token_latency_seconds",
                                      description="Time between streamed tokens of a request",
                                      boundaries=LATENCY_BOUNDARIES_S)
        self._requests = metrics.Counter("splitserve_requests", description="Chat requests finished",
                                         tag_keys=("outcome",))

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, outcome: str) -> None:
        self._requests.inc(tags={"outcome": outcome})
