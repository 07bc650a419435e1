"""EncoderService end to end without Ray: image bytes in, EmbeddingRefs in a LocalObjectStore out."""

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.service import EncoderService
from runtime.compile_guard import xla_compilation_count
from runtime.messages import (
    EmbeddingLostError, EmbeddingMeta, EmbeddingMismatchError, EmbeddingRef, ItemError)
from runtime.object_store import LocalObjectStore

TOLERANCE = 1e-4
ENTRY_BYTES = 16 * 64 * 4  # one tiny-checkpoint embedding: 16 tokens x 64 float32


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def store():
    return LocalObjectStore()


@pytest.fixture(scope="module")
def service(tiny_checkpoint, store):
    config = EncoderConfig(model=str(tiny_checkpoint), strict_compile=True, full_warmup=True,
                           batch_wait_s=0.02, max_image_bytes=1_000_000, max_image_pixels=2_000_000)
    service = EncoderService(config, store)
    yield service
    service.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Eager fp32 image features from transformers' LLaVA, for PIL images."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()

    def features(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return [f.numpy() for f in model.get_image_features(pixel_values=pixels).pooler_output]

    return features


def _arrays(store, refs):
    assert all(isinstance(r, EmbeddingRef) for r in refs), refs
    return store.get([r.object_ref for r in refs])


async def test_photos_encode_to_transformers_features(service, store, reference, photos, tiny_checkpoint):
    images = [_png(p) for p in photos]
    refs = await service.encode(images, request_id="photos")
    for ref, array, expected, data in zip(refs, _arrays(store, refs), reference(photos), images):
        assert array.shape == (16, 64) and array.dtype == np.float32
        assert np.abs(array - expected).max() < TOLERANCE
        assert ref.meta == EmbeddingMeta(service.image_key(data), 16, 64, "float32", str(tiny_checkpoint))
    assert (service.model_id, service.hidden_size, service.tokens_per_image) == (str(tiny_checkpoint), 64, 16)


async def test_more_photos_than_the_largest_bucket_in_one_request(service, store, reference, photos):
    variants = [p.rotate(angle, expand=True) for p in photos for angle in (90, 180, 270)]  # 12 images
    refs = await service.encode([_png(v) for v in variants])
    for array, expected in zip(_arrays(store, refs), reference(variants)):
        assert np.abs(array - expected).max() < TOLERANCE


async def test_refs_carry_checkable_metadata(service, photos):
    [ref] = await service.encode([_png(photos[2].resize((90, 70)))])
    assert EmbeddingMeta.unpack(ref.meta.pack()) == ref.meta
    ref.meta.check_compatible(service.model_id, service.hidden_size)
    with pytest.raises(EmbeddingMismatchError, match="was made by model"):
        ref.meta.check_compatible("someone/else", service.hidden_size)
    with pytest.raises(EmbeddingMismatchError, match="hidden size 64, the model needs 4096"):
        ref.meta.check_compatible(service.model_id, 4096)


async def test_second_request_for_an_image_is_a_counted_hit(service):
    image = _noise_png(100)
    before = service.stats()
    [first] = await service.encode([image])
    middle = service.stats()
    [second] = await service.encode([image])
    after = service.stats()
    assert middle["misses"] == before["misses"] + 1 and middle["hits"] == before["hits"]
    assert after["hits"] == middle["hits"] + 1 and after["misses"] == middle["misses"]
    assert second is first  # the same object in the store
    assert after["batched_items"] == middle["batched_items"]  # the device did not run


async def test_concurrent_duplicates_are_computed_once(service, store):
    image = _noise_png(200)
    before = service.stats()
    results = await asyncio.gather(*[service.encode([image, image]) for _ in range(5)])
    after = service.stats()
    refs = [ref for result in results for ref in result]
    assert len({id(ref) for ref in refs}) == 1
    assert after["misses"] - before["misses"] == 1
    assert after["single_flight_joins"] - before["single_flight_joins"] == 9
    assert after["batched_items"] - before["batched_items"] == 1
    assert _arrays(store, refs[:1])[0].shape == (16, 64)


class _SlowPreprocessor:
    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def __call__(self, data):
        time.sleep(self.seconds)
        return self.inner(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_burst_waits_for_images_still_being_preprocessed(service, monkeypatch):
    """Four new images, each 60 ms in preprocessing on the service's two threads: two reach
    the batcher at ~60 ms and two at ~120 ms, more than `batch_wait_s` (20 ms) apart. The
    batch counts the last two as on their way and takes them too: one device batch."""
    monkeypatch.setattr(service, "_preprocessor", _SlowPreprocessor(service._preprocessor, 0.06))
    monkeypatch.setattr(service._batcher, "max_wait_s", 5.0)  # a loaded machine's slow threads
    before = service.stats()
    refs = await service.encode([_noise_png(seed) for seed in range(300, 304)])
    after = service.stats()
    assert all(isinstance(ref, EmbeddingRef) for ref in refs)
    assert after["batched_items"] - before["batched_items"] == 4
    assert after["batches"] - before["batches"] == 1


async def test_bad_items_fail_alone(service, store, reference, photos):
    good = photos[3].resize((96, 64))
    truncated = _png(photos[0])[:2000]
    too_many_bytes = _noise_png(300, size=640)  # ~1.2 MB of noise, over max_image_bytes
    too_many_pixels = _png(Image.new("RGB", (2000, 1500)))  # 3M pixels, over max_image_pixels
    assert len(too_many_bytes) > 1_000_000 and len(too_many_pixels) < 1_000_000
    batch = [_png(good), truncated, too_many_bytes, b"\x89PNG nonsense", too_many_pixels, _png(good)]
    results = await service.encode(batch, request_id="req-7")
    errors = {r.index: r.message for r in results if isinstance(r, ItemError)}
    assert set(errors) == {1, 2, 3, 4}
    assert not any(r.retryable for r in results if isinstance(r, ItemError))  # bad input is final
    assert errors[1].startswith("image 1 of request req-7: not a decodable image")
    assert "over the limit of 1000000 bytes (max_image_bytes)" in errors[2]
    assert errors[3].startswith("image 3 of request req-7: not an image")
    assert "2000x1500 = 3000000 pixels is over the limit of 2000000" in errors[4]
    expected = reference([good])[0]
    for array in _arrays(store, [results[0], results[5]]):
        assert np.abs(array - expected).max() < TOLERANCE
    assert results[0] is results[5]


async def test_non_bytes_item_is_an_item_error(service):
    results = await service.encode(["not bytes", _noise_png(400)])
    assert isinstance(results[0], ItemError) and "expected image bytes, got str" in results[0].message
    assert isinstance(results[1], EmbeddingRef)


async def test_200_random_item_counts_add_no_compilation(service):
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 3 * service.config.max_batch_items + 1, size=200)
    seeds = iter(range(10_000, 20_000))
    requests = [[_noise_png(next(seeds), size=24) for _ in range(count)] for count in counts]
    before, stats_before = xla_compilation_count(), service.stats()
    for wave in range(0, 200, 8):  # 8 concurrent requests at a time: batches mix requests
        results = await asyncio.gather(*[service.encode(r) for r in requests[wave:wave + 8]])
        assert all(isinstance(ref, EmbeddingRef) for result in results for ref in result)
    stats = service.stats()
    assert xla_compilation_count() == before
    assert stats["compilations_after_warmup"] == 0
    assert stats["batched_items"] - stats_before["batched_items"] == counts.sum()
    used = [b for b, s in stats["buckets"].items() if s["batches"] > stats_before["buckets"][b]["batches"]]
    assert 8 in used and len(used) >= 2  # which smaller buckets run depends on timing


async def test_cache_evicts_by_bytes_and_frees_the_array(tiny_checkpoint):
    store = LocalObjectStore()
    small = EncoderService(EncoderConfig(model=str(tiny_checkpoint), strict_compile=True,
                                         encoder_cache_bytes=2 * ENTRY_BYTES + 100), store)
    try:
        images = [_noise_png(500 + i) for i in range(3)]
        [a] = await small.encode(images[:1])
        [b] = await small.encode(images[1:2])
        await small.encode(images[:1])  # touch a: b is now the least recently used
        [c] = await small.encode(images[2:])
        stats = small.stats()
        assert (stats["entries"], stats["bytes"], stats["evictions"]) == (2, 2 * ENTRY_BYTES, 1)
        with pytest.raises(EmbeddingLostError):
            store.get([b.object_ref])
        assert len(store.get([a.object_ref, c.object_ref])) == 2
        await small.encode(images[1:2])
        assert small.stats()["misses"] == 4 and small.stats()["hits"] == 1
        # an embedding lost while its entry lives: a plain encode hands out the stale
        # reference, a refresh computes it again
        [c_again] = await small.encode(images[2:])
        assert c_again.object_ref == c.object_ref
        [before] = store.get([c.object_ref])
        store.drop(c.object_ref)
        [fresh] = await small.encode(images[2:], refresh=True)
        assert fresh.object_ref != c.object_ref and fresh.meta == c.meta
        np.testing.assert_array_equal(store.get([fresh.object_ref])[0], before)
        assert small.stats()["forgotten"] == 1 and small.stats()["misses"] == 5
    finally:
        small.close()
    assert not small.is_ready
    with pytest.raises(RuntimeError, match="closed"):
        await small.encode(images[:1])


async def test_a_service_failure_is_a_retryable_item_error(tiny_checkpoint):
    class FullStore(LocalObjectStore):
        def put(self, array):
            raise RuntimeError("object store is full")

    broken = EncoderService(EncoderConfig(model=str(tiny_checkpoint), strict_compile=True), FullStore())
    try:
        image = _noise_png(600)
        [result] = await broken.encode([image], request_id="r")
        assert isinstance(result, ItemError) and result.retryable
        assert result.message == "image 0 of request r: encoding failed (object store is full)"
        assert broken.stats()["entries"] == 0  # nothing cached: the next try computes again
        [again] = await broken.encode([image])
        assert isinstance(again, ItemError) and broken.stats()["misses"] == 2
    finally:
        broken.close()


async def test_ready_after_the_largest_bucket_and_the_rest_compile_when_idle(tiny_checkpoint, service,
                                                                             store):
    """Without full_warmup the encoder serves on its largest bucket at once; the others compile
    while the batcher is idle, never inside a step (strict guard), and the embeddings are the
    same whichever bucket ran them."""
    import time

    mine = LocalObjectStore()
    quick = EncoderService(EncoderConfig(model=str(tiny_checkpoint), strict_compile=True), mine)
    try:
        stats = quick.stats()
        assert stats["graphs_planned"] == 4 and stats["graphs_compiled"] >= 1
        images = [_noise_png(900 + i) for i in range(3)]
        early = mine.get([ref.object_ref for ref in await quick.encode(images)])
        deadline = time.monotonic() + 120
        while quick.stats()["graphs_compiled"] < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert quick.stats()["graphs_compiled"] == 4
        late = mine.get([ref.object_ref for ref in await quick.encode(images, refresh=True)])
        reference = store.get([ref.object_ref for ref in await service.encode(images)])
        for first, second, third in zip(early, late, reference):
            np.testing.assert_allclose(first, second, atol=1e-5)
            np.testing.assert_allclose(first, third, atol=1e-5)
        assert quick.stats()["compilations_after_warmup"] == 0
    finally:
        quick.close()


def test_a_service_with_every_bucket_compiled_retires_its_idle_work_cleanly(tiny_checkpoint, caplog):
    """The batcher's thread asks for idle work from its start, before the service has stored
    the batcher; with nothing left to compile that first ask must not fail."""
    import logging
    import time

    with caplog.at_level(logging.ERROR, logger="encoder_service.batcher"):
        one = EncoderService(EncoderConfig(model=str(tiny_checkpoint), strict_compile=True,
                                           max_batch_items=1), LocalObjectStore())
        try:
            deadline = time.monotonic() + 5
            while one._batcher._on_idle is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert one._batcher._on_idle is None  # retired: nothing left to compile
            assert one.stats()["graphs_compiled"] == 1
        finally:
            one.close()
    assert not [r for r in caplog.records if "idle work failed" in r.getMessage()]
