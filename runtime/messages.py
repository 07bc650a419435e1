"""Messages that cross deployments: encoder -> router -> decoder.

An image's embedding never travels through the router as a tensor. The encoder
puts the array in Ray's object store and hands out an `EmbeddingRef`: small,
msgpack-encodable metadata plus the `ObjectRef`. The decoder resolves the ref
itself and checks, before using it, that it was made for its model.

Errors that cross deployments say whose fault they are: `RequestError` is what the
client sent (an HTTP 400 whose message starts with the field); every other
exception a service raises is a server fault (a 5xx), `ValueError`s included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack

EMBEDDING_META_VERSION = 1


class RequestError(ValueError):
    """What the client sent is wrong (HTTP 400). The message starts with the field:
    `"max_tokens: must be a positive integer, got 0"`."""


class EmbeddingMismatchError(RuntimeError):
    """An embedding was made for another model, hidden size or placeholder count: the
    deployments disagree, a server fault (not a `ValueError`, never blamed on the client)."""


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


MAX_TOP_LOGPROBS = 5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, validated at construction (errors name the field)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None  # same seed, same output, whatever the batch neighbours
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> RequestError:
            return RequestError(f"{field}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise bad("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs=true")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be at most 8 non-empty strings")


@dataclass(frozen=True)
class GenerateRequest:
    """Router -> decoder: a tokenized prompt whose image placeholder runs are filled, in
    order, by the rows of `images`."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    images: tuple[EmbeddingRef, ...]
    sampling: SamplingParams

    @property
    def route_key(self) -> str | None:
        """The first image's key: where this prompt's KV prefix is cached (deploy/affinity.py)."""
        return self.images[0].meta.image_hash if self.images else None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), best first


@dataclass(frozen=True)
class GenerateChunk:
    """Decoder -> router, streamed: what one step added to one request."""

    request_id: str
    text: str  # new text (stop strings never leak into it)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # "stop", "length" or None while running
    prompt_tokens: int
    completion_tokens: int
