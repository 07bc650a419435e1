"""Messages that cross deployments: encoder -> router -> decoder.

An image's embedding never travels through the router as a tensor. The encoder
puts the array in Ray's object store and hands out an `EmbeddingRef`: small,
msgpack-encodable metadata plus the `ObjectRef`. The decoder resolves the ref
itself and checks, before using it, that it was made for its model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack

EMBEDDING_META_VERSION = 1


class EmbeddingMismatchError(ValueError):
    """An embedding was made for another model, hidden size or placeholder count."""


class EmbeddingLostError(RuntimeError):
    """The object holding an embedding is gone (its owner died or it was evicted). Retryable:
    encode the image again."""


@dataclass(frozen=True)
class EmbeddingMeta:
    image_hash: str  # hex digest of the encoder's cache key
    num_tokens: int  # rows of the embedding: image placeholder tokens it fills
    hidden_size: int  # columns: the language model's hidden size
    dtype: str  # torch dtype name, e.g. "float32"
    model_id: str  # which checkpoint's encoder made it

    def pack(self) -> bytes:
        return msgpack.packb({"v": EMBEDDING_META_VERSION, **asdict(self)})

    @classmethod
    def unpack(cls, data: bytes) -> EmbeddingMeta:
        fields = msgpack.unpackb(data)
        version = fields.pop("v", None)
        if version != EMBEDDING_META_VERSION:
            raise ValueError(f"embedding metadata version {version!r} is not {EMBEDDING_META_VERSION}")
        return cls(**fields)

    def check_compatible(self, model_id: str, hidden_size: int) -> None:
        if self.model_id != model_id:
            raise EmbeddingMismatchError(
                f"embedding {self.image_hash[:16]} was made by model {self.model_id!r}, "
                f"not {model_id!r}")
        if self.hidden_size != hidden_size:
            raise EmbeddingMismatchError(
                f"embedding {self.image_hash[:16]} has hidden size {self.hidden_size}, "
                f"the model needs {hidden_size}")


@dataclass(frozen=True)
class EmbeddingRef:
    """Metadata plus the Ray ObjectRef of the [num_tokens, hidden_size] array."""

    meta: EmbeddingMeta
    object_ref: Any  # ray.ObjectRef; typed loosely so this module does not import ray


@dataclass(frozen=True)
class ItemError:
    """One image item failed (undecodable, too large, ...); its neighbours did not."""

    index: int  # position of the item in the request
    message: str  # names the item and what is wrong with it, for the client
    retryable: bool = False
