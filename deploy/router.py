"""Serve wiring of the router: the HTTP ingress (FastAPI through `serve.ingress`) and the
Python handle API, both over one `RouterService`.

The service is built as the replica starts, from what the encoder and decoder
deployments report (`info()`), after checking that they and the router derive the
same model geometry. A check that fails, or a service that cannot be built, is a
start-up failure: every endpoint, `/health` included, answers a JSON 503 of type
`startup_failed` naming the cause (the CLI exits on it), and the build is tried
again on the next request, in case the deployments were fixed. Handle API, from
another Serve app or a driver:

    handle = serve.get_app_handle("splitserve")
    reply = await handle.chat.remote({"messages": [...]})                    # a dict
    async for chunk in handle.options(stream=True).chat.remote({..., "stream": True}):
        ...                                                                  # chunk dicts

The handle clients turn Ray's transport failures (a replica that died or is
unreachable, a deployment with no replica, a full queue) into `ServiceUnavailable`,
which the service retries once where it can and otherwise answers with a 503. An
exception the encoder or decoder raised arrives wrapped in a `RayTaskError`; the
clients re-raise the original, so a `RequestError` stays a 400 and anything else
is a server fault (`http_api.error_for`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deploy.metrics import ROUTER_SERIES, LatencyMetrics, Series, StatsExporter
from router import http_api
from router.images import FetchPolicy
from router.schemas import ChatCompletionRequest
from router.service import RouterConfig, RouterService, ServiceUnavailable, StartupFailed
from runtime.messages import EmbeddingRef, GenerateChunk, GenerateRequest, ItemError
from runtime.no_torch import without_torch

HEALTH_TIMEOUT_S = 5.0

# What a router replica reports beyond ROUTER_SERIES: retries after faults, and a gauge that
# must return to 0 once traffic stops (nothing stranded after a fault).
RELIABILITY_SERIES = (
    Series("splitserve_router_encoder_retries", ("encoder_retries",), "counter",
           "Encoder calls retried after a replica failure or a retryable item error"),
    Series("splitserve_router_decoder_retries", ("decoder_retries",), "counter",
           "Decoder calls retried after a failure before the first token"),
    Series("splitserve_router_requests_generating", ("requests_generating",), "gauge",
           "Requests between their first decoder call and their last chunk"),
)

http_app = FastAPI(title="splitserve", description="OpenAI-compatible VLM serving, encoder and "
                   "decoder disaggregated")
http_app.router.redirect_slashes = False
http_app.add_middleware(http_api.BodySizeLimit)
http_api.install_error_handlers(http_app)


def unavailable(what: str, error: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(f"the {what} is unavailable ({type(error).__name__})")


# Ray's transport failures: the replica died or cannot be reached, the deployment has no
# replica, or its queue is full. An exception raised by the service itself is not one of these.
TRANSPORT_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, BackPressureError,
                    DeploymentUnavailableError, ReplicaUnavailableError)


def raised_by_service(error: RayTaskError) -> BaseException:
    """The exception the remote method raised, unwrapped from Ray's task error."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


class HandleEncoder:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def encode(self, images: list[bytes], request_id: str, *, refresh: bool = False,
                     route_key: str | None = None) -> list[EmbeddingRef | ItemError]:
        try:
            return await self.handle.encode.remote(images, request_id, refresh=refresh,
                                                   route_key=route_key)
        except TRANSPORT_ERRORS as error:
            raise unavailable("encoder replica", error) from error
        except RayTaskError as error:
            raise raised_by_service(error) from error


class HandleDecoder:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        stream = self.handle.generate.remote(request)
        try:
            async for chunk in stream:
                yield chunk
        except TRANSPORT_ERRORS as error:
            raise unavailable("decoder replica serving this request", error) from error
        except RayTaskError as error:
            raise raised_by_service(error) from error
        finally:
            stream.cancel()  # no-op once finished; otherwise the replica aborts the sequence


def preload_processor(model: str | None):
    """Imports transformers and reads the checkpoint's processor, so that building the service
    later need not: (model, processor), or None. Best effort: errors surface when the service
    is built."""
    if not model:
        return None
    try:
        from transformers import AutoProcessor

        return model, AutoProcessor.from_pretrained(model)
    except Exception as error:  # noqa: BLE001
        logging.getLogger(__name__).info("router: preloading the processor failed (%s); "
                                         "it is read again once the model is known", error)
        return None


def check_pairing(encoder: dict, decoder: dict, router: RouterService) -> None:
    """The encoder, the decoder and the router must agree on the model and its geometry."""
    for key in ("model_id", "hidden_size", "tokens_per_image"):
        if encoder[key] != decoder[key]:
            raise StartupFailed(f"encoder and decoder disagree on {key}: {encoder[key]!r} vs "
                                f"{decoder[key]!r}")
    # LLaVA-NeXT's router counts per image (None here) and checks each embedding's rows instead.
    if router.prompts.tokens_per_image not in (None, encoder["tokens_per_image"]):
        raise StartupFailed(f"the router expands each image to {router.prompts.tokens_per_image} "
                            f"tokens, the encoder makes {encoder['tokens_per_image']}")


@serve.ingress(http_app)
class RouterServer:
    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, settings: dict) -> None:
        self._encoder = encoder
        self._decoder = decoder
        self._settings = settings
        self._service: RouterService | None = None
        self._answered: set[str] = set()  # halves whose info() came back: warm
        self._failure: StartupFailed | None = None  # the last build's, until one succeeds
        self._lock = asyncio.Lock()
        self._latency = LatencyMetrics()
        http_app.state.max_request_bytes = settings.get("max_request_bytes",
                                                        http_api.DEFAULT_MAX_REQUEST_BYTES)
        self._metrics = StatsExporter(
            "router", lambda: self._service.counters if self._service else {},
            ROUTER_SERIES + RELIABILITY_SERIES)
        # Serve runs the constructor on the replica's event loop: start building the service
        # now, so the first request does not pay for loading the processor, and a failure
        # shows in the log as soon as it happens.
        # Loading transformers and the processor takes seconds of CPU (tens on a busy machine):
        # do it in a thread now, while the encoder and decoder compile, rather than after they
        # report ready; a failure here is only logged, `_build` meets it again and reports it.
        # The router never runs a model: its processor loads without torch (runtime/no_torch.py).
        without_torch()
        loop = asyncio.get_event_loop()
        self._preloading = loop.run_in_executor(None, preload_processor, settings.get("model"))
        self._warming = loop.create_task(self.service())
        self._warming.add_done_callback(self._log_startup_failure)

    def _log_startup_failure(self, task: asyncio.Task) -> None:
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            logging.getLogger(__name__).error("router: %s", failure)
        self._failure = failure if isinstance(failure, StartupFailed) else None

    async def service(self) -> RouterService:
        """The service, built once; StartupFailed says why it cannot be (retried on each call)."""
        async with self._lock:
            if self._service is None:
                self._service = await self._build()
        return self._service

    async def _build(self) -> RouterService:
        # Not ready yet (replicas still warming, or unreachable for now) is not a failure:
        # transport errors pass through as they are; anything else means the app cannot start.
        async def info(half: str, handle: DeploymentHandle) -> dict:
            answer = await handle.info.remote()  # a replica answers once it is warm
            self._answered.add(half)
            return answer

        try:
            encoder, decoder = await asyncio.gather(info("encoder", self._encoder),
                                                    info("decoder", self._decoder))
        except RayTaskError as error:
            cause = raised_by_service(error)
            raise StartupFailed(f"info() failed: {type(cause).__name__}: {cause}") from error
        s = self._settings
        preloaded = await self._preloading
        processor = preloaded[1] if preloaded and preloaded[0] == decoder["model_id"] else None
        try:
            config = RouterConfig(
                model_id=decoder["model_id"], served_model_name=s["served_model_name"],
                model_path=decoder["model_path"], preprocess_fingerprint=encoder["fingerprint"],
                max_model_len=decoder["max_model_len"], max_images_per_request=decoder["max_images"],
                fetch=FetchPolicy(**s.get("fetch", {})),
                known_refs_bytes=s.get("known_refs_bytes", RouterConfig.known_refs_bytes))
            # In a thread: reading the processor must not hold up /health or other requests.
            service = await asyncio.to_thread(RouterService, config, HandleEncoder(self._encoder),
                                              HandleDecoder(self._decoder), self._latency, processor)
        except Exception as error:  # noqa: BLE001: whatever it is, the router cannot serve
            raise StartupFailed(f"the router cannot start: {type(error).__name__}: {error}") from error
        try:
            check_pairing(encoder, decoder, service)
        except StartupFailed:
            await service.close()
            raise
        return service

    @http_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        try:
            service = await self.service()
        except Exception as exc:  # noqa: BLE001: the JSON error shape, whatever failed
            return http_api.error_for(exc)
        return await http_api.chat_completions(service, body)

    @http_app.get("/v1/models")
    async def models(self):
        try:
            return http_api.models(await self.service())
        except Exception as exc:  # noqa: BLE001
            return http_api.error_for(exc)

    @http_app.get("/health")
    async def health(self):
        """200 once the encoder and decoder replicas are warm (they answer only after warm-up);
        otherwise a JSON 503 saying why, at once: `startup_failed` when the app cannot start
        at all, `unavailable` naming the halves still warming up while it is starting."""
        if self._service is None:
            return self._starting()
        try:
            stats = await asyncio.wait_for(self.stats(), HEALTH_TIMEOUT_S)
        except StartupFailed as exc:
            return http_api.error_for(exc)
        except Exception as exc:  # noqa: BLE001: any other failure means not ready yet
            return http_api.error_response(503, f"not ready: {type(exc).__name__}: {exc}", "unavailable")
        # Ready once the covering graphs are in; the rest keep compiling in the background
        # (`compiles_stopped` says why they will not, when a replica stopped short of them).
        return {"status": "ok", **{half: {key: stats[half].get(key) for key in (
            "graphs_compiled", "graphs_planned", "compilations_after_warmup", "compiles_stopped")}
            for half in ("encoder", "decoder")}}

    def _starting(self):
        """/health before the service is built: the last build's failure, or who is not warm
        yet (a failed or finished build is started again, as any request would)."""
        if self._warming.done():
            self._warming = asyncio.get_running_loop().create_task(self.service())
            self._warming.add_done_callback(self._log_startup_failure)
        if self._failure is not None:
            return http_api.error_for(self._failure)
        waiting = [half for half in ("encoder", "decoder") if half not in self._answered]
        return http_api.error_response(
            503, f"warming up: {', '.join(waiting)}" if waiting else "warming up: the router",
            "unavailable")

    async def stats(self) -> dict:
        service = await self.service()
        encoder, decoder = await asyncio.gather(self._encoder.stats.remote(), self._decoder.stats.remote())
        return {"router": dict(service.counters), "encoder": encoder, "decoder": decoder}

    async def chat(self, body: dict | ChatCompletionRequest):
        """Handle API: a dict (or ChatCompletionRequest) in; a completion dict out, or, with
        `"stream": true` and `handle.options(stream=True)`, an async generator of chunk dicts."""
        if isinstance(body, dict):
            body = ChatCompletionRequest.model_validate(body)
        service = await self.service()
        if not body.stream:
            return (await service.complete(body)).model_dump(exclude_none=True)
        chunks = await service.stream(body)

        async def dicts():
            async for chunk in chunks:
                yield chunk.model_dump(exclude_none=True)
        return dicts()
