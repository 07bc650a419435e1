"""Cache keys for images, shared by the encoder (which caches) and the router (which predicts).

An image's key is a blake2b-256 digest over its original encoded bytes, the model id
and a fingerprint of the preprocessing config. Each part is length-prefixed, so no
shift of bytes between parts gives the same input: two different files, or one file
under two models or two processor configs, never share a key. The file bytes include
the header, so a 30x150 and a 150x30 image with the same pixel bytes differ too.
"""

from __future__ import annotations

import hashlib
import json

_KEY_DOMAIN = b"splitserve.image-key.v1"


def _digest(parts: list[bytes]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def preprocess_fingerprint(image_processor) -> str:
    """Hex digest of the processor's class and config (its sorted JSON). Loading the same
    checkpoint through `AutoImageProcessor` or `AutoProcessor(...).image_processor` gives the
    same fingerprint; a different size, crop, mean, std, resample or backend does not."""
    config = {k: v for k, v in image_processor.to_dict().items()
              if not k.startswith("_") and k != "processor_class"}
    described = {"class": type(image_processor).__name__, "config": config}
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), default=repr)
    return _digest([b"splitserve.preprocess.v1", text.encode()])


def image_cache_key(image_bytes: bytes, model_id: str, fingerprint: str) -> str:
    """Hex blake2b-256 of (image bytes, model id, preprocessing fingerprint), length-prefixed."""
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
        raise TypeError(f"image_bytes must be bytes, got {type(image_bytes).__name__}")
    return _digest([_KEY_DOMAIN, bytes(image_bytes), model_id.encode(), fingerprint.encode()])
