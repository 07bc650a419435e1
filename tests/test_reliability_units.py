"""Reliability pieces that need no Ray: address checks and fetch limits against a local host,
accepted image formats, the router's retries with scripted fake services, and the HTTP layer's
limits and error bodies. tests/test_reliability_serve.py runs the same paths through real Serve."""

import asyncio
import io
import json
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from encoder_service.preprocess import ImageRejected, Preprocessor, load_image_processor
from router import http_api, images
from router.images import FetchPolicy, ImageInputError, address_is_public, fetch_url
from router.schemas import ChatCompletionRequest
from router.service import RouterConfig, RouterService, ServiceUnavailable
from runtime.messages import EmbeddingLostError, EmbeddingMeta, EmbeddingRef, GenerateChunk, ItemError
from tests.hostile.corpus import animated_gif, animated_png, good_png, png_bomb
from tests.hostile.servers import ImageHost

# --- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "::", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254",  # the cloud metadata address (link-local)
    "100.64.0.1",  # carrier-grade NAT, not private in Python's sense but not global either
    "fd00::1", "fe80::1%eth0", "224.0.0.1", "ff02::1", "240.0.0.1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1 (obfuscated)
])
def test_non_public_addresses_are_refused(address):
    assert not address_is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert address_is_public(address)


def test_allowlist_entries_name_a_host_or_a_host_and_port():
    policy = FetchPolicy(allowed_hosts=frozenset({"images.internal", "127.0.0.1:8080"}))
    assert policy.allows("images.internal", 443) and policy.allows("127.0.0.1", 8080)
    assert not policy.allows("127.0.0.1", 8081) and not policy.allows("localhost", 8080)


# --- fetching (a local host; nothing leaves the machine) ---------------------------------------

@pytest.fixture(scope="module")
def host():
    with ImageHost(good_png(), stall_s=6.0) as image_host:
        yield image_host


def _fetch(url: str, host: ImageHost, **policy) -> bytes:
    policy = FetchPolicy(allowed_hosts=frozenset({f"127.0.0.1:{host.port}"}), timeout_s=1.5, **policy)

    async def run():
        async with httpx.AsyncClient() as client:
            return await fetch_url(url, "image", policy, client)

    return asyncio.run(run())


def test_an_allowlisted_host_is_fetched(host):
    assert _fetch(host.url("/ok.png"), host) == good_png()


def test_a_redirect_leaving_the_allowlist_is_checked_again(host):
    with pytest.raises(ImageInputError, match="'localhost' resolves to a private, loopback"):
        _fetch(host.url("/redirect?to=" + host.url("/ok.png", "localhost")), host)


def test_the_timeout_bounds_the_whole_fetch_not_each_read(host):
    started = time.monotonic()  # /slow.png sends a byte every 0.5 s: no single read times out
    with pytest.raises(ImageInputError, match="took longer than 1.5 s"):
        _fetch(host.url("/slow.png"), host)
    assert time.monotonic() - started < 3.0


def test_the_byte_cap_holds_while_streaming(host):
    with pytest.raises(ImageInputError, match="larger than 100000 bytes"):
        _fetch(host.url("/huge.png"), host, max_image_bytes=100_000)


def test_the_connection_goes_to_the_address_that_was_checked(host, monkeypatch):
    """DNS rebinding: after the check, the client connects to the checked IP, not to the name
    (which a second DNS answer could point elsewhere), and sends the name in the Host header."""
    checked = []
    monkeypatch.setattr(images, "address_is_public", lambda a: checked.append(a) or True)
    url = host.url("/ok.png", "localhost")  # not allowlisted: it goes through the check
    assert _fetch(url, host) == good_png()
    assert checked and host.hosts_seen[-1] == f"localhost:{host.port}"


# --- image formats -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocessor(tiny_checkpoint):
    return Preprocessor(load_image_processor(tiny_checkpoint), 64, max_image_bytes=20 * 2**20,
                        max_image_pixels=40_000_000)


def _save(image, fmt, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _frames():
    return [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]


ACCEPTED = [
    ("png", _save(_frames()[0], "PNG")), ("jpeg", _save(_frames()[0], "JPEG")),
    ("webp", _save(_frames()[0], "WEBP")), ("single-frame gif", _save(_frames()[0], "GIF")),
    ("palette png with transparency", _save(Image.new("P", (40, 30)), "PNG", transparency=0)),
]


@pytest.mark.parametrize("name, data", ACCEPTED, ids=[name for name, _ in ACCEPTED])
def test_accepted_formats_are_encoded(preprocessor, name, data):
    assert preprocessor(data).shape == (3, 64, 64)


REFUSED = [
    ("svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG is a vector"),
    ("svg without prolog", b"  <svg width='9' height='9'></svg>", "SVG is a vector"),
    ("animated gif", animated_gif(), "animated GIF"),
    ("animated png", animated_png(), "animated PNG"),
    ("animated webp", _save(_frames()[0], "WEBP", save_all=True, append_images=_frames()[1:]),
     "animated WEBP"),
    ("bmp", _save(_frames()[0], "BMP"), "accepted \\(PNG, JPEG, WebP, single-frame GIF\\)"),
    ("tiff", _save(_frames()[0], "TIFF"), "accepted"),
    ("png bomb", png_bomb(), "decompression bomb"),
    ("a sliver", _save(Image.new("RGB", (5000, 3)), "PNG"), "aspect ratio over 200:1"),
]


@pytest.mark.parametrize("name, data, reason", REFUSED, ids=[name for name, *_ in REFUSED])
def test_other_inputs_are_refused_with_the_reason(preprocessor, name, data, reason):
    with pytest.raises(ImageRejected, match=reason):
        preprocessor(data)


# --- the router's retries, with scripted services ---------------------------------------------

def _ref(n: int) -> EmbeddingRef:
    return EmbeddingRef(EmbeddingMeta(f"h{n}", 16, 64, "float32", "m"), object_ref=n)


class ScriptedEncoder:
    """Each call takes the next step: "ok", "died" (the replica died) or "flaky" (a retryable
    item error) or "bad" (a final one)."""

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.calls = 0
        self.refreshes = []

    async def encode(self, blobs, request_id, *, refresh=False, route_key=None):
        self.calls += 1
        self.refreshes.append(refresh)
        step = self.steps.pop(0)
        if step == "died":
            raise ServiceUnavailable("the encoder replica is unavailable (ActorDiedError)")
        if step in ("flaky", "bad"):
            return [ItemError(i, f"image {i}: {step}", retryable=step == "flaky") for i in range(len(blobs))]
        return [_ref(self.calls * 100 + i) for i in range(len(blobs))]


class ScriptedDecoder:
    """Each call takes the next step: "ok" (3 chunks), "died" (fails before its first chunk),
    "dies-mid-stream" (one chunk, then fails) or "lost" (an embedding's owner died)."""

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.requests = []

    async def generate(self, request):
        self.requests.append(request)
        step = self.steps.pop(0)
        if step == "died":
            raise ServiceUnavailable("the decoder replica serving this request is unavailable")
        if step == "lost":
            raise EmbeddingLostError("owner died")
        for n in range(3):
            if step == "dies-mid-stream" and n == 1:
                raise ServiceUnavailable("the decoder replica serving this request is unavailable")
            yield GenerateChunk(request.request_id, f"t{n} ", (n,), None, "length" if n == 2 else None,
                                len(request.prompt_token_ids), n + 1)


def _service(tiny_checkpoint, encoder, decoder) -> RouterService:
    config = RouterConfig(model_id="m", served_model_name="tiny", model_path=str(tiny_checkpoint),
                          preprocess_fingerprint="fp", max_model_len=256)
    return RouterService(config, encoder, decoder)


def _body(images: int = 1, **fields) -> ChatCompletionRequest:
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}AAA"}} for i in range(images)]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "hi"}]}],
         "max_tokens": 3, **fields})


@pytest.mark.parametrize("encoder_steps, decoder_steps, counter", [
    (("died", "ok"), ("ok",), "encoder_retries"),
    (("flaky", "ok"), ("ok",), "encoder_retries"),
    (("ok",), ("died", "ok"), "decoder_retries"),
    (("ok", "ok"), ("lost", "ok"), "reencoded_lost"),
])
async def test_one_failure_is_retried_and_the_request_answers(tiny_checkpoint, encoder_steps,
                                                              decoder_steps, counter):
    service = _service(tiny_checkpoint, ScriptedEncoder(*encoder_steps), ScriptedDecoder(*decoder_steps))
    reply = await service.complete(_body())
    assert reply.choices[0].message.content == "t0 t1 t2 " and reply.choices[0].finish_reason == "length"
    assert service.counters[counter] == 1 and service.counters["requests_generating"] == 0


@pytest.mark.parametrize("decoder_steps", [("died", "lost", "ok"), ("lost", "died", "ok")])
async def test_a_dead_decoder_and_a_lost_embedding_are_each_retried(tiny_checkpoint, decoder_steps):
    """An encoder and a decoder replica killed together: one request meets both failures."""
    service = _service(tiny_checkpoint, ScriptedEncoder("ok", "ok"), ScriptedDecoder(*decoder_steps))
    reply = await service.complete(_body())
    assert reply.choices[0].message.content == "t0 t1 t2 "
    assert service.counters["decoder_retries"] == 1 and service.counters["reencoded_lost"] == 1


@pytest.mark.parametrize("encoder_steps, decoder_steps", [
    (("died", "died"), ()), (("flaky", "flaky"), ()), (("died", "flaky"), ()),
    (("ok",), ("died", "died")), (("ok", "ok"), ("died", "lost", "died")),
])
async def test_a_second_failure_is_a_503(tiny_checkpoint, encoder_steps, decoder_steps):
    service = _service(tiny_checkpoint, ScriptedEncoder(*encoder_steps), ScriptedDecoder(*decoder_steps))
    with pytest.raises(ServiceUnavailable) as caught:
        await service.complete(_body())
    response = http_api.error_for(caught.value)
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["type"] == "unavailable"
    assert service.counters["requests_generating"] == 0


async def test_a_lost_embedding_is_encoded_again_not_taken_from_a_cache(tiny_checkpoint):
    encoder = ScriptedEncoder("ok", "ok")
    service = _service(tiny_checkpoint, encoder, ScriptedDecoder("ok", "lost", "ok", "ok"))
    await service.complete(_body())
    reply = await service.complete(_body())  # known image: no encoder call, then lost
    assert reply.choices[0].finish_reason == "length"
    assert encoder.refreshes == [False, True]  # the re-encode tells the encoder to drop its entry
    assert service.counters["router_image_hits"] == 1 and service.counters["reencoded_lost"] == 1
    await service.complete(_body())  # the fresh reference is the one the router now knows
    assert encoder.calls == 2 and service.counters["router_image_hits"] == 2


async def test_bad_input_is_not_retried(tiny_checkpoint):
    encoder = ScriptedEncoder("bad", "ok")
    service = _service(tiny_checkpoint, encoder, ScriptedDecoder("ok"))
    with pytest.raises(ImageInputError, match="messages.0.content.0.image_url: image 0: bad"):
        await service.complete(_body())
    assert encoder.calls == 1


async def test_a_decoder_that_dies_mid_stream_ends_the_stream_with_a_503_event(tiny_checkpoint):
    service = _service(tiny_checkpoint, ScriptedEncoder("ok"), ScriptedDecoder("dies-mid-stream"))
    response = await http_api.chat_completions(service, _body(stream=True))
    events = [line async for line in response.body_iterator]
    payloads = [e.decode().removeprefix("data: ").strip() for e in events]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == 503 and error["type"] == "unavailable"
    assert "t0" in "".join(payloads[:-2])  # what was generated before the failure was sent
    assert service.counters["decoder_retries"] == 0  # a token had reached the client: no retry
    assert service.counters["requests_generating"] == 0


async def test_a_prompt_too_long_for_any_context_is_refused_before_tokenizing(tiny_checkpoint, monkeypatch):
    service = _service(tiny_checkpoint, ScriptedEncoder(), ScriptedDecoder())
    monkeypatch.setattr(service.prompts, "render", lambda messages: pytest.fail("rendered"))
    monkeypatch.setattr(service.prompts, "tokenize", lambda *args: pytest.fail("tokenized"))
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x" * 10**6}]})
    with pytest.raises(ValueError, match="messages: 1000000 characters of text cannot fit"):
        await service.complete(body)


# --- the HTTP layer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.add_middleware(http_api.BodySizeLimit)
    http_api.install_error_handlers(app)
    app.state.max_request_bytes = 2000

    @app.post("/v1/chat/completions")
    async def echo(body: ChatCompletionRequest):
        return {"messages": len(body.messages)}

    with TestClient(app) as test_client:
        yield test_client


def test_a_body_within_the_limit_reaches_the_app_whole(client):
    body = {"messages": [{"role": "user", "content": "a" * 1500}]}
    assert client.post("/v1/chat/completions", json=body).json() == {"messages": 1}


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_a_413_json_error(client, chunked):
    payload = json.dumps({"messages": [{"role": "user", "content": "a" * 5000}]}).encode()
    content = iter([payload[:1000], payload[1000:]]) if chunked else payload
    reply = client.post("/v1/chat/completions", content=content,
                        headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"]["message"] == ("the request body is larger than 2000 bytes "
                                                "(max_request_bytes)")


@pytest.mark.parametrize("content, field", [
    ({"type": "image_url", "image_url": {}}, "messages.0.content.0.image_url.url"),
    ({"type": "text"}, "messages.0.content.0.text"),
    ({"type": "video", "video": {}}, "messages.0.content.0"),
])
def test_schema_errors_name_the_field_not_the_union_member(client, content, field):
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [content]}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == field
    assert reply.json()["error"]["message"].startswith(field + ": ")
