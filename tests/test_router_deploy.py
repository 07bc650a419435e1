"""The router on real Serve with fake encoder and decoder deployments (no model compiles):
exceptions raised in a service cross the handles with their fault (a RequestError is a 400,
anything else a 500, always the JSON error shape), and halves that disagree make every
endpoint, `/health` included, a JSON 503 saying why, which the CLI's wait loop reads as a
failure at once (issue 12)."""

import threading
import time

import httpx
import pytest
from ray import serve

from deploy.app import RouterDeployment
from deploy.startup import health_probe, wait_until_ready
from runtime.messages import (EmbeddingMeta, EmbeddingMismatchError, EmbeddingRef, GenerateChunk,
                              RequestError)
from tests.support import image_data_url

TINY_TOKENS_PER_IMAGE = 16


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FakeEncoder:
    def __init__(self, tokens_per_image: int, warmup_s: float = 0.0) -> None:
        self.tokens_per_image = tokens_per_image
        time.sleep(warmup_s)  # a replica compiling its graphs

    def info(self) -> dict:
        return {"model_id": "m", "hidden_size": 64, "tokens_per_image": self.tokens_per_image,
                "fingerprint": "fp", "config": {}}

    async def encode(self, images, request_id, *, refresh=False, route_key=None):
        meta = EmbeddingMeta("h", self.tokens_per_image, 64, "float32", "m")
        return [EmbeddingRef(meta, None) for _ in images]

    def stats(self) -> dict:
        return {"compilations_after_warmup": 0}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FakeDecoder:
    """max_tokens picks what `generate` does: 2 refuses the request, 3 raises a plain
    ValueError (a server fault), 4 an EmbeddingMismatchError, anything else answers."""

    def __init__(self, model_path: str, tokens_per_image: int) -> None:
        self.model_path, self.tokens_per_image = model_path, tokens_per_image

    def info(self) -> dict:
        return {"model_id": "m", "model_path": self.model_path, "hidden_size": 64,
                "max_model_len": 256, "tokens_per_image": self.tokens_per_image, "max_images": 4}

    async def generate(self, request):
        faults = {2: RequestError("prompt_token_ids: ids must be in [0, 30592)"),
                  3: ValueError("no bucket holds 300 tokens"),
                  4: EmbeddingMismatchError("embedding h was made by model 'x', not 'm'")}
        if request.sampling.max_tokens in faults:
            raise faults[request.sampling.max_tokens]
        yield GenerateChunk(request.request_id, "ok", (7,), None, "length",
                            len(request.prompt_token_ids), 1)

    def stats(self) -> dict:
        return {"compilations_after_warmup": 0}


def _deploy(ray_serve, serve_http_port, name, model_path, encoder_tokens, decoder_tokens,
            encoder_warmup_s=0.0):
    app = RouterDeployment.bind(FakeEncoder.bind(encoder_tokens, encoder_warmup_s),
                                FakeDecoder.bind(str(model_path), decoder_tokens),
                                {"served_model_name": "fake", "fetch": {}})
    deploy = lambda: ray_serve.run(app, name=name, route_prefix=f"/{name}")  # noqa: E731
    if encoder_warmup_s:  # serve.run returns once every replica is up: ask /health meanwhile
        threading.Thread(target=deploy, daemon=True).start()
    else:
        deploy()
    return f"http://127.0.0.1:{serve_http_port}/{name}"


@pytest.fixture(scope="module")
def agreeing(ray_serve, serve_http_port, tiny_checkpoint):
    url = _deploy(ray_serve, serve_http_port, "fakes-agree", tiny_checkpoint,
                  TINY_TOKENS_PER_IMAGE, TINY_TOKENS_PER_IMAGE)
    assert wait_until_ready([health_probe(f"{url}/health")], _never(), timeout_s=120).state == "ready"
    yield url
    ray_serve.delete("fakes-agree")


@pytest.fixture(scope="module")
def disagreeing(ray_serve, serve_http_port, tiny_checkpoint):
    url = _deploy(ray_serve, serve_http_port, "fakes-disagree", tiny_checkpoint,
                  TINY_TOKENS_PER_IMAGE, 576)
    yield url
    ray_serve.delete("fakes-disagree")


def _never():
    return threading.Event()


def _chat(url, max_tokens, photos=None):
    content = [{"type": "text", "text": "hi"}]
    if photos:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(photos[0])}})
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "fake", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]})


def _error(reply, status):
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == status
    return error


def test_a_request_error_raised_in_the_decoder_is_a_400_naming_the_field(agreeing, photos):
    error = _error(_chat(agreeing, 2, photos), 400)
    assert error["param"] == "prompt_token_ids" and error["type"] == "invalid_request_error"
    assert error["message"] == "prompt_token_ids: ids must be in [0, 30592)"  # no Ray traceback


@pytest.mark.parametrize("max_tokens, message", [
    (3, "internal error: ValueError: no bucket holds 300 tokens"),
    (4, "internal error: EmbeddingMismatchError: embedding h was made by model 'x', not 'm'"),
])
def test_any_other_service_exception_is_a_500_with_its_message(agreeing, max_tokens, message):
    error = _error(_chat(agreeing, max_tokens), 500)
    assert error["type"] == "internal_error" and error["message"] == message


def test_a_lone_surrogate_is_a_400_naming_the_field(agreeing):
    reply = httpx.post(f"{agreeing}/v1/chat/completions", timeout=60, headers={
        "content-type": "application/json"}, content=b'{"messages": [{"role": "user", '
                                                     b'"content": "\\ud800 hi"}], "max_tokens": 5}')
    error = _error(reply, 400)
    assert error["param"] == "messages.0.content" and "lone surrogate U+D800" in error["message"]
    assert _chat(agreeing, 5).status_code == 200


def test_halves_that_disagree_answer_json_503s_that_say_why(disagreeing):
    started = time.monotonic()
    outcome = wait_until_ready([health_probe(f"{disagreeing}/health")], _never(), timeout_s=120)
    assert outcome.state == "failed", outcome
    assert "encoder and decoder disagree on tokens_per_image: 16 vs 576" in outcome.detail
    print(f"the wait loop failed {time.monotonic() - started:.1f} s after the deploy returned")
    for reply in (httpx.get(f"{disagreeing}/health", timeout=30),
                  httpx.get(f"{disagreeing}/v1/models", timeout=30), _chat(disagreeing, 5)):
        error = _error(reply, 503)
        assert error["type"] == "startup_failed" and "tokens_per_image: 16 vs 576" in error["message"]


def test_health_names_the_half_still_warming_up_at_once(ray_serve, serve_http_port, tiny_checkpoint):
    url = _deploy(ray_serve, serve_http_port, "fakes-slow", tiny_checkpoint, TINY_TOKENS_PER_IMAGE,
                  TINY_TOKENS_PER_IMAGE, encoder_warmup_s=20)
    try:
        messages, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{url}/health", timeout=30)
            except httpx.TransportError:  # the proxy has no route yet
                time.sleep(0.2)
                continue
            if reply.headers.get("content-type", "").startswith("application/json"):
                if reply.status_code == 200:
                    break
                messages.append(_error(reply, 503)["message"])
            time.sleep(0.2)
        assert reply.status_code == 200, messages[-3:]
        # Answered without waiting on the halves (the old /health waited 5 s on them and said
        # only "not ready: TimeoutError"): the decoder is up, the encoder still sleeps.
        assert "warming up: encoder" in messages
        assert set(messages) <= {"warming up: encoder, decoder", "warming up: encoder",
                                 "warming up: the router"}, set(messages)
    finally:
        ray_serve.delete("fakes-slow")

