"""Decoder configuration (what the user sets) and shapes (the buckets derived from it).

`DecoderShapes` is the single list of padded sizes: warm-up compiles exactly
these graphs, and the runtime pads to the same lists with
`runtime.buckets.pad_to_bucket`. Three graph families (docs/decoder.md):

- decode: (sequences per step, KV blocks attended per sequence);
- prefill: (chunk tokens per step, KV blocks of context over the step's prompts);
- mixed: a full decode batch (the largest batch bucket; half a batch or more pads up to it)
  and prompt chunks in one graph,
  keyed (chunk tokens, KV blocks): the chunk buckets a step that decodes may carry, and
  one blocks bucket for both halves, at least the longest decode context and the chunks'
  context. A mixed step on two graphs reads every weight twice and pays two calls' fixed
  cost; one graph saves 40-48 ms of 137-209 on this CPU (`decoder_bench.py --mixed`).
  Sharing the blocks bucket keeps the family two-dimensional; it takes decode's buckets,
  midpoints included (the decodes' attention is most of what it pads: the same step on
  32 blocks instead of 24 took 115 vs 97 ms), from `DECODE_MIDPOINTS_FROM` blocks up, and
  the chunk buckets from the second (a small chunk or context padded up beside a full
  batch costs little), with 1.5x midpoints (`mixed_chunk_midpoints`): a question asked
  about a cached image leaves a chunk of ~41 tokens, and on this CPU the step costs what
  its padded chunk holds (16 decodes plus 41 tokens: 125 ms in a 48-token graph, 137 in
  the 64-token one; 82 tokens: 163 vs 192 ms in 96 vs 128). Optional: a step with no
  compiled mixed graph that fits runs its two graphs.

Decode's KV-block buckets have 1.5x midpoints from `DECODE_MIDPOINTS_FROM` blocks on:
attention (the paged gather and its two products) is 25-40 % of a decode step and
scales with the blocks attended, and contexts just past a power of two (a 300-token
prompt: 19 blocks) padded to the next one attended up to twice what they hold. Only
for batches of `DECODE_MIDPOINT_BATCH` sequences or more: attention scales with the
batch too, and below it a midpoint saved at most 1 ms of a 19-28 ms step on this CPU
(4 sequences: 1.2-3.0 ms of 26-34; 8: 1.9-7.0 of 33-56), and nothing on a TPU, where
a small batch reads the weights; each would cost a graph per block bucket. Prefill
keeps plain powers of two: its cost is mostly the chunk's tokens, not its context.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.buckets import pad_to_bucket, power_of_two_buckets

DEFAULT_KV_CACHE_BYTES = 256 * 2**20
DECODE_MIDPOINTS_FROM = 8  # blocks; below it a midpoint saves little and costs a graph per batch
DECODE_MIDPOINT_BATCH = 4  # sequences; smaller decode batches pad to plain powers of two


@dataclass(frozen=True)
class DecoderConfig:
    model: str
    device: str = "xla"
    dtype: str = "float32"
    max_num_seqs: int = 8  # sequences decoded together (the decode batch's largest bucket)
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES  # the paged KV pool, all layers, keys + values
    block_size: int = 16  # tokens per KV block
    max_num_batched_tokens: int = 256  # decode tokens + prefill chunk tokens per engine step
    # Prefill tokens a step that also decodes may carry (None: half of max_num_batched_tokens).
    # A step's chunk stalls every running stream for its duration: this bounds that stall, while
    # a step with nothing decoding still prefills a whole budget.
    max_chunk_tokens_while_decoding: int | None = None
    # A graph call this many times slower than the graph's best means another process computes
    # on the same cores (the encoder beside the decoder on a CPU host): the cap above halves
    # until a call runs faster; on a CPU host it also halves for a step before which other
    # threads were runnable on every core (decoder_service/graph_times.py). None: the cap never
    # changes.
    contended_slowdown: float | None = 1.4
    max_prefill_seqs: int = 4  # prompts whose chunks share one prefill graph
    max_images_per_request: int = 4
    min_chunk_tokens: int = 16  # smallest prefill-chunk bucket
    min_attention_len: int = 32  # smallest attended-context bucket, in tokens
    enable_prefix_caching: bool = True
    mixed_graphs: bool = True  # half a decode batch or more and its step's chunks share one graph
    # The mixed family's chunk buckets also at 1.5x each (48, 96, ...): on a CPU host a mixed
    # step costs what its padded chunk holds. On a TPU such a step is bound by reading the
    # weights, padding costs little, and the TPU config leaves them out (fewer graphs).
    mixed_chunk_midpoints: bool = True
    full_warmup: bool = False  # compile every graph before serving (else: the covering prefill)
    background_compile_share: float = 0.1  # under load, at most this share of time compiling
    strict_compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_prefill_seqs",
                     "max_images_per_request", "min_chunk_tokens", "min_attention_len",
                     "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed "
                             f"max_num_seqs ({self.max_num_seqs}): a step with every sequence "
                             "decoding must leave room for a prefill chunk")
        if self.min_chunk_tokens > self.max_num_batched_tokens:
            raise ValueError(f"min_chunk_tokens ({self.min_chunk_tokens}) must be <= "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens})")
        cap = self.max_chunk_tokens_while_decoding
        if cap is not None and not 1 <= cap <= self.max_num_batched_tokens:
            raise ValueError(f"max_chunk_tokens_while_decoding must be between 1 and "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens}), got {cap}")
        if self.contended_slowdown is not None and (
                not isinstance(self.contended_slowdown, (int, float)) or self.contended_slowdown <= 1):
            raise ValueError(f"contended_slowdown must be a number above 1 or None, got "
                             f"{self.contended_slowdown!r}")
        if not 0.0 <= self.background_compile_share <= 1.0:
            raise ValueError(f"background_compile_share must be in [0, 1], got "
                             f"{self.background_compile_share}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def chunk_tokens_while_decoding(self) -> int:
        return self.max_chunk_tokens_while_decoding or self.max_num_batched_tokens // 2


@dataclass(frozen=True)
class KVGeometry:
    """What one token of KV costs: the model's layers, KV heads, head size and dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    def block_bytes(self, block_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * block_size * self.dtype_bytes


@dataclass(frozen=True)
class DecoderShapes:
    max_model_len: int
    max_num_seqs: int
    max_prefill_seqs: int
    block_size: int
    num_blocks: int  # in the pool, the null block (0) included
    max_chunk_tokens: int  # prefill tokens one step may hold (less its decode tokens)
    decode_batch_buckets: tuple[int, ...]  # sequences per decode step
    decode_block_buckets: tuple[int, ...]  # KV blocks attended per sequence, large decode batches
    block_buckets: tuple[int, ...]  # KV blocks of context per prefill step
    chunk_buckets: tuple[int, ...]  # prefill tokens per step
    mixed_batch: int  # decode rows of a mixed graph (0: no mixed family)
    mixed_chunk_buckets: tuple[int, ...]  # prefill tokens of a mixed step
    mixed_block_buckets: tuple[int, ...]  # KV blocks of a mixed step (decodes' and chunks')

    @property
    def max_blocks_per_seq(self) -> int:
        return self.blocks_for(self.max_model_len)

    def blocks_for(self, positions: int) -> int:
        """KV blocks that hold `positions` positions (a context, or a chunk's end)."""
        return -(-positions // self.block_size)

    def decode_blocks_for(self, batch: int) -> tuple[int, ...]:
        """The KV-block buckets of decode graphs of `batch` sequences (a batch bucket): with
        midpoints from `DECODE_MIDPOINT_BATCH` sequences, plain powers of two below.

        >>> shapes = derive_shapes(DecoderConfig(model="m", max_model_len=256, max_num_seqs=4),
        ...                        256, KVGeometry(num_layers=2, num_kv_heads=1, head_dim=8, dtype_bytes=4))
        >>> shapes.decode_blocks_for(2), shapes.decode_blocks_for(4)
        ((2, 4, 8, 16), (2, 4, 8, 12, 16))
        """
        return _blocks_for_batch(batch, self.decode_block_buckets, self.block_buckets)

    def decode_graph_for(self, need: tuple[int, int]) -> tuple[int, int]:
        """The decode graph a step of `need` (sequences, blocks) pads to, every graph compiled."""
        batch = pad_to_bucket(need[0], self.decode_batch_buckets)
        return batch, pad_to_bucket(need[1], self.decode_blocks_for(batch))

    def decode_graphs(self) -> list[tuple[int, int]]:
        """(batch, blocks) pairs: every pair is reachable."""
        return [(b, k) for b in self.decode_batch_buckets for k in self.decode_blocks_for(b)]

    def prefill_graphs(self) -> list[tuple[int, int]]:
        """(chunk tokens, context blocks) pairs. A chunk's tokens sit in its context, so a pair
        is reachable only if the blocks can hold more tokens than the previous chunk bucket."""
        return self._chunk_pairs(self.chunk_buckets, self.block_buckets)

    def mixed_graphs(self) -> list[tuple[int, int]]:
        """(chunk tokens, KV blocks) pairs, with `mixed_batch` decode rows; reachable as for
        prefill (the blocks hold the chunk). Empty when the family is off."""
        if not self.mixed_batch:
            return []
        return self._chunk_pairs(self.mixed_chunk_buckets, self.mixed_block_buckets)

    def _chunk_pairs(self, chunk_buckets: tuple[int, ...],
                     block_buckets: tuple[int, ...]) -> list[tuple[int, int]]:
        pairs = []
        for i, tokens in enumerate(chunk_buckets):
            fewest = chunk_buckets[i - 1] + 1 if i else 1  # fewest real tokens of this bucket
            pairs += [(tokens, k) for k in block_buckets if k * self.block_size >= fewest]
        return pairs


def _blocks_for_batch(batch: int, with_midpoints: tuple[int, ...],
                      plain: tuple[int, ...]) -> tuple[int, ...]:
    """Decode's KV-block buckets at `batch` sequences (`DecoderShapes.decode_blocks_for`)."""
    return with_midpoints if batch >= DECODE_MIDPOINT_BATCH else plain


def mixed_chunk_buckets(chunk_buckets: tuple[int, ...], cap: int,
                        midpoints: bool) -> tuple[int, ...]:
    """The mixed family's chunk buckets: powers of two from the second prefill bucket, with
    1.5x midpoints if asked, up to the first that holds `cap` tokens.

    >>> mixed_chunk_buckets((16, 32, 64, 128, 256), 128, midpoints=True)
    (32, 48, 64, 96, 128)
    >>> mixed_chunk_buckets((16, 32, 64, 128, 256), 80, midpoints=True)
    (32, 48, 64, 96)
    >>> mixed_chunk_buckets((16, 32, 64, 128, 256), 80, midpoints=False)
    (32, 64, 128)
    """
    top = pad_to_bucket(cap, chunk_buckets)
    low = chunk_buckets[1] if len(chunk_buckets) > 1 else chunk_buckets[0]
    if low > top:
        return (top,)
    family = power_of_two_buckets(top, low, midpoints_from=low if midpoints else None)
    return family[:family.index(pad_to_bucket(cap, family)) + 1]


def derive_shapes(config: DecoderConfig, max_position_embeddings: int,
                  kv: KVGeometry, limit_name: str = "max_position_embeddings") -> DecoderShapes:
    """`max_position_embeddings`: the most positions the model serves (`limit_name` says
    which config field set them: `text_config.position_limit`)."""
    max_model_len = config.max_model_len or max_position_embeddings
    if max_model_len > max_position_embeddings:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's "
                         f"{limit_name} ({max_position_embeddings})")
    block_size = config.block_size
    max_blocks = -(-max_model_len // block_size)
    num_blocks = config.kv_cache_bytes // kv.block_bytes(block_size)
    if num_blocks - 1 < max_blocks:
        need = (max_blocks + 1) * kv.block_bytes(block_size)
        raise ValueError(f"kv_cache_bytes ({config.kv_cache_bytes}) holds {num_blocks} blocks of "
                         f"{block_size} tokens; one sequence of max_model_len {max_model_len} needs "
                         f"{max_blocks} plus the null block: at least {need} bytes")
    min_blocks = min(-(-config.min_attention_len // block_size), max_blocks)
    max_chunk = config.max_num_batched_tokens
    chunk_buckets = power_of_two_buckets(max_chunk, min(config.min_chunk_tokens, max_chunk))
    decode_block_buckets = power_of_two_buckets(max_blocks, min_blocks,
                                                midpoints_from=DECODE_MIDPOINTS_FROM)
    block_buckets = power_of_two_buckets(max_blocks, min_blocks)
    # The mixed family's decode rows are a full batch: its blocks follow decode's at that batch.
    mixed_blocks = _blocks_for_batch(config.max_num_seqs, decode_block_buckets, block_buckets)
    return DecoderShapes(
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_prefill_seqs=config.max_prefill_seqs,
        block_size=block_size,
        num_blocks=num_blocks,
        max_chunk_tokens=max_chunk,
        decode_batch_buckets=power_of_two_buckets(config.max_num_seqs),
        decode_block_buckets=decode_block_buckets,
        block_buckets=block_buckets,
        chunk_buckets=chunk_buckets,
        mixed_batch=config.max_num_seqs if config.mixed_graphs else 0,
        # A step that decodes carries at most the scheduler's cap of chunk tokens.
        mixed_chunk_buckets=mixed_chunk_buckets(
            chunk_buckets, min(config.chunk_tokens_while_decoding, max_chunk - 1),
            config.mixed_chunk_midpoints),
        mixed_block_buckets=tuple(k for k in mixed_blocks if k >= min(DECODE_MIDPOINTS_FROM, max_blocks)),
    )
