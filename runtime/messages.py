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
MAX_LOGIT_BIAS = 300  # entries of `logit_bias` (OpenAI's own limit)
MAX_STOP_TOKEN_IDS = 8


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: `json_object` (any JSON object) or `json_schema` (one that validates
    against `schema`, a JSON Schema as canonical JSON text: the grammar cache's key)."""

    kind: str  # "json_object" or "json_schema"
    schema: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema"):
            raise RequestError(f"response_format.type: {self.kind!r} is not json_object or "
                               "json_schema")
        if self.kind == "json_schema" and not self.schema:
            raise RequestError("response_format.json_schema.schema: required for json_schema")


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
    # Penalties as in vLLM: repetition divides positive / multiplies negative logits of every
    # token seen (prompt or output); frequency and presence subtract per output occurrence / once.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are out
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    response_format: ResponseFormat | None = None

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

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
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {len(self.stop_token_ids)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], "
                                    f"got {self.min_tokens!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"token {token}: bias must be in [-100, 100], got {bias!r}")


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
