"""Encoder pieces that need neither a device nor Ray: config, keys, cache, batcher, preprocessing."""

import io
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image

from encoder_service.batcher import Batcher, BatcherClosed
from encoder_service.cache import EmbeddingCache
from encoder_service.config import EncoderConfig
from encoder_service.preprocess import ImageRejected, Preprocessor, load_image_processor
from encoder_service.vision_model import feature_layer_indices
from runtime.image_key import image_cache_key, preprocess_fingerprint
from runtime.messages import EmbeddingMeta, EmbeddingMismatchError, EmbeddingRef


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ref(key: str) -> EmbeddingRef:
    return EmbeddingRef(EmbeddingMeta(key, 16, 64, "float32", "m"), object_ref=key)


# --- config ---------------------------------------------------------------------------------

def test_config_derives_buckets_and_is_frozen():
    assert EncoderConfig(model="m").buckets == (1, 2, 4, 8)
    config = EncoderConfig(model="m", max_batch_items=6)
    assert config.buckets == (1, 2, 4, 6)
    with pytest.raises(AttributeError):
        config.max_batch_items = 16


@pytest.mark.parametrize("field, value", [
    ("model", ""), ("device", "tpu"), ("max_batch_items", 0), ("batch_wait_s", -0.1),
    ("encoder_cache_bytes", -1), ("max_image_bytes", 0), ("max_image_pixels", 1.5),
    ("preprocess_threads", 0), ("max_batch_items", True),
    ("batch_max_wait_s", 0.001), ("batch_max_wait_s", 2.0), ("batch_max_wait_s", "soon")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**{"model": "m", field: value})


# --- image keys -----------------------------------------------------------------------------

def test_transposed_shapes_with_the_same_pixel_bytes_get_different_keys():
    pixels = np.random.default_rng(0).integers(0, 256, 30 * 150 * 3, dtype=np.uint8).tobytes()
    wide = Image.frombytes("RGB", (150, 30), pixels)
    tall = Image.frombytes("RGB", (30, 150), pixels)
    assert wide.tobytes() == tall.tobytes()
    assert image_cache_key(_png(wide), "m", "fp") != image_cache_key(_png(tall), "m", "fp")


def test_key_covers_model_and_preprocessing_and_is_length_prefixed():
    key = image_cache_key(b"image", "model", "fp")
    assert len(key) == 64 and int(key, 16) >= 0  # 256 bits, hex
    assert key == image_cache_key(b"image", "model", "fp")
    assert key != image_cache_key(b"image", "model2", "fp")
    assert key != image_cache_key(b"image", "model", "fp2")
    # Moving bytes across a boundary must change the key.
    assert image_cache_key(b"ab", "c", "fp") != image_cache_key(b"a", "bc", "fp")
    assert image_cache_key(b"a", "b", "cfp") != image_cache_key(b"a", "bc", "fp")


def test_fingerprint_follows_the_processor_config_not_the_loading_route(tiny_checkpoint):
    from transformers import AutoImageProcessor, AutoProcessor

    direct = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    via_processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    assert preprocess_fingerprint(direct) == preprocess_fingerprint(via_processor)
    changed = AutoImageProcessor.from_pretrained(tiny_checkpoint, crop_size={"height": 32, "width": 32})
    assert preprocess_fingerprint(changed) != preprocess_fingerprint(direct)
    assert len(preprocess_fingerprint(direct)) == 64


# --- embedding metadata -----------------------------------------------------------------------

def test_embedding_meta_round_trips_through_msgpack_and_checks_its_model():
    meta = EmbeddingMeta("ab" * 32, 576, 4096, "float32", "llava-hf/llava-1.5-7b-hf")
    assert EmbeddingMeta.unpack(meta.pack()) == meta
    meta.check_compatible("llava-hf/llava-1.5-7b-hf", 4096)
    with pytest.raises(EmbeddingMismatchError, match="made by model 'llava-hf/llava-1.5-7b-hf'"):
        meta.check_compatible("other/model", 4096)
    with pytest.raises(EmbeddingMismatchError, match="hidden size 4096, the model needs 5120"):
        meta.check_compatible("llava-hf/llava-1.5-7b-hf", 5120)


# --- cache ----------------------------------------------------------------------------------

def _fill(cache: EmbeddingCache, key: str, nbytes: int) -> EmbeddingRef:
    claim = cache.claim(key)
    assert claim.owner
    cache.fulfil(key, _ref(key), nbytes)
    return claim.future.result(timeout=1)


def test_cache_evicts_least_recently_used_by_bytes():
    evicted = []
    cache = EmbeddingCache(capacity_bytes=10, on_evict=evicted.append)
    _fill(cache, "a", 4)
    _fill(cache, "b", 4)
    assert cache.claim("a").ref.object_ref == "a"  # a hit makes "a" the most recent
    _fill(cache, "c", 4)  # 12 > 10 bytes: the least recent ("b") goes
    assert [ref.object_ref for ref in evicted] == ["b"]
    assert "a" in cache and "c" in cache and "b" not in cache
    stats = cache.stats()
    assert (stats["bytes"], stats["entries"], stats["evictions"], stats["hits"]) == (8, 2, 1, 1)
    _fill(cache, "d", 9)  # needs both others gone
    assert stats["misses"] + 1 == cache.stats()["misses"]
    assert cache.stats()["entries"] == 1 and [r.object_ref for r in evicted] == ["b", "a", "c"]


def test_forget_drops_an_entry_and_frees_its_bytes():
    dropped = []
    cache = EmbeddingCache(capacity_bytes=10, on_evict=dropped.append)
    _fill(cache, "a", 4)
    assert cache.forget("a") and not cache.forget("a") and not cache.forget("never")
    assert [r.object_ref for r in dropped] == ["a"]
    stats = cache.stats()
    assert (stats["bytes"], stats["entries"], stats["forgotten"], stats["evictions"]) == (0, 0, 1, 0)
    assert cache.claim("a").owner  # computed again


def test_entry_larger_than_the_budget_is_not_kept_but_still_delivered():
    cache = EmbeddingCache(capacity_bytes=0)
    assert _fill(cache, "big", 100).object_ref == "big"
    assert "big" not in cache and cache.stats()["bytes"] == 0
    assert cache.claim("big").owner  # computed again next time


def test_single_flight_joins_then_fails_without_caching():
    cache = EmbeddingCache(capacity_bytes=1000)
    owner, joiner = cache.claim("k"), cache.claim("k")
    assert owner.owner and not joiner.owner and joiner.future is owner.future
    cache.fail("k", ImageRejected("broken"))
    with pytest.raises(ImageRejected):
        joiner.future.result(timeout=1)
    assert cache.stats()["single_flight_joins"] == 1 and "k" not in cache
    assert cache.claim("k").owner  # a failure is not remembered


# --- batcher --------------------------------------------------------------------------------

class _Recorder:
    def __init__(self, delay_s=0.0):
        self.sizes = []
        self.delay_s = delay_s

    def __call__(self, items):
        self.sizes.append(len(items))
        time.sleep(self.delay_s)
        if "boom" in items:
            raise RuntimeError("device fell over")
        return [item * 2 for item in items]


def test_batcher_gathers_concurrent_callers_into_one_batch():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_items=8, wait_s=0.5)
    futures = []
    threads = [threading.Thread(target=lambda i=i: futures.append(batcher.submit(i))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(f.result(timeout=5) for f in futures) == [0, 2, 4]
    assert recorder.sizes == [3]
    batcher.close()


def test_batcher_splits_a_burst_over_full_batches():
    recorder = _Recorder(delay_s=0.05)
    batcher = Batcher(recorder, max_items=8, wait_s=0.01)
    futures = [batcher.submit(i) for i in range(20)]
    assert [f.result(timeout=5) for f in futures] == [2 * i for i in range(20)]
    assert sum(recorder.sizes) == 20 and max(recorder.sizes) == 8 and len(recorder.sizes) >= 3
    batcher.close()


def test_batcher_wait_is_bounded():
    batcher = Batcher(_Recorder(), max_items=8, wait_s=0.05)
    began = time.monotonic()
    assert batcher.submit(21).result(timeout=5) == 42
    assert time.monotonic() - began < 1.0
    batcher.close()


def _stragglers(batcher, items, spacing_s, on_their_way=None):
    """Submits `items` one after another, `spacing_s` apart, each leaving `on_their_way` (if
    given) as it goes (what an encoder's preprocessing threads do)."""
    futures = []

    def run():
        for item in items:
            time.sleep(spacing_s)
            futures.append(batcher.submit(item))
            if on_their_way is not None:
                on_their_way[0] -= 1

    thread = threading.Thread(target=run)
    thread.start()
    return thread, futures


def test_a_batch_gathers_until_items_stop_arriving():
    """`wait_s` is a quiet time: items 30 ms apart with `wait_s` 100 ms keep one batch open
    past `wait_s` after its first item; `max_wait_s` closes it whatever still arrives."""
    recorder = _Recorder()
    batcher = Batcher(recorder, max_items=8, wait_s=0.1, max_wait_s=0.3)
    first = batcher.submit(0)
    thread, futures = _stragglers(batcher, [1, 2, 3, 4], 0.03)
    thread.join()
    assert [f.result(timeout=5) for f in [first, *futures]] == [0, 2, 4, 6, 8]
    assert recorder.sizes == [5]
    recorder.sizes.clear()
    first = batcher.submit(0)
    thread, futures = _stragglers(batcher, list(range(1, 8)), 0.08)  # 7 x 80 ms > 300 ms
    thread.join()
    assert [f.result(timeout=5) for f in [first, *futures]] == [2 * i for i in range(8)]
    assert len(recorder.sizes) >= 2 and sum(recorder.sizes) == 8
    batcher.close()


def test_a_max_wait_below_the_quiet_time_is_refused():
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(_Recorder(), max_items=8, wait_s=0.1, max_wait_s=0.05)


def test_a_batch_waits_for_items_on_their_way():
    """Items arriving 20 ms apart, four times `wait_s`: without `incoming` each would be a
    batch of its own; counted as on their way, they join the first one."""
    recorder = _Recorder()
    on_their_way = [4]
    batcher = Batcher(recorder, max_items=8, wait_s=0.005, incoming=lambda: on_their_way[0],
                      max_wait_s=2.0)
    first = batcher.submit(0)
    thread, futures = _stragglers(batcher, [1, 2, 3, 4], 0.02, on_their_way)
    thread.join()
    assert [f.result(timeout=5) for f in [first, *futures]] == [0, 2, 4, 6, 8]
    assert recorder.sizes == [5]
    batcher.close()


def test_waiting_for_items_on_their_way_is_bounded():
    """An item that never comes (its preprocessing failed, uncounted) holds the batch only up
    to `max_wait_s` after its first item; a batch with nothing on its way waits `wait_s`."""
    recorder = _Recorder()
    on_their_way = [1]
    batcher = Batcher(recorder, max_items=8, wait_s=0.005, incoming=lambda: on_their_way[0],
                      max_wait_s=0.2)
    began = time.monotonic()
    assert batcher.submit(1).result(timeout=5) == 2
    waited = time.monotonic() - began
    assert 0.2 <= waited < 1.0
    on_their_way[0] = 0
    began = time.monotonic()
    assert batcher.submit(2).result(timeout=5) == 4
    assert time.monotonic() - began < 0.15
    assert recorder.sizes == [1, 1]
    batcher.close()


def test_items_on_their_way_stop_being_waited_for_when_the_count_drops():
    """The count falling to zero (the last straggler failed) ends the wait at once, long
    before `max_wait_s`."""
    recorder = _Recorder()
    on_their_way = [1]
    batcher = Batcher(recorder, max_items=8, wait_s=0.005, incoming=lambda: on_their_way[0],
                      max_wait_s=5.0)
    threading.Timer(0.1, lambda: on_their_way.__setitem__(0, 0)).start()
    began = time.monotonic()
    assert batcher.submit(1).result(timeout=5) == 2
    assert time.monotonic() - began < 1.0
    batcher.close()


def test_a_failed_batch_fails_only_its_items():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_items=2, wait_s=0.2)
    bad = [batcher.submit("boom"), batcher.submit("x")]
    good = batcher.submit("y")
    with pytest.raises(RuntimeError, match="device fell over"):
        bad[0].result(timeout=5)
    with pytest.raises(RuntimeError):
        bad[1].result(timeout=5)
    assert good.result(timeout=5) == "yy"
    assert batcher.is_alive
    batcher.close()
    assert not batcher.is_alive
    with pytest.raises(BatcherClosed):
        batcher.submit(1).result(timeout=1)


def test_cancelled_items_give_up_their_rows():
    gate = threading.Event()
    recorder = _Recorder()
    batcher = Batcher(lambda items: (gate.wait(5), recorder(items))[1], max_items=4, wait_s=0.0)
    first = batcher.submit(1)  # occupies the worker until the gate opens
    time.sleep(0.1)
    cancelled, kept = batcher.submit(2), batcher.submit(3)
    assert cancelled.cancel()
    gate.set()
    assert first.result(timeout=5) == 2 and kept.result(timeout=5) == 6
    assert recorder.sizes == [1, 1]
    batcher.close()


# --- preprocessing --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocessor(tiny_checkpoint):
    return Preprocessor(load_image_processor(tiny_checkpoint), 64, max_image_bytes=200_000,
                        max_image_pixels=1_000_000)


def test_preprocessing_matches_the_checkpoint_processor(preprocessor, photos, tiny_checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    rgba = photos[1].resize((120, 80)).convert("RGBA")
    rgba.putalpha(90)  # transparency is composited onto white, as transformers does
    for image in (photos[1].resize((120, 80)), rgba):
        expected = processor(images=[image], return_tensors="np")["pixel_values"][0]
        pixels = preprocessor(_png(image))
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_bad_images_are_rejected_with_the_reason(preprocessor, photos):
    good = _png(photos[0].resize((100, 100)))
    with pytest.raises(ImageRejected, match="not a decodable image.*truncated"):
        preprocessor(good[: len(good) // 2])
    with pytest.raises(ImageRejected, match="not an image in a format PIL can read"):
        preprocessor(b"definitely not an image")
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    with pytest.raises(ImageRejected, match=r"bytes is over the limit of 200000 bytes \(max_image_bytes\)"):
        preprocessor(_png(noise))


def test_a_pixel_bomb_is_refused_from_its_header(preprocessor, monkeypatch):
    bomb = _png(Image.new("L", (2000, 1000)))  # 2M pixels in a few kB
    assert len(bomb) < 20_000
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageRejected, match=r"2000x1000 = 2000000 pixels .*max_image_pixels"):
        preprocessor(bomb)


def test_a_processor_failure_rejects_the_image():
    class Picky:  # a processor that cannot handle 5x5 images
        def __call__(self, images, return_tensors):
            if images[0].size == (5, 5):
                raise ValueError("too small to crop")
            return {"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}

    preprocessor = Preprocessor(Picky(), 8, max_image_bytes=10_000, max_image_pixels=10_000)
    assert preprocessor(_png(Image.new("RGB", (6, 6)))).shape == (3, 8, 8)
    with pytest.raises(ImageRejected, match=r"could not be preprocessed \(ValueError: too small to crop\)"):
        preprocessor(_png(Image.new("RGB", (5, 5))))


def test_feature_layers_resolve_to_absolute_hidden_state_indices():
    assert feature_layer_indices(-2, 24) == (23,)
    assert feature_layer_indices([-1, 0, 5], 12) == (12, 0, 5)
    with pytest.raises(ValueError, match="outside a tower of 12 layers"):
        feature_layer_indices(-14, 12)


@pytest.mark.parametrize("layers, strategy", [(-1, "full"), ([-3, -1], "default"), (-2, "full")])
def test_vision_encoder_honours_feature_layers_and_strategy(tiny_checkpoint, tmp_path, layers, strategy):
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from encoder_service.vision_model import load_vision_encoder
    from runtime.checkpoint import open_checkpoint

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.vision_feature_layer, config.vision_feature_select_strategy = layers, strategy
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path)
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    encoder = load_vision_encoder(open_checkpoint(str(tmp_path)))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack(list(reference.get_image_features(pixel_values=pixels).pooler_output))
        got = encoder(pixels)
    assert got.shape == (2, encoder.tokens_per_image, 64)
    assert encoder.tokens_per_image == (17 if strategy == "full" else 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batcher_runs_idle_work_between_batches_and_survives_its_failure():
    import threading
    import time

    from encoder_service.batcher import Batcher

    done, idle_calls = threading.Event(), []

    def on_idle():
        idle_calls.append(time.monotonic())
        if len(idle_calls) == 3:
            done.set()
            return False  # nothing left: the worker waits for items
        return True

    batcher = Batcher(lambda items: [i * 2 for i in items], max_items=4, wait_s=0.0, on_idle=on_idle)
    try:
        assert done.wait(5) and len(idle_calls) == 3
        assert batcher.submit(21).result(timeout=5) == 42

        def broken():
            raise RuntimeError("idle work broke")
        failing = Batcher(lambda items: items, max_items=2, wait_s=0.0, on_idle=broken)
        assert failing.submit("still served").result(timeout=5) == "still served"
        failing.close()
    finally:
        batcher.close()


def test_batcher_stops_asking_an_idle_hook_that_retired(monkeypatch):
    import threading

    from encoder_service import batcher as batcher_module
    from encoder_service.batcher import Batcher

    monkeypatch.setattr(batcher_module, "IDLE_POLL_S", 0.01)
    calls, retired = [], threading.Event()

    def on_idle():
        calls.append(1)
        if len(calls) == 2:  # declined once (asked again after a poll), then done for good
            batcher.retire_idle_work()
            retired.set()
        return False

    batcher = Batcher(lambda items: [i + 1 for i in items], max_items=2, wait_s=0.0, on_idle=on_idle)
    try:
        assert retired.wait(5)
        threading.Event().wait(0.2)  # 20 polls' worth of idling
        assert len(calls) == 2
        assert batcher.submit(1).result(timeout=5) == 2  # still serving
        threading.Event().wait(0.05)
        assert len(calls) == 2
    finally:
        batcher.close()
