"""The encoder's Ray Serve deployment: a thin shell around `EncoderService`.

The replica loads and compiles every bucket in its constructor, so Serve routes to
it only once it is warm; `check_health` then fails if the service stops (its batcher
thread died or it was closed), and Serve replaces the replica. Embeddings go to
Ray's object store, owned by this replica; callers get `EmbeddingRef`s.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from ray import serve

from deploy.autoscaling import IMAGES_IN_FLIGHT
from encoder_service.config import EncoderConfig
from deploy.metrics import ENCODER_SERIES, Series, StatsExporter, hit_rate
from runtime.messages import EmbeddingRef, ItemError
from deploy.warmup_progress import for_this_replica
from runtime.cpu_priority import policy_for_all_threads, restore_compute_policy
from runtime.lean_imports import defer_unused_imports
from runtime.compile_cache import enable_persistent_cache, record_smoke_check_in_background
from runtime.object_store import RayObjectStore


# Images inside `encode` calls on this replica: back to 0 once traffic stops, faults included.
IN_FLIGHT_SERIES = Series("splitserve_encoder_images_in_flight", ("images_in_flight",), "gauge",
                          "Images in encode calls on this replica")


class EncoderServer:
    def __init__(self, config: EncoderConfig | dict, compile_cache: str | None = None) -> None:
        restore_compute_policy()  # before it starts threads of its own (runtime/cpu_priority.py)
        if isinstance(config, dict):
            config = EncoderConfig(**config)
        defer_unused_imports()  # before torch_xla and transformers (runtime/lean_imports.py)
        cache = enable_persistent_cache(compile_cache, "encoder", device_kind=config.device,
                                        defer_check=True)  # first: before anything compiles
        from encoder_service.service import EncoderService  # torch: in the replica, not the driver

        progress = for_this_replica("encoder")  # for `splitserve serve` to show while it compiles
        try:
            self.service = EncoderService(config, RayObjectStore(), warmup_progress=progress)
        finally:
            progress.done()
        if cache.check_pending:
            record_smoke_check_in_background(compile_cache)
        self._images_in_flight = 0
        self._metrics = StatsExporter("encoder", self.stats, ENCODER_SERIES + (IN_FLIGHT_SERIES,),
                                      buckets=True)
        if config.cpu_priority == "idle":  # once warm: compiling at idle priority delays readiness
            threads = policy_for_all_threads("idle")
            logging.getLogger(__name__).info("encoder: %d threads under SCHED_IDLE", threads)

    async def encode(self, images: list[bytes], request_id: str | None = None, *,
                     refresh: bool = False, route_key: str | None = None) -> list[EmbeddingRef | ItemError]:
        """`route_key` was read by the request router (deploy/affinity.py); the replica ignores it."""
        self._images_in_flight += len(images)
        try:
            return await self.service.encode(images, request_id, refresh=refresh)
        finally:
            self._images_in_flight -= len(images)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (deploy/autoscaling.py): the encoder scales on images."""
        return {IMAGES_IN_FLIGHT: self._images_in_flight}

    def info(self) -> dict:
        """What a router checks against its decoder at build time."""
        return {"model_id": self.service.model_id, "hidden_size": self.service.hidden_size,
                "tokens_per_image": self.service.tokens_per_image,
                "fingerprint": self.service.fingerprint,
                "config": {k: v for k, v in asdict(self.service.config).items() if k != "buckets"}}

    def stats(self) -> dict:
        stats = self.service.stats()
        return {**stats, "images_in_flight": self._images_in_flight,
                "cache_hit_rate": hit_rate(stats["hits"], stats["hits"] + stats["misses"])}

    def check_health(self) -> None:
        if not self.service.is_ready:
            raise RuntimeError("encoder service is not running (closed or its batcher thread died)")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


# Many requests in flight per replica: that is what lets the batcher gather across them.
# An encode call takes well under a second: a retiring replica needs little time to drain.
EncoderDeployment = serve.deployment(name="encoder", max_ongoing_requests=64,
                                     graceful_shutdown_timeout_s=60.0,
                                     graceful_shutdown_wait_loop_s=1.0)(EncoderServer)


def build_encoder_app(args: dict) -> serve.Application:
    """Serve config `import_path: deploy.encoder:build_encoder_app`; `args` are EncoderConfig fields."""
    return EncoderDeployment.bind(EncoderConfig(**args))
