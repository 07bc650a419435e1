"""The router as a plain class: one chat request in, OpenAI responses out.

Per request: render and tokenize the prompt; load each image's bytes; key them
(`runtime.image_key`, the encoder's own key); images the router has seen recently
reuse their embedding reference and skip the encoder; the rest go to the encoder,
one call per image carrying its key as `route_key`, so a request's images split
across the encoder replicas that own them (`deploy/affinity.py`; the encoder's
batcher gathers concurrent calls into one device batch again); then token ids plus
references go to a decoder replica, whose chunks stream back. With `n` > 1 each
choice is its own decoder sequence (`router.choices`).

The references the router remembers keep their objects alive in Ray's object store
after the encoder evicted them, so they count in bytes against `known_refs_bytes`
(least recently used dropped first), one of the budgets in docs/deploy.md.

Faults, each retried where nothing has reached the client yet: an encoder call
whose replica died (`ServiceUnavailable` from the client) or that reports a
retryable item error is sent again; a decoder call that fails before its first
chunk, because its replica died or an embedding vanished from the object store
(`EmbeddingLostError`: its owner died or the object was lost; the request's images
are encoded again first, the encoder told to drop its cached entries), is sent
again. A second failure ends the request with `ServiceUnavailable` (a 503); so does
one after the first chunk of a stream, while a non-streaming completion, whose client
has seen nothing, runs its whole generation once more.

Runs on the caller's asyncio loop; rendering and tokenizing run on one worker
thread (a long prompt must not stall other requests; the tokenizer is not shared
across threads); base64 decoding and hashing of images run on the loop's default
thread pool (a 20 MiB image must not stall them either). The encoder and decoder are
reached through the small client protocols below, so the same class serves behind
Ray Serve handles (`deploy/`) or in one process (tests, colocated layout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import httpx

from router.choices import choice_seed, merge_choices
from router.images import FetchPolicy, ImageInputError, image_size, load_image
from router.known_refs import KnownRefs
from router.prompt import PromptBuilder
from router.responses import ResponseBuilder
from router.schemas import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, completion_id, now
from runtime.checkpoint import is_anyres, open_config
from runtime.geometry import geometry_of
from runtime.image_key import image_cache_key
from runtime.messages import (
    EmbeddingLostError,
    EmbeddingMismatchError,
    EmbeddingRef,
    GenerateChunk,
    GenerateRequest,
    ItemError,
    RequestError,
    ResponseFormat,
    SamplingParams,
)

log = logging.getLogger(__name__)


class EncoderClient(Protocol):
    async def encode(self, images: list[bytes], request_id: str, *, refresh: bool = False,
                     route_key: str | None = None) -> list[EmbeddingRef | ItemError]:
        """`route_key`: the images' key, for the encoder's request router (ignored elsewhere)."""


class DecoderClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...


class LatencyObserver(Protocol):
    """Told about each request's latencies (the deployment exports them as metrics)."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, outcome: str) -> None: ...


class _Unobserved:
    def first_token(self, seconds: float) -> None:
        pass

    def next_token(self, seconds: float) -> None:
        pass

    def finished(self, outcome: str) -> None:
        pass


class ModelNotFound(LookupError):
    pass


class ServiceUnavailable(RuntimeError):
    """The encoder or the decoder cannot serve this request now (its replica died, it is
    overloaded or shutting down); a client may retry. Clients raise it for transport failures."""


class StartupFailed(RuntimeError):
    """The app cannot serve at all: a deployment failed or the deployments disagree (a 503
    whose message says why, on every endpoint and on `/health`, until the deploy is fixed)."""


# Characters of text per token of context beyond which a prompt is refused before tokenizing:
# far above any real text (English runs at about 4), so only prompts that could never fit.
MAX_PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class _Prepared:
    request: GenerateRequest  # choice 0's; `choice(i)` gives the others
    n: int
    blobs: list[bytes]  # the images' original bytes, kept to encode again if needed
    fields: list[str]
    image_tokens: list[int]  # placeholders per image: what each embedding must have
    arrived: float  # time.monotonic() when the request arrived

    def choice(self, index: int) -> _Prepared:
        request = self.request
        if index:
            request = dataclasses.replace(
                request, request_id=f"{request.request_id}-{index}",
                sampling=dataclasses.replace(request.sampling,
                                             seed=choice_seed(request.sampling.seed, index)))
        return dataclasses.replace(self, request=request)


@dataclass(frozen=True)
class RouterConfig:
    model_id: str  # the checkpoint as the services know it
    served_model_name: str  # what clients put in "model"
    model_path: str  # where the processor (template, tokenizer) is read from
    preprocess_fingerprint: str  # the encoder's, so image keys match its cache
    max_model_len: int
    max_images_per_request: int = 4
    fetch: FetchPolicy = FetchPolicy()
    known_refs_bytes: int = 64 << 20  # bytes of embeddings the router's references keep alive
    max_choices: int = 8  # the largest `n` a request may ask for


class RouterService:
    def __init__(self, config: RouterConfig, encoder: EncoderClient, decoder: DecoderClient,
                 observer: LatencyObserver | None = None, processor=None) -> None:
        """`processor`: the checkpoint's, if already read from `config.model_path`."""
        from transformers import AutoProcessor

        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.observer = observer or _Unobserved()
        model_config = open_config(config.model_path)
        self.geometry = geometry_of(model_config)
        # LLaVA-NeXT: the processor counts each image's tokens from its size.
        self.prompts = PromptBuilder(processor or AutoProcessor.from_pretrained(config.model_path),
                                     None if is_anyres(model_config) else self.geometry.tokens_per_image)
        self.responses = ResponseBuilder(self.prompts.tokenizer, config.served_model_name)
        self._known = KnownRefs(config.known_refs_bytes)
        self._http = httpx.AsyncClient()
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="router-prompt")
        self.counters = {"router_image_hits": 0, "encoder_calls": 0, "images_encoded": 0,
                         "reencoded_lost": 0, "encoder_retries": 0, "decoder_retries": 0,
                         "requests_generating": 0, "known_refs_bytes": 0}

    # --- public ------------------------------------------------------------------------
    async def complete(self, body: ChatCompletionRequest, request_id: str | None = None) -> ChatCompletion:
        request_id = request_id or completion_id()
        prepared = await self._prepare(body, request_id)
        choices: list[list[GenerateChunk]] = [[] for _ in range(prepared.n)]
        try:
            await self._collect(prepared, choices)
        except ServiceUnavailable as error:
            if not any(choices):  # _generate has retried a failure before the first chunk already
                raise
            # A decoder that died mid-generation: nothing has reached this client yet, so the
            # whole generation runs again, once (greedy or seeded: the same text).
            self._count_retry("decoder", request_id, error)
            choices = [[] for _ in range(prepared.n)]
            await self._collect(prepared, choices)
        return self.responses.completion(request_id, choices, body.logprobs)

    async def _collect(self, prepared: _Prepared, choices: list[list[GenerateChunk]]) -> None:
        async with aclosing(self._choices(prepared)) as merged:
            async for index, chunk in merged:
                choices[index].append(chunk)

    async def stream(self, body: ChatCompletionRequest,
                     request_id: str | None = None) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks in OpenAI order. Validation happens before the first one is yielded."""
        request_id = request_id or completion_id()
        prepared = await self._prepare(body, request_id)
        return self._stream(body, prepared)

    async def _stream(self, body: ChatCompletionRequest, prepared: _Prepared):
        request_id = prepared.request.request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = now()
        yield self.responses.first_chunk(request_id, created, prepared.n)
        lasts: dict[int, GenerateChunk] = {}
        async with aclosing(self._choices(prepared)) as merged:  # a client gone stops every choice
            async for index, chunk in merged:
                lasts[index] = chunk
                if chunk.text or chunk.finish_reason or chunk.logprobs:
                    yield self.responses.delta_chunk(request_id, created, index, chunk, body.logprobs)
        if include_usage and len(lasts) == prepared.n:
            yield self.responses.usage_chunk(request_id, created, [lasts[i] for i in range(prepared.n)])

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.config.served_model_name, self.config.model_id):
            raise ModelNotFound(f"model: {name!r} is not served here; this server serves "
                                f"{self.config.served_model_name!r}")

    # --- steps -------------------------------------------------------------------------
    def check_prompt_size(self, body: ChatCompletionRequest) -> None:
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if p.type == "text")
                    for m in body.messages if m.content)
        limit = self.config.max_model_len * MAX_PROMPT_CHARS_PER_TOKEN
        if chars > limit:
            raise RequestError(f"messages: {chars} characters of text cannot fit a context of "
                             f"{self.config.max_model_len} tokens (at most {limit} characters)")

    async def _prepare(self, body: ChatCompletionRequest, request_id: str) -> _Prepared:
        arrived = time.monotonic()
        self.check_model(body.model)
        refused = body.refused_fields()
        if refused:
            raise RequestError(f"{refused[0]}: not supported by this server (fields refused: "
                               f"{', '.join(refused)})")
        if body.n > self.config.max_choices:
            raise RequestError(f"n: at most {self.config.max_choices} choices, got {body.n}")
        self.check_prompt_size(body)
        loop = asyncio.get_running_loop()
        rendered = await loop.run_in_executor(self._tokenizing, self.prompts.render, body.messages)
        if len(rendered.images) > self.config.max_images_per_request:
            raise RequestError(f"messages: at most {self.config.max_images_per_request} images per "
                             f"request, got {len(rendered.images)}")
        blobs = None
        if self.prompts.tokens_per_image is None:  # the counts depend on the sizes: fetch first
            blobs = await self._load_images(rendered.images)
            image_tokens = await loop.run_in_executor(self._tokenizing, self._image_tokens, blobs,
                                                      [s.field for s in rendered.images])
        else:
            image_tokens = [self.prompts.tokens_per_image] * len(rendered.images)
        prompt = await loop.run_in_executor(self._tokenizing, self.prompts.tokenize, rendered,
                                            image_tokens)
        room = self.config.max_model_len - len(prompt.token_ids)
        if room < 1:
            raise RequestError(f"messages: the prompt has {len(prompt.token_ids)} tokens, the context "
                             f"holds {self.config.max_model_len}")
        max_tokens = body.max_completion_tokens or body.max_tokens or room
        if max_tokens > room:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise RequestError(f"{field}: {max_tokens} tokens do not fit: the prompt has "
                             f"{len(prompt.token_ids)} tokens and the context holds "
                             f"{self.config.max_model_len}")
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
            seed=body.seed, stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos,
            logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0, min_tokens=body.min_tokens or 0,
            logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
            response_format=self._response_format(body))
        if blobs is None:
            blobs = await self._load_images(prompt.images)
        fields = [s.field for s in prompt.images]
        refs = await self._embed(blobs, fields, request_id, image_tokens)
        request = GenerateRequest(request_id, tuple(prompt.token_ids), tuple(refs), sampling)
        log.info("request %s: %d prompt tokens, %d image(s), max_tokens %d", request_id,
                 len(prompt.token_ids), len(refs), max_tokens)
        return _Prepared(request, body.n, blobs, fields, image_tokens, arrived)

    async def _load_images(self, slots) -> list[bytes]:
        return list(await asyncio.gather(*(load_image(s.url, s.field, self.config.fetch, self._http)
                                           for s in slots)))

    def _image_tokens(self, blobs: list[bytes], fields: list[str]) -> list[int]:
        return [self.prompts.image_tokens(image_size(b, f)) for b, f in zip(blobs, fields)]

    @staticmethod
    def _response_format(body: ChatCompletionRequest) -> ResponseFormat | None:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        return ResponseFormat(fmt.type, fmt.schema_text() if fmt.type == "json_schema" else "")

    def _keys(self, blobs: list[bytes]) -> list[str]:
        return [image_cache_key(b, self.config.model_id, self.config.preprocess_fingerprint) for b in blobs]

    async def _embed(self, blobs: list[bytes], fields: list[str], request_id: str,
                     image_tokens: list[int], *, refresh: bool = False) -> list[EmbeddingRef]:
        """EmbeddingRefs for `blobs`: known ones reused, the rest from one encoder call per
        image (each routed by its key). Each must have the rows its placeholders need
        (`image_tokens`), else the encoder and the processor disagree: a server fault.
        `refresh`: the request's embeddings were lost; forget them here and in the encoder."""
        keys = await asyncio.to_thread(self._keys, blobs)  # hashing MiBs: off the event loop
        if refresh:
            for key in keys:
                self._known.forget(key)
            self.counters["known_refs_bytes"] = self._known.bytes
        known = {k: ref for k in keys if (ref := self._known.get(k)) is not None}
        self.counters["router_image_hits"] += sum(k in known for k in keys)
        missing = list(dict.fromkeys(k for k in keys if k not in known))  # unique, in order
        first_index = {k: keys.index(k) for k in missing}
        retried = False  # one retry per request, for failed calls or for retryable item errors
        while missing:
            outcomes = await asyncio.gather(
                *(self._encode(blobs[first_index[k]], k, request_id, refresh=refresh) for k in missing),
                return_exceptions=True)
            retry, failures = [], []
            for key, result in zip(missing, outcomes):
                field = fields[first_index[key]]
                if isinstance(result, ServiceUnavailable) and not retried:
                    retry.append(key)
                    failures.append(result)
                    continue
                if isinstance(result, BaseException):
                    raise result
                if isinstance(result, ItemError) and not result.retryable:
                    raise ImageInputError(field, result.message)
                if isinstance(result, ItemError) and retried:
                    raise ServiceUnavailable(f"{field}: the encoder failed twice: {result.message}")
                if isinstance(result, ItemError):
                    retry.append(key)
                    failures.append(result.message)
                    continue
                known[key] = result
                self._remember(key, result)
            if retry:
                retried = self._count_retry("encoder", request_id, failures[0])
            missing = retry
        refs = [known[k] for k in keys]
        for ref, want, field in zip(refs, image_tokens, fields):
            if ref.meta.num_tokens != want:
                raise EmbeddingMismatchError(
                    f"{field}: the encoder made {ref.meta.num_tokens} embedding rows, the "
                    f"checkpoint's processor expands the image to {want} tokens")
        return refs  # type: ignore[return-value]

    async def _encode(self, blob: bytes, key: str, request_id: str, *,
                      refresh: bool = False) -> EmbeddingRef | ItemError:
        self.counters["encoder_calls"] += 1
        self.counters["images_encoded"] += 1
        [result] = await self.encoder.encode([blob], request_id, refresh=refresh, route_key=key)
        return result

    def _count_retry(self, service: str, request_id: str, why) -> bool:
        log.warning("request %s: the %s failed (%s); trying again", request_id, service, why)
        self.counters[f"{service}_retries"] += 1
        return True

    def _remember(self, key: str, ref: EmbeddingRef) -> None:
        self._known.remember(key, ref)
        self.counters["known_refs_bytes"] = self._known.bytes

    def _choices(self, prepared: _Prepared) -> AsyncIterator[tuple[int, GenerateChunk]]:
        return merge_choices(prepared.n, lambda index: self._generate(prepared.choice(index)))

    async def _generate(self, prepared: _Prepared) -> AsyncIterator[GenerateChunk]:
        """Decoder chunks. A failure before the first chunk is retried, once per cause: an
        embedding lost with its owner is encoded again, a decoder replica that died is
        replaced (both happen to one request when an encoder and a decoder die together)."""
        request, outcome = prepared.request, "cancelled"
        reencoded = rerouted = False
        self.counters["requests_generating"] += 1
        try:
            while True:
                stream = self.decoder.generate(request)
                try:
                    first = await anext(stream)
                except EmbeddingLostError:
                    if reencoded or not prepared.blobs:
                        raise
                    reencoded = True
                    log.warning("request %s: an image embedding was lost; encoding again",
                                request.request_id)
                    self.counters["reencoded_lost"] += 1
                    refs = await self._embed(prepared.blobs, prepared.fields, request.request_id,
                                             prepared.image_tokens, refresh=True)
                    request = dataclasses.replace(request, images=tuple(refs))
                    continue
                except ServiceUnavailable as error:
                    if rerouted:
                        raise
                    rerouted = True
                    self._count_retry("decoder", request.request_id, error)
                    continue
                last = time.monotonic()
                self.observer.first_token(last - prepared.arrived)
                try:
                    yield first
                    async for chunk in stream:
                        now = time.monotonic()
                        self.observer.next_token(now - last)
                        last = now
                        yield chunk
                finally:
                    await stream.aclose()  # a client that left cancels its decode now
                outcome = "ok"
                return
        except Exception:
            outcome = "error"
            raise
        finally:
            self.counters["requests_generating"] -= 1
            self.observer.finished(outcome)

    async def close(self) -> None:
        await self._http.aclose()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
