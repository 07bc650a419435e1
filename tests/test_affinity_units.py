"""Image affinity and embedding memory without Ray (issue 15): the consistent-hash ring and
its load fallback, which key a call routes by, bfloat16 storage of embeddings, and the
router's byte budget for the references it remembers. tests/test_affinity_serve.py runs
the same pieces through real Serve with 2 encoder and 2 decoder replicas."""

import base64
import hashlib
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deploy.affinity import route_key
from router.known_refs import KnownRefs
from router.schemas import ChatCompletionRequest
from router.service import RouterConfig, RouterService, ServiceUnavailable
from runtime.affinity import InTransit, Ring, choose
from runtime.embedding_dtype import embedding_bytes, to_float32, to_stored
from runtime.messages import EmbeddingMeta, EmbeddingRef, GenerateChunk, GenerateRequest, SamplingParams

KEYS = [hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest() for i in range(4000)]


# --- the ring ----------------------------------------------------------------------------------

def test_the_ring_spreads_keys_about_evenly():
    ring = Ring.of(["r-a", "r-b", "r-c"])
    shares = Counter(ring.owner(k) for k in KEYS)
    assert set(shares) == {"r-a", "r-b", "r-c"}
    assert all(abs(n / len(KEYS) - 1 / 3) < 0.08 for n in shares.values()), shares


def test_a_replica_leaving_moves_only_its_own_keys():
    before = Ring.of(["r-a", "r-b", "r-c"])
    after = Ring.of(["r-a", "r-c"])
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert moved and all(before.owner(k) == "r-b" for k in moved)
    assert len(moved) == sum(before.owner(k) == "r-b" for k in KEYS)  # all of its keys, no others


def test_a_replica_joining_takes_keys_only_for_itself():
    before = Ring.of(["r-a", "r-b"])
    after = Ring.of(["r-a", "r-b", "r-new"])
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert moved and all(after.owner(k) == "r-new" for k in moved)


def test_the_owner_does_not_depend_on_the_order_replicas_are_listed():
    assert all(Ring.of(["x", "y"]).owner(k) == Ring.of(["y", "x"]).owner(k) for k in KEYS[:200])


def test_choose_keeps_the_owner_until_it_is_far_busier_than_the_least_loaded():
    ring = Ring.of(["r-a", "r-b"])
    key = next(k for k in KEYS if ring.owner(k) == "r-a")
    at = lambda a, b: choose(key, {"r-a": a, "r-b": b}, ring, imbalance_threshold=4)  # noqa: E731
    assert (at(0, 0).replica_id, at(0, 0).route) == ("r-a", "affinity")
    assert (at(6, 2).replica_id, at(6, 2).route) == ("r-a", "affinity")  # 4 more: still the owner
    assert (at(7, 2).replica_id, at(7, 2).route) == ("r-b", "fallback")
    no_key = choose(None, {"r-a": 3, "r-b": 1}, ring, imbalance_threshold=4)
    assert (no_key.replica_id, no_key.route) == ("r-b", "load")


def test_calls_assigned_but_not_sent_count_until_sent_or_stale():
    now = [0.0]
    transit = InTransit(ttl_s=2.0, clock=lambda: now[0])
    ring = Ring.of(["a", "b"])
    key = next(f"img{i}" for i in range(100) if ring.owner(f"img{i}") == "a")
    chosen = []
    for _ in range(8):  # a burst routed before Serve's cache has seen any of it (both at 0)
        lens = {"a": transit.count("a"), "b": transit.count("b")}
        choice = choose(key, lens, ring, imbalance_threshold=4)
        transit.assigned(choice.replica_id)
        chosen.append(choice.route)
    assert chosen == ["affinity"] * 5 + ["fallback", "affinity", "fallback"]
    transit.sent("a")
    assert transit.count("a") == 5 and transit.count("b") == 2
    now[0] = 2.5  # never sent (their callers gave up): they stop counting
    transit.assigned("b")
    assert transit.count("a") == 0 and transit.count("b") == 1
    transit.forget(["b"])
    assert transit.count("a") == 0 and transit.count("b") == 1


def test_calls_route_by_the_encode_key_or_the_prompts_first_image():
    meta = lambda key: EmbeddingMeta(key, 16, 64, "bfloat16", "m")  # noqa: E731
    request = GenerateRequest("r", (1, 2), (EmbeddingRef(meta("k1"), 1), EmbeddingRef(meta("k2"), 2)),
                              SamplingParams(max_tokens=1))
    pending = lambda args, kwargs: SimpleNamespace(args=args, kwargs=kwargs)  # noqa: E731
    assert route_key(pending([[b"img"], "req"], {"refresh": False, "route_key": "k9"})) == "k9"
    assert route_key(pending([request], {})) == "k1"
    text_only = GenerateRequest("r", (1,), (), SamplingParams(max_tokens=1))
    assert route_key(pending([text_only], {})) is None
    assert route_key(pending([], {})) is None and route_key(None) is None


# --- embeddings in the decoder's dtype ---------------------------------------------------------

def test_bfloat16_storage_halves_the_bytes_and_widens_back_to_torchs_rounding():
    array = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    stored = to_stored(array, "bfloat16")
    assert stored.nbytes == array.nbytes // 2 == embedding_bytes(16, 64, "bfloat16")
    expected = torch.from_numpy(array).to(torch.bfloat16).float().numpy()
    assert np.array_equal(to_float32(stored, "bfloat16"), expected)
    assert np.abs(to_float32(stored, "bfloat16") - array).max() < 0.02
    assert to_stored(array, "float32").nbytes == embedding_bytes(16, 64, "float32")
    with pytest.raises(ValueError, match="embedding dtype"):
        to_stored(array, "float16")


# --- the router's references, in bytes ---------------------------------------------------------

class KeyedEncoder:
    """Answers each call with a fresh bfloat16-sized reference; records the route keys."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []

    async def encode(self, images, request_id, *, refresh=False, route_key=None):
        self.calls.append((len(images), route_key))
        return [EmbeddingRef(EmbeddingMeta(route_key, 16, 64, "bfloat16", "m"), object_ref=route_key)
                for _ in images]


class EchoDecoder:
    async def generate(self, request):
        yield GenerateChunk(request.request_id, "x", (1,), None, "length", len(request.prompt_token_ids), 1)


def _body(*seeds: int) -> ChatCompletionRequest:
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{s:04d}AAAA"}}
             for s in seeds]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "hi"}]}],
         "max_tokens": 1})


async def test_each_image_is_its_own_encoder_call_routed_by_its_key(tiny_checkpoint):
    encoder = KeyedEncoder()
    config = RouterConfig(model_id="m", served_model_name="tiny", model_path=str(tiny_checkpoint),
                          preprocess_fingerprint="fp", max_model_len=256)
    service = RouterService(config, encoder, EchoDecoder())
    await service.complete(_body(1, 2, 1))
    keys = service._keys([base64.b64decode("0001AAAA"), base64.b64decode("0002AAAA")])
    assert sorted(encoder.calls) == sorted([(1, keys[0]), (1, keys[1])])  # one call per unique image
    await service.close()


async def test_remembered_references_stay_within_their_byte_budget(tiny_checkpoint):
    one = embedding_bytes(16, 64, "bfloat16")  # 2 KiB
    config = RouterConfig(model_id="m", served_model_name="tiny", model_path=str(tiny_checkpoint),
                          preprocess_fingerprint="fp", max_model_len=256, known_refs_bytes=3 * one)
    encoder = KeyedEncoder()
    service = RouterService(config, encoder, EchoDecoder())
    for seed in range(10):
        await service.complete(_body(seed))
        assert service.counters["known_refs_bytes"] <= 3 * one
    assert service.counters["known_refs_bytes"] == 3 * one and len(encoder.calls) == 10
    await service.complete(_body(9))  # among the last three: no encoder call
    await service.complete(_body(0))  # dropped long ago: encoded again
    assert len(encoder.calls) == 11 and service.counters["router_image_hits"] == 1
    with pytest.raises(ValueError, match="known_refs_bytes"):
        KnownRefs(-1)
    await service.close()


async def test_a_completion_whose_decoder_dies_mid_generation_runs_again_on_another(tiny_checkpoint):
    from tests.test_reliability_units import ScriptedDecoder, ScriptedEncoder, _body as one_image, _service

    decoder = ScriptedDecoder("dies-mid-stream", "ok")
    service = _service(tiny_checkpoint, ScriptedEncoder("ok"), decoder)
    reply = await service.complete(one_image())  # not streamed: the client has seen nothing yet
    assert reply.choices[0].message.content == "t0 t1 t2 " and reply.choices[0].finish_reason == "length"
    assert len(decoder.requests) == 2 and service.counters["decoder_retries"] == 1
    assert service.counters["requests_generating"] == 0
    twice = _service(tiny_checkpoint, ScriptedEncoder("ok"),
                     ScriptedDecoder("dies-mid-stream", "dies-mid-stream"))
    with pytest.raises(ServiceUnavailable):  # once only
        await twice.complete(one_image())


def test_the_decoder_reads_bfloat16_embeddings_as_their_float32_widening(decoder_service):
    import asyncio

    from tests.support import collect

    service = decoder_service
    features = np.random.default_rng(7).standard_normal((16, service.hidden_size)).astype(np.float32)
    stored = to_stored(features, "bfloat16")
    prompt = (101, *[service.image_token_id] * 16, 1012, 2023, 2003)

    def request(rid, dtype, array, key):
        ref = EmbeddingRef(EmbeddingMeta(key, 16, service.hidden_size, dtype, service.model_id),
                           service.store.put(array))
        return GenerateRequest(rid, prompt, (ref,), SamplingParams(max_tokens=6, temperature=0.0,
                                                                   ignore_eos=True))

    # Different image keys, so neither reuses the other's KV prefix.
    as_bf16, *_ = asyncio.run(collect(service, request("bf16", "bfloat16", stored, "b" * 64)))
    widened, *_ = asyncio.run(collect(service, request("f32", "float32", to_float32(stored, "bfloat16"),
                                                       "f" * 64)))
    assert len(as_bf16) == 6 and as_bf16 == widened


async def test_hashing_an_image_does_not_stall_the_event_loop(tiny_checkpoint, monkeypatch):
    import asyncio
    import time

    import router.service

    def slow_key(data, model_id, fingerprint):  # what hashing a 20 MiB image costs, or more
        time.sleep(0.5)
        return hashlib.blake2b(data).hexdigest()

    monkeypatch.setattr(router.service, "image_cache_key", slow_key)
    config = RouterConfig(model_id="m", served_model_name="tiny", model_path=str(tiny_checkpoint),
                          preprocess_fingerprint="fp", max_model_len=256)
    service = RouterService(config, KeyedEncoder(), EchoDecoder())
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await service.complete(_body(1))
    task.cancel()
    assert ticks >= 20  # the loop kept turning while the image was hashed (0.5 s)
    await service.close()
