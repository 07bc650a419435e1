"""Serve wiring of the decoder: a thin deployment class around `DecoderService`.

`serve.deployment` is applied by the app builder (`deploy/app.py`), which also
sets replicas, resources and autoscaling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from decoder_service.config import DecoderConfig
from decoder_service.service import DecoderService
from runtime.messages import GenerateChunk, GenerateRequest
from runtime.object_store import RayObjectStore


class DecoderDeployment:
    def __init__(self, config: DecoderConfig) -> None:
        self.service = DecoderService(config, RayObjectStore())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Streams chunks; call through `handle.options(stream=True)`. Cancelling the call
        aborts the sequence and frees its slot."""
        async for chunk in self.service.generate(request):
            yield chunk

    def info(self) -> dict:
        s = self.service
        return {"model_id": s.model_id, "hidden_size": s.hidden_size,
                "max_model_len": s.shapes.max_model_len, "tokens_per_image": s.shapes.tokens_per_image,
                "max_images": s.config.max_prefill_images}

    def stats(self) -> dict:
        return self.service.stats()

    def check_health(self) -> None:
        if not self.service.is_ready:
            raise RuntimeError("decoder warm-up has not finished")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.shutdown()
