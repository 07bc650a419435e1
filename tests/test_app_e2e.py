"""The whole app on Ray Serve (router + encoder + decoder), through the official OpenAI client."""

import asyncio
import base64
import http.server
import io
import threading
import time

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.support import app_stats, deployed_app, image_data_url, openai_client

APP = "splitserve"


@pytest.fixture(scope="module")
def app_url(ray_serve, serve_http_port, tiny_checkpoint):
    args = {"model": str(tiny_checkpoint), "served_model_name": "llava-tiny", "strict_compile": True,
            "decoder": {"max_model_len": 256, "max_num_seqs": 4}, "encoder": {"max_batch_items": 4},
            "fetch": {"allowed_hosts": ["127.0.0.1"]}}
    with deployed_app(ray_serve, serve_http_port, APP, args) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return openai_client(app_url)


@pytest.fixture(scope="module")
def image_server(photos):
    """A local http server with one PNG, for `http://` image URLs."""
    buffer = io.BytesIO()
    photos[2].save(buffer, format="PNG")
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    server.shutdown()


def _user(*parts):
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith(("data:", "http"))
               else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def _stats():
    return app_stats(APP)


def test_a_burst_at_readiness_is_served_while_graphs_still_compile(client, app_url, photos):
    """The first test on the fresh app: its replicas serve on their covering graphs while the rest
    compile in the background. Twelve mixed requests at once (0-3 images, short and long
    prompts) all succeed, and the strict guard saw no compilation inside a step."""
    from concurrent.futures import ThreadPoolExecutor

    health = httpx.get(f"{app_url}/health").json()
    assert health["decoder"]["graphs_compiled"] < health["decoder"]["graphs_planned"]
    urls = [image_data_url(p.resize((48 + 8 * i, 40 + 4 * i))) for i, p in enumerate(photos)]

    def one(i):
        text = "describe it " * (1 + 12 * (i % 3))
        messages = _user(*urls[:i % 4], text)
        reply = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=8,
                                               temperature=0.0)
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert all(reason in ("stop", "length") and tokens >= 1 for reason, tokens in results)
    stats = _stats()
    assert stats["decoder"]["compilations_after_warmup"] == 0
    assert stats["encoder"]["compilations_after_warmup"] == 0


def test_models_and_health(client, app_url):
    assert [m.id for m in client.models.list().data] == ["llava-tiny"]
    health = httpx.get(f"{app_url}/health").json()
    assert health["status"] == "ok"
    for half in ("encoder", "decoder"):
        assert health[half]["compilations_after_warmup"] == 0
        assert 1 <= health[half]["graphs_compiled"] <= health[half]["graphs_planned"]
        assert health[half]["compiles_stopped"] is None  # the tiny graphs fit the memory maps


def test_text_only_chat(client):
    reply = client.chat.completions.create(model="llava-tiny", messages=[
        {"role": "user", "content": "Tell me about cats."}], max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.created > 0


def test_images_from_data_urls_and_http(client, photos, image_server):
    one = client.chat.completions.create(model="llava-tiny", messages=_user(
        image_data_url(photos[0]), "What is this?"), max_tokens=6, temperature=0)
    two = client.chat.completions.create(model="llava-tiny", messages=_user(
        image_data_url(photos[0]), image_data_url(photos[1]), "What is this?"), max_tokens=6, temperature=0)
    fetched = client.chat.completions.create(model="llava-tiny", messages=_user(
        image_server, "What is this?"), max_tokens=6, temperature=0)
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == 16  # one more image
    assert fetched.usage.prompt_tokens == one.usage.prompt_tokens
    # Different images, different answers (the checkpoint is random, but not blind).
    assert len({one.choices[0].message.content, fetched.choices[0].message.content}) == 2


def test_streaming_matches_the_whole_answer(client, photos):
    messages = _user(image_data_url(photos[3]), "Describe the picture.")
    whole = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=12,
                                           temperature=0)
    stream = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_repeated_image_skips_the_encoder(client, photos):
    messages = _user(image_data_url(photos[1], fmt="JPEG"), "Again?")
    before = _stats()
    for _ in range(2):
        client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=2)
    after = _stats()
    assert after["router"]["images_encoded"] - before["router"]["images_encoded"] == 1
    assert after["router"]["router_image_hits"] - before["router"]["router_image_hits"] == 1


def test_greedy_answers_equal_transformers_serve(client, transformers_server, tiny_checkpoint, photos):
    peer = OpenAI(base_url=transformers_server, api_key="unused", max_retries=0)
    conversations = [
        [{"role": "user", "content": "Write a haiku about the sea."}],
        _user(image_data_url(photos[0]), "What is in this picture?"),
        _user(image_data_url(photos[2]), "and", image_data_url(photos[3]), "Which is bigger?"),
    ]
    for messages in conversations:
        ours = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=16,
                                              temperature=0)
        theirs = peer.chat.completions.create(model=str(tiny_checkpoint), messages=messages,
                                              max_tokens=16, temperature=0)
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert ours.choices[0].message.content == theirs.choices[0].message.content


def test_bad_input_is_a_400_that_names_the_field(client):
    with pytest.raises(BadRequestError, match="temperature"):
        client.chat.completions.create(model="llava-tiny", messages=_user("hi"), temperature=7)
    with pytest.raises(BadRequestError, match=r"messages\.0\.content\.0\.image_url"):
        client.chat.completions.create(model="llava-tiny", messages=_user("data:image/png;base64,@@@"))
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="llava-tiny", messages=_user("hi"), max_tokens=100_000)
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=_user("hi"))
    assert client.chat.completions.create(model="llava-tiny", messages=_user("hi"), max_tokens=2).choices


def test_handle_api_from_another_serve_app(ray_serve, app_url, photos):
    from ray import serve

    @serve.deployment
    class Caller:
        async def __call__(self, url: str) -> dict:
            handle = serve.get_app_handle(APP)
            request = {"messages": _user(url, "What is this?"), "max_tokens": 5, "temperature": 0}
            whole = await handle.chat.remote(request)
            pieces = [c async for c in handle.options(stream=True).chat.remote({**request, "stream": True})]
            return {"whole": whole, "pieces": pieces}

    caller = ray_serve.run(Caller.bind(), name="caller", route_prefix=None)
    try:
        out = caller.remote(image_data_url(photos[0])).result(timeout_s=120)
    finally:
        ray_serve.delete("caller")
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in out["pieces"] if p["choices"])
    assert out["whole"]["choices"][0]["message"]["content"] == streamed
    assert out["whole"]["usage"]["completion_tokens"] >= 1


def test_client_disconnect_frees_the_decode_slot(app_url):
    async def leave_mid_stream():
        async with httpx.AsyncClient(base_url=app_url, timeout=60) as http:
            body = {"model": "llava-tiny", "messages": _user("Go on forever."), "max_tokens": 200,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data:")
                    if seen >= 3:
                        return  # leave mid-stream

    before = _stats()["decoder"]["generated_tokens"]
    asyncio.run(leave_mid_stream())
    deadline = time.monotonic() + 10
    while _stats()["decoder"]["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = _stats()["decoder"]
    assert stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] - before < 200  # it stopped well before max_tokens


def test_colocated_layout_answers_like_the_disaggregated_one(ray_serve, client, serve_http_port,
                                                            tiny_checkpoint, photos):
    colocated = {"model": str(tiny_checkpoint), "served_model_name": "llava-tiny", "layout": "colocated",
                 "strict_compile": True, "decoder": {"max_model_len": 256, "max_num_seqs": 4},
                 "encoder": {"max_batch_items": 4}}
    with deployed_app(ray_serve, serve_http_port, "colocated", colocated, route_prefix="/colocated") as base:
        other = openai_client(base)
        messages = _user(image_data_url(photos[2]), "What is in this picture?")
        ours = client.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=10,
                                              temperature=0)
        theirs = other.chat.completions.create(model="llava-tiny", messages=messages, max_tokens=10,
                                               temperature=0)
        assert theirs.choices[0].message.content == ours.choices[0].message.content
        assert theirs.usage == ours.usage


def _scrape(metrics_port, names, timeout_s=60.0):
    """Prometheus text from the node's metrics port, once every name in `names` appears."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        if all(name in text for name in names) or time.monotonic() > deadline:
            return text
        time.sleep(2)


def _value(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no sample of {name} {labels}"
    return total


def test_prometheus_metrics_after_traffic(client, photos, metrics_port):
    from ray import serve

    url = image_data_url(photos[0])
    encoder = serve.get_deployment_handle("encoder", app_name=APP)
    png = base64.b64decode(url.split(",", 1)[1])
    for _ in range(2):  # the same image twice, straight to the encoder: the second is a hit
        encoder.encode.remote([png], "metrics-test").result()
    for _ in range(2):
        client.chat.completions.create(model="llava-tiny", messages=_user(url, "Again?"), max_tokens=4,
                                       stream=True).response.read()
    names = ["ray_splitserve_encoder_cache_hits", "ray_splitserve_decoder_generated_tokens",
             "ray_splitserve_time_to_first_token_seconds_bucket", "ray_splitserve_router_image_hits",
             "ray_splitserve_encoder_padding_rows", "ray_splitserve_decoder_kv_blocks_used",
             "ray_splitserve_decoder_kv_blocks_total", "ray_splitserve_decoder_prefix_cache_hit_tokens"]
    text = _scrape(metrics_port, names)
    assert _value(text, "ray_splitserve_encoder_cache_hits_total", deployment="encoder") >= 1
    assert _value(text, "ray_splitserve_encoder_cache_misses_total", deployment="encoder") >= 1
    assert _value(text, "ray_splitserve_router_image_hits_total", deployment="router") >= 1
    assert _value(text, "ray_splitserve_encoder_batches_total", deployment="encoder") >= 1
    assert _value(text, "ray_splitserve_decoder_generated_tokens_total", deployment="decoder") >= 8
    assert _value(text, "ray_splitserve_decoder_prompt_tokens_total", deployment="decoder") > 0
    assert _value(text, "ray_splitserve_time_to_first_token_seconds_count") >= 2
    assert _value(text, "ray_splitserve_inter_token_latency_seconds_count") >= 6
    for deployment in ("encoder", "decoder"):
        assert _value(text, "ray_splitserve_compilations_after_warmup", deployment=deployment) == 0
    assert 0 <= _value(text, "ray_splitserve_decoder_kv_blocks_used", deployment="decoder") <= \
        _value(text, "ray_splitserve_decoder_kv_blocks_total", deployment="decoder")
    # The two identical "Again?" requests: the second reads the first's image blocks from the cache.
    assert _value(text, "ray_splitserve_decoder_prefix_cache_hit_tokens_total", deployment="decoder") >= 16
