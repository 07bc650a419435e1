"""LLaVA-NeXT (anyres) in the encoder: tiles are items, packing is a host-built gather, and the
embeddings equal transformers' `LlavaNextModel.get_image_features` (eager fp32)."""

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_service.anyres import AnyresLayout, pack
from encoder_service.config import EncoderConfig
from encoder_service.service import EncoderService
from runtime.checkpoint import open_checkpoint
from runtime.image_key import preprocess_fingerprint
from runtime.object_store import LocalObjectStore

TOLERANCE = 1e-4
# (width, height): square, 2:1, 1:2, 3:1, a single pixel, and two odd shapes.
SHAPES = [(96, 96), (160, 80), (70, 140), (240, 80), (1, 1), (333, 101), (45, 290)]


def _photo(size, seed):
    rng = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_features(reference, images):
    processor, model = reference
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        return [f.numpy() for f in model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output]


@pytest.fixture(scope="module")
def layout(next_checkpoint):
    return AnyresLayout.of(open_checkpoint(str(next_checkpoint)).config)


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 128), (192, 64), (64, 192), (1, 1),
                                  (1000, 3), (3, 1000), (500, 499), (137, 61)])
def test_pack_index_is_transformers_pack(layout, reference_llava_next, size):
    """The host-built gather equals `pack_image_features` (view, permute, unpad, newline, base
    first) on random tile features, and its length is the processor's own placeholder count."""
    processor, model = reference_llava_next
    height, width = size
    num_tiles = layout.num_tiles((height, width))
    rng = np.random.default_rng(height * 7919 + width)
    features = rng.standard_normal((num_tiles, layout.tokens_per_tile, 64)).astype(np.float32)
    newline = model.model.image_newline.detach().numpy()
    (expected,), _ = model.model.pack_image_features(
        [torch.from_numpy(features)], torch.tensor([[height, width]]), "default",
        image_newline=model.model.image_newline.detach())
    np.testing.assert_array_equal(pack(layout, list(features), newline, (height, width)),
                                  expected.numpy())
    placeholders = processor(text="<image>", images=[Image.new("RGB", (width, height))])["input_ids"][0]
    assert layout.num_tokens((height, width)) == placeholders.count(processor.image_token_id)


def test_the_grid_configuration_is_part_of_the_image_key(next_checkpoint):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(next_checkpoint)
    fewer = AutoImageProcessor.from_pretrained(
        next_checkpoint, image_grid_pinpoints=processor.image_grid_pinpoints[:3])
    assert preprocess_fingerprint(processor) != preprocess_fingerprint(fewer)


def _service(checkpoint, store=None):
    config = EncoderConfig(model=str(checkpoint), strict_compile=True, full_warmup=True,
                           max_batch_items=8, batch_wait_s=0.05)
    return EncoderService(config, store or LocalObjectStore())


def test_tiles_of_concurrent_requests_batch_and_match_transformers(
        next_checkpoint, tiny_checkpoint, reference_llava_next):
    images = [_photo(size, seed) for seed, size in enumerate(SHAPES)]
    expected = _reference_features(reference_llava_next, images)
    assert len({e.shape[0] for e in expected}) >= 5  # the token counts really differ

    llava = _service(tiny_checkpoint)  # the LLaVA-1.5 path, same tower and buckets
    llava_graphs = llava.stats()["warmup_compilations"]
    llava.close()
    store = LocalObjectStore()
    service = _service(next_checkpoint, store)
    try:
        stats = service.stats()
        assert stats["graphs_compiled"] == len(service.config.buckets)
        assert stats["warmup_compilations"] <= llava_graphs

        async def requests():  # one request per image, all at once
            return await asyncio.gather(*(service.encode([_png(image)], f"req-{i}")
                                          for i, image in enumerate(images)))

        refs = [r for (r,) in asyncio.run(requests())]
        tiles = sum(AnyresLayout.of(open_checkpoint(str(next_checkpoint)).config).num_tiles(
            (image.height, image.width)) for image in images)
        after = service.stats()
        assert after["batched_items"] == tiles
        assert after["batches"] < tiles / 2  # tiles of different requests shared steps
        for ref, want, got in zip(refs, expected, store.get([r.object_ref for r in refs])):
            assert ref.meta.num_tokens == want.shape[0] == got.shape[0]
            np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)

        # A workload of random shapes and counts compiles nothing new.
        rng = np.random.default_rng(5)
        for round_ in range(3):
            batch = [_png(_photo((int(rng.integers(1, 400)), int(rng.integers(1, 400))), 100 + i))
                     for i in range(int(rng.integers(1, 4)))]
            results = asyncio.run(service.encode(batch, f"random-{round_}"))
            assert all(r.meta.num_tokens > 0 for r in results)
        assert service.stats()["compilations_after_warmup"] == 0
    finally:
        service.close()
