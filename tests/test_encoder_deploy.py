"""The encoder as a Ray Serve deployment: refs through a handle, arrays through Ray's object store."""

import io

import numpy as np
from PIL import Image

from deploy.encoder import EncoderDeployment
from encoder_service.config import EncoderConfig
from runtime.messages import EmbeddingRef, ItemError


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoder_deployment_serves_refs_to_the_object_store(ray_serve, tiny_checkpoint, photos):
    import ray
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = EncoderConfig(model=str(tiny_checkpoint), strict_compile=True)
    handle = ray_serve.run(EncoderDeployment.bind(config), name="encoder-test", route_prefix=None)
    try:
        results = handle.encode.remote([_png(photos[0]), b"junk", _png(photos[1])], "wired").result()
        assert isinstance(results[1], ItemError) and results[1].message.startswith("image 1 of request wired")
        refs = [results[0], results[2]]
        assert all(isinstance(r, EmbeddingRef) and isinstance(r.object_ref, ray.ObjectRef) for r in refs)
        arrays = ray.get([r.object_ref for r in refs])

        processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
        model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
        pixels = processor(images=photos[:2], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=pixels).pooler_output
        for array, features in zip(arrays, expected):
            assert array.shape == (16, 64)
            assert np.abs(array - features.numpy()).max() < 1e-4

        info = handle.info.remote().result()
        assert (info["model_id"], info["hidden_size"], info["tokens_per_image"]) == (
            str(tiny_checkpoint), 64, 16)
        stats = handle.stats.remote().result()  # three misses: the junk item is one too
        assert stats["misses"] == 3 and stats["compilations_after_warmup"] == 0
        again = handle.encode.remote([_png(photos[0])]).result()
        assert again[0].meta == refs[0].meta and handle.stats.remote().result()["hits"] == 1
    finally:
        ray_serve.delete("encoder-test")


def test_build_validates_the_config_and_health_follows_the_service(tiny_checkpoint):
    import pytest

    from deploy.encoder import EncoderServer, build_encoder_app

    with pytest.raises(ValueError, match="max_batch_items"):
        build_encoder_app({"model": str(tiny_checkpoint), "max_batch_items": 0})
    server = EncoderServer({"model": str(tiny_checkpoint)})  # warm when constructed
    server.check_health()
    server.service.close()
    with pytest.raises(RuntimeError, match="not running"):
        server.check_health()
