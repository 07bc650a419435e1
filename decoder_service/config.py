"""Decoder configuration (what the user sets) and shapes (the buckets derived from it).

`DecoderShapes` is the single list of padded sizes: warm-up compiles exactly
these, and the runtime pads to them with `runtime.buckets.pad_to_bucket`.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.buckets import power_of_two_buckets


@dataclass(frozen=True)
class DecoderConfig:
    model: str
    device: str = "xla"
    dtype: str = "float32"
    max_num_seqs: int = 8  # KV-cache slots = requests decoded together
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_prefill_seqs: int = 4  # prompts packed into one prefill step
    max_prefill_images: int = 4  # images, over all packed prompts, in one prefill step
    min_prefill_tokens: int = 16
    min_attention_len: int = 32
    strict_compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_seqs", "max_prefill_images",
                     "min_prefill_tokens", "min_attention_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < self.min_prefill_tokens:
            raise ValueError(f"max_model_len ({self.max_model_len}) must be >= "
                             f"min_prefill_tokens ({self.min_prefill_tokens})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class DecoderShapes:
    max_model_len: int
    max_num_seqs: int
    max_prefill_seqs: int
    tokens_per_image: int
    prefill_token_buckets: tuple[int, ...]  # packed prompt tokens per prefill step
    prefill_image_buckets: tuple[int, ...]  # images per prefill step; 0 = text-only graph
    decode_batch_buckets: tuple[int, ...]  # sequences per decode step
    attention_len_buckets: tuple[int, ...]  # cache positions a decode step attends over

    @property
    def max_prefill_tokens(self) -> int:
        return self.prefill_token_buckets[-1]

    def prefill_graphs(self) -> list[tuple[int, int]]:
        """(tokens, images) pairs to compile: images never outnumber what the tokens can hold."""
        return [(t, i) for t in self.prefill_token_buckets for i in self.prefill_image_buckets
                if i * self.tokens_per_image <= t]

    def decode_graphs(self) -> list[tuple[int, int]]:
        return [(b, a) for b in self.decode_batch_buckets for a in self.attention_len_buckets]


def derive_shapes(config: DecoderConfig, max_position_embeddings: int,
                  tokens_per_image: int) -> DecoderShapes:
    max_model_len = config.max_model_len or max_position_embeddings
    if max_model_len > max_position_embeddings:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                         f"max_position_embeddings ({max_position_embeddings})")
    return DecoderShapes(
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_prefill_seqs=config.max_prefill_seqs,
        tokens_per_image=tokens_per_image,
        prefill_token_buckets=power_of_two_buckets(max_model_len, config.min_prefill_tokens),
        prefill_image_buckets=(0, *power_of_two_buckets(config.max_prefill_images)),
        decode_batch_buckets=power_of_two_buckets(config.max_num_seqs),
        attention_len_buckets=power_of_two_buckets(
            max_model_len, min(config.min_attention_len, max_model_len)),
    )
