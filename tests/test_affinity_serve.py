"""Image-aware routing and bounded embedding memory on real Serve (issue 15), with 2 encoder
and 2 decoder replicas under the image-affinity request router (deploy/affinity.py).

The router's own reference cache is off (`router_refs_bytes: 0`) in every app here, so each
image request reaches an encoder replica: what is measured is the replicas' caches. Cache
figures come per replica from Prometheus (the `replica` tag), summed over the app's live
replicas. The tests share the app and run in file order; the replica kill is last.
"""

import asyncio
import base64
import io
import math
import re
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import ray
from PIL import Image

from deploy.app import build_app
from deploy.startup import wait_healthy

APP, PREFIX = "affinity", "/affinity"
# One tiny-checkpoint embedding in float32: the decoder runs float32 here, so embeddings are
# stored in float32; bfloat16 storage is checked through the decoder in
# tests/test_affinity_units.py, a bfloat16 decoder in tests/test_decoder_reference.py.
EMBEDDING_BYTES = 16 * 64 * 4
ENCODER_CACHE_BYTES = 16 * EMBEDDING_BYTES  # per encoder replica: 8 images fit, 300 do not
RELEASE_LAG_S = 1.0  # how long Ray may take to free an object nothing refers to any more
QUESTIONS = ("What is in this picture?", "Which colours do you see?", "Describe the texture.",
             "Is it a photograph?", "What stands out most?", "Give it a short title.")
MAX_TOKENS = 4
REPLACE_TIMEOUT_S = 300


def app_args(checkpoint, *, replicas: int, routing: str = "affinity") -> dict:
    return {"model": str(checkpoint), "served_model_name": "llava-tiny", "strict_compile": True,
            "routing": routing, "router_refs_bytes": 0, "imbalance_threshold": 4,
            "encoder_replicas": replicas, "decoder_replicas": replicas,
            # Every graph compiled before serving (few of them), so no layout's throughput pays
            # for background compilation.
            "encoder": {"max_batch_items": 4, "encoder_cache_bytes": ENCODER_CACHE_BYTES,
                        "full_warmup": True},
            "decoder": {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 64,
                        "max_images_per_request": 2, "full_warmup": True}}


@contextmanager
def deployed(serve, port: int, name: str, args: dict):
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    wait_healthy(f"{url}/health", timeout_s=REPLACE_TIMEOUT_S)
    try:
        yield url
    finally:
        serve.delete(name, _blocking=False)
        deadline = time.monotonic() + REPLACE_TIMEOUT_S
        while name in serve.status().applications and time.monotonic() < deadline:
            time.sleep(1)


@pytest.fixture(scope="module")
def app_url(ray_serve, serve_http_port, tiny_checkpoint):
    with deployed(ray_serve, serve_http_port, APP, app_args(tiny_checkpoint, replicas=2)) as url:
        yield url


# --- workload and measurements -----------------------------------------------------------------

def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, question: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": "llava-tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))


async def images_by_questions(url: str, seeds: range) -> dict:
    """Every image with each question, one round per question (the images of a round run
    together): requests per second and prompt tokens sent. Every answer must be a 200."""
    images = [image_url(s) for s in seeds]
    started, prompt_tokens = time.monotonic(), 0
    for question in QUESTIONS:
        replies = await post_all(url, [chat(image, question) for image in images])
        assert [r.status_code for r in replies] == [200] * len(images), replies[0].text
        prompt_tokens += sum(r.json()["usage"]["prompt_tokens"] for r in replies)
    return {"requests_per_s": len(images) * len(QUESTIONS) / (time.monotonic() - started),
            "prompt_tokens": prompt_tokens}


def replica_ids(app: str, deployment: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def per_replica(metrics_port: int, metric: str, replicas: set[str], **labels: str) -> dict[str, float]:
    """One Prometheus series summed per `replica` label, for the given replicas only."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if tags.get("replica") in replicas and all(tags.get(k) == v for k, v in labels.items()):
            values[tags["replica"]] = values.get(tags["replica"], 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def cache_figures(metrics_port: int, app: str, requests: int, prompt_tokens: int,
                  timeout_s: float = 60) -> dict:
    """Encoder and KV prefix hit rates of `app`, once its replicas' exported counters account
    for all `requests` and every prompt token's prefix lookup (exporters refresh every 2 s, and
    Ray's metrics pipeline may publish one replica's series in different scrapes). The KV rate
    is over all prompt tokens sent, the same in every layout."""
    encoders, decoders = replica_ids(app, "encoder"), replica_ids(app, "decoder")
    deadline = time.monotonic() + timeout_s
    while True:
        read = {name: sum(per_replica(metrics_port, f"ray_splitserve_{name}_total", replicas).values())
                for name, replicas in (("encoder_cache_hits", encoders), ("encoder_cache_misses", encoders),
                                       ("encoder_cache_single_flight_joins", encoders),
                                       ("decoder_prefix_cache_queried_tokens", decoders),
                                       ("decoder_prefix_cache_hit_tokens", decoders),
                                       ("decoder_generated_tokens", decoders))}
        lookups = read["encoder_cache_hits"] + read["encoder_cache_misses"] + \
            read["encoder_cache_single_flight_joins"]
        if (lookups >= requests and read["decoder_generated_tokens"] >= requests * MAX_TOKENS
                and read["decoder_prefix_cache_queried_tokens"] >= prompt_tokens) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert lookups == requests, read
    assert read["decoder_prefix_cache_queried_tokens"] >= prompt_tokens, read  # every token looked up
    return {"encoder_hit_rate": 1 - read["encoder_cache_misses"] / lookups,
            "kv_prefix_hit_rate": read["decoder_prefix_cache_hit_tokens"] / prompt_tokens, **read}


def object_store_bytes() -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


# --- tests -------------------------------------------------------------------------------------

async def test_affinity_hit_rates_match_one_replica_each_and_default_routing_does_worse(
        app_url, ray_serve, serve_http_port, metrics_port, tiny_checkpoint):
    seeds, requests = range(8), 8 * len(QUESTIONS)
    measured = {}
    for name, replicas, routing in (("affinity-1x1", 1, "affinity"), ("affinity-default", 2, "default")):
        with deployed(ray_serve, serve_http_port, name,
                      app_args(tiny_checkpoint, replicas=replicas, routing=routing)) as url:
            run = await images_by_questions(url, seeds)
            measured[name] = {**cache_figures(metrics_port, name, requests, run["prompt_tokens"]), **run}
    run = await images_by_questions(app_url, seeds)
    measured[APP] = {**cache_figures(metrics_port, APP, requests, run["prompt_tokens"]), **run}
    print("\naffinity workload (8 images x 6 questions):", measured)
    one, affinity, default = measured["affinity-1x1"], measured[APP], measured["affinity-default"]
    for rate in ("encoder_hit_rate", "kv_prefix_hit_rate"):
        assert affinity[rate] >= one[rate] - 0.10, (rate, measured)
        assert default[rate] < affinity[rate], (rate, measured)
    # Each image encoded once by its owner, give or take a call that the load fallback sent to
    # the other replica (8 images of a round arrive together and the ring may split them 6/2).
    assert 8 <= affinity["encoder_cache_misses"] < default["encoder_cache_misses"], measured


async def test_one_image_sent_by_everyone_spreads_by_the_fallback(app_url, metrics_port):
    decoders = replica_ids(APP, "decoder")
    routed = lambda route: per_replica(metrics_port, "ray_splitserve_routed_calls_total",  # noqa: E731
                                       decoders, route=route)
    before = per_replica(metrics_port, "ray_splitserve_decoder_generated_tokens_total", decoders)
    fallback_before = sum(routed("fallback").values())
    replies = await post_all(app_url, [chat(image_url(1000), f"Question {i}?", max_tokens=24)
                                       for i in range(24)])
    assert [r.status_code for r in replies] == [200] * 24
    deadline = time.monotonic() + 60  # the exporters of two processes catch up
    while time.monotonic() < deadline:
        after = per_replica(metrics_port, "ray_splitserve_decoder_generated_tokens_total", decoders)
        gained = {r: after.get(r, 0) - before.get(r, 0) for r in decoders}
        if sum(gained.values()) >= 24 * 24 and sum(routed("fallback").values()) > fallback_before:
            break
        time.sleep(1)
    assert sum(gained.values()) == 24 * 24
    assert all(tokens > 0 for tokens in gained.values()), gained  # both decoders took some
    assert sum(routed("fallback").values()) > fallback_before


async def test_object_store_stays_within_the_budgets_over_300_distinct_images(app_url, metrics_port):
    """Embeddings alive: at most each encoder cache's entries (its byte budget over one
    embedding's bytes), the router's references (none here) and one per request in flight, in
    steady state (the median sample), plus the requests whose release is under way: Ray frees
    an object only once every process that held a reference has told its owner, asynchronously,
    which takes up to about a second (`RELEASE_LAG_S`), so the median may also count the rounds
    of the last second (at least two) and the peak twice that. Once the requests end, only the
    caches' entries stay. Each embedding costs what Ray's store charges for such an array (its
    bytes plus a header), measured here."""
    concurrency = 8
    cache_entries = 2 * (ENCODER_CACHE_BYTES // EMBEDDING_BYTES)
    entries_bound = cache_entries + concurrency
    before = object_store_bytes()
    probe = ray.put(np.zeros((16, 64), np.float32))
    object_bytes = object_store_bytes() - before
    del probe
    await asyncio.sleep(5)  # the entries gauge is fresh, the probe freed
    cached = sum(per_replica(metrics_port, "ray_splitserve_encoder_cache_entries",
                             replica_ids(APP, "encoder")).values())
    other = object_store_bytes() - cached * object_bytes  # what is not an embedding
    samples = []

    async def sample() -> None:
        while True:
            samples.append(await asyncio.to_thread(object_store_bytes) - other)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        for start in range(2000, 2300, concurrency):
            replies = await post_all(app_url, [chat(image_url(s), "What is it?", max_tokens=1)
                                               for s in range(start, min(start + concurrency, 2300))])
            assert all(r.status_code == 200 for r in replies), replies[0].text
    finally:
        sampler.cancel()
    rounds_per_s = -(-300 // concurrency) / (time.monotonic() - started)
    release_lag = concurrency * max(2, math.ceil(rounds_per_s * RELEASE_LAG_S))
    budget, median = entries_bound * object_bytes, sorted(samples)[len(samples) // 2]
    print(f"\nobject store over 300 images: embeddings held median {median:.0f} B, at most "
          f"{max(samples):.0f} B, for a budget of {budget} B ({entries_bound} x {object_bytes} B) "
          f"plus {release_lag * object_bytes} B of release lag; {len(samples)} samples; all 300 "
          f"kept would be {300 * object_bytes} B")
    assert EMBEDDING_BYTES < object_bytes < EMBEDDING_BYTES + 1024  # the array plus Ray's header
    assert len(samples) >= 10 and median <= budget + release_lag * object_bytes, (median, budget)
    assert max(samples) <= budget + 2 * release_lag * object_bytes, (max(samples), budget)
    deadline = time.monotonic() + 20  # nothing leaks: the caches' entries alone stay
    while object_store_bytes() - other > cache_entries * object_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert object_store_bytes() - other <= cache_entries * object_bytes
    from ray import serve
    stats = await serve.get_app_handle(APP).stats.remote()
    assert stats["router"]["reencoded_lost"] == 0 and stats["router"]["known_refs_bytes"] == 0


async def test_calls_made_while_serving_one_request_are_each_routed(app_url):
    """A chat's image encodes and its n choices are calls one router replica makes while it
    handles one request, so Serve gives them one internal request id: each must still be
    routed (Serve's own lookup by that id left all but the first waiting forever)."""
    two_images = [{**chat(image_url(4000 + i), QUESTIONS[i]), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(4000 + i)}},
        {"type": "image_url", "image_url": {"url": image_url(4100 + i)}},
        {"type": "text", "text": QUESTIONS[i]}]}]} for i in range(6)]
    choices = [{**chat(image_url(4200 + i), QUESTIONS[i]), "n": 3} for i in range(3)]
    replies = await asyncio.wait_for(post_all(app_url, two_images + choices), timeout=120)
    assert [r.status_code for r in replies] == [200] * 9, [r.text for r in replies if r.status_code != 200]
    assert [len(r.json()["choices"]) for r in replies] == [1] * 6 + [3] * 3
    assert all(r.json()["usage"]["prompt_tokens"] > 32 for r in replies[:6])  # both images' tokens


async def test_a_replica_killed_mid_run_loses_no_request(app_url):
    victims = []

    async def kill_soon() -> None:
        await asyncio.sleep(3)
        for deployment in ("encoder", "decoder"):
            name = f"SERVE_REPLICA::{APP}#{deployment}#{sorted(replica_ids(APP, deployment))[0]}"
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            victims.append(name)

    killer = asyncio.create_task(kill_soon())
    bodies = [chat(image_url(3000 + i % 8), QUESTIONS[i // 8], max_tokens=32) for i in range(48)]
    replies = await post_all(app_url, bodies)
    await killer
    assert len(victims) == 2
    assert [r.status_code for r in replies] == [200] * 48, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in replies)
