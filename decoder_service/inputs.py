"""Host-side step inputs: numpy arrays padded to the step's buckets.

Everything a graph needs is decided here, on the host, and moved to the device in
one go by the runner. Padded rows are harmless by construction: they write into
the null block (block 0, what the zeros of `padding` name), their queries belong
to no sequence, and their sampled tokens are never read.

Image features reach the prefill graph as `image_rows`, aligned with the chunk's
tokens: row t is the embedding row for token t when `is_image[t]`, else zeros.
The host picks the rows by offset, so a chunk may start or end inside an image;
the device does one `where`, with no shape that depends on where images are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from decoder_service.config import DecoderShapes
from decoder_service.sampler import SamplingRows
from decoder_service.scheduler import Chunk
from decoder_service.sequence import Sequence

NO_SEQ_QUERY, NO_SEQ_KEY = -1, -2  # padded queries and keys: they never match each other


@dataclass(frozen=True)
class DecodeInputs:
    token_ids: np.ndarray  # [B] int64: each sequence's last token
    positions: np.ndarray  # [B] int64
    write_blocks: np.ndarray  # [B] int64: where its KV goes
    write_offsets: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, M] int64, padded with the null block
    context_lens: np.ndarray  # [B] int64: keys attended (positions < context_len)
    sampling: SamplingRows  # B rows

    @property
    def graph(self) -> tuple[int, int]:
        return self.block_tables.shape

    @classmethod
    def padding(cls, batch: int, blocks: int, shapes: DecoderShapes, vocab_size: int) -> DecodeInputs:
        def zeros():
            return np.zeros(batch, np.int64)
        return cls(zeros(), zeros(), zeros(), zeros(), np.zeros((batch, blocks), np.int64), zeros(),
                   SamplingRows.padding(batch, vocab_size, shapes.max_model_len))


@dataclass(frozen=True)
class PrefillInputs:
    token_ids: np.ndarray  # [C] int64
    positions: np.ndarray  # [C] int64
    write_blocks: np.ndarray  # [C] int64
    write_offsets: np.ndarray  # [C] int64
    query_seq: np.ndarray  # [C] int64: which of the step's prompts a token belongs to
    image_rows: np.ndarray  # [C, hidden] float32, aligned with the tokens
    is_image: np.ndarray  # [C] bool
    context_blocks: np.ndarray  # [K] int64: the prompts' blocks, one after another
    key_seq: np.ndarray  # [K * block_size] int64: the prompt each key belongs to
    key_positions: np.ndarray  # [K * block_size] int64: its position in that prompt
    last_index: np.ndarray  # [max_prefill_seqs] int64: each prompt's last token in the chunk
    sampling: SamplingRows  # max_prefill_seqs rows

    @property
    def graph(self) -> tuple[int, int]:
        return len(self.token_ids), len(self.context_blocks)

    @classmethod
    def padding(cls, tokens: int, blocks: int, shapes: DecoderShapes, hidden_size: int,
                vocab_size: int) -> PrefillInputs:
        keys = blocks * shapes.block_size

        def zeros():
            return np.zeros(tokens, np.int64)
        return cls(zeros(), zeros(), zeros(), zeros(), np.full(tokens, NO_SEQ_QUERY, np.int64),
                   np.zeros((tokens, hidden_size), np.float32), np.zeros(tokens, bool),
                   np.zeros(blocks, np.int64), np.full(keys, NO_SEQ_KEY, np.int64),
                   np.zeros(keys, np.int64), np.zeros(shapes.max_prefill_seqs, np.int64),
                   SamplingRows.padding(shapes.max_prefill_seqs, vocab_size, shapes.max_model_len))


@dataclass(frozen=True)
class MixedInputs:
    """A mixed step: `mixed_batch` decode rows, then the chunks' tokens, in one graph. Both
    halves attend over the same blocks bucket: the decodes' tables are [B, K], the chunks'
    context is [K]."""

    decode: DecodeInputs
    prefill: PrefillInputs

    @property
    def graph(self) -> tuple[int, int]:
        return self.prefill.graph

    @classmethod
    def padding(cls, tokens: int, blocks: int, shapes: DecoderShapes, hidden_size: int,
                vocab_size: int) -> MixedInputs:
        return cls(DecodeInputs.padding(shapes.mixed_batch, blocks, shapes, vocab_size),
                   PrefillInputs.padding(tokens, blocks, shapes, hidden_size, vocab_size))


def _set_sampling(rows: SamplingRows, i: int, seq: Sequence, vocab_size: int) -> None:
    p = seq.sampling
    rows.set_row(i, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or vocab_size,
                 seed=seq.seed, step=len(seq.output_ids))
    if p.has_penalties:  # the history is only copied for rows that read it
        rows.set_penalties(i, presence=p.presence_penalty, frequency=p.frequency_penalty,
                           repetition=p.repetition_penalty, prompt_ids=seq.prompt_ids,
                           output_ids=seq.output_ids)
    bias = list(p.logit_bias)
    if len(seq.output_ids) < p.min_tokens:
        bias += [(t, float("-inf")) for t in seq.stop_ids]
    if bias:
        rows.set_bias(i, bias)
    if seq.grammar is not None:
        seq.grammar.fill(rows.bitmask, i)


def decode_need(seqs: list[Sequence], shapes: DecoderShapes) -> tuple[int, int]:
    """(sequences, KV blocks of the longest context): the least graph a decode step fits."""
    return len(seqs), shapes.blocks_for(max(s.num_tokens for s in seqs))


def prefill_need(chunks: list[Chunk], shapes: DecoderShapes) -> tuple[int, int]:
    """(chunk tokens, context blocks): the least graph a prefill step fits."""
    return (sum(c.num_tokens for c in chunks),
            sum(shapes.blocks_for(c.end) for c in chunks))


def mixed_need(seqs: list[Sequence], chunks: list[Chunk], shapes: DecoderShapes) -> tuple[int, int]:
    """(chunk tokens, KV blocks): the least mixed graph a step fits; the blocks bucket holds
    both the longest decode context and the chunks' context."""
    tokens, blocks = prefill_need(chunks, shapes)
    return tokens, max(blocks, decode_need(seqs, shapes)[1])


def fit_mixed(seqs: list[Sequence], chunks: list[Chunk], shapes: DecoderShapes,
              graph_for: Callable[[tuple[int, int]], tuple[int, int] | None],
              ) -> tuple[tuple[int, int], list[Chunk]] | None:
    """The mixed graph a step of `seqs` decodes and `chunks` runs on (`graph_for`: the compiled
    one that fits a need, or None), and the chunks it carries.

    All of them when a graph fits. Where none does (its graph is still compiling, or stayed
    out for want of memory maps), the longest leading run of chunks that fits, or else the
    first chunk cut to a smaller chunk bucket of at least half its tokens: what is left out
    runs in the next step. A step that fits no mixed graph runs as two graph calls, which
    costs every running stream ~80 ms on the development CPU (docs/decoder.md, "The step");
    a chunk left for the next step delays one prompt by a step. None when even that fails."""
    for n in range(len(chunks), 0, -1):
        graph = graph_for(mixed_need(seqs, chunks[:n], shapes))
        if graph is not None:
            return graph, chunks[:n]
    first = chunks[0]
    for tokens in sorted(shapes.mixed_chunk_buckets, reverse=True):
        if not first.num_tokens / 2 <= tokens < first.num_tokens:
            continue
        cut = [Chunk(first.seq, first.start, first.start + tokens)]
        graph = graph_for(mixed_need(seqs, cut, shapes))
        if graph is not None:
            return graph, cut
    return None


def decodes_as_chunks(seqs: list[Sequence], shapes: DecoderShapes,
                      graph: tuple[int, int]) -> list[list[Chunk]]:
    """Decodes as one-token prefill chunks (their last token, whose logits give the next),
    grouped so that each group fits the prefill graph `graph` (tokens, context blocks) and
    `max_prefill_seqs`: how a replica decodes before its decode graphs are compiled."""
    groups: list[list[Chunk]] = []
    blocks = 0
    for seq in seqs:
        chunk = Chunk(seq, seq.num_tokens - 1, seq.num_tokens)
        need = shapes.blocks_for(chunk.end)
        if need > graph[1]:
            raise ValueError(f"a sequence of {seq.num_tokens} tokens needs {need} context blocks; "
                             f"the prefill graph {graph} holds {graph[1]}")
        group = groups[-1] if groups else None
        if (group is None or len(group) == min(shapes.max_prefill_seqs, graph[0])
                or blocks + need > graph[1]):
            groups.append([chunk])
            blocks = need
        else:
            group.append(chunk)
            blocks += need
    return groups


def build_decode(seqs: list[Sequence], shapes: DecoderShapes, *, graph: tuple[int, int],
                 vocab_size: int) -> DecodeInputs:
    """`graph`: (batch, blocks), at least `decode_need` (the runner picks a compiled one)."""
    bs = shapes.block_size
    batch, blocks = graph
    context = [s.num_tokens for s in seqs]  # the fed token included
    inputs = DecodeInputs.padding(batch, blocks, shapes, vocab_size)
    for i, s in enumerate(seqs):
        position = s.num_tokens - 1
        inputs.token_ids[i] = s.output_ids[-1] if s.output_ids else s.prompt_ids[-1]
        inputs.positions[i] = position
        inputs.write_blocks[i] = s.block_table[position // bs]
        inputs.write_offsets[i] = position % bs
        used = shapes.blocks_for(context[i])
        inputs.block_tables[i, :used] = s.block_table[:used]
        inputs.context_lens[i] = context[i]
        _set_sampling(inputs.sampling, i, s, vocab_size)
    return inputs


def build_prefill(chunks: list[Chunk], shapes: DecoderShapes, *, graph: tuple[int, int],
                  hidden_size: int, vocab_size: int) -> PrefillInputs:
    """`graph`: (tokens, blocks), at least `prefill_need` (the runner picks a compiled one)."""
    if not 0 < len(chunks) <= shapes.max_prefill_seqs:
        raise ValueError(f"a prefill step holds 1..{shapes.max_prefill_seqs} chunks, got {len(chunks)}")
    bs = shapes.block_size
    used_blocks = [shapes.blocks_for(c.end) for c in chunks]
    tokens, blocks = graph
    x = PrefillInputs.padding(tokens, blocks, shapes, hidden_size, vocab_size)
    offset = block_offset = 0
    for j, (chunk, used) in enumerate(zip(chunks, used_blocks)):
        seq, n = chunk.seq, chunk.num_tokens
        rows = slice(offset, offset + n)
        positions = np.arange(chunk.start, chunk.end)
        table = np.asarray(seq.block_table, np.int64)
        x.token_ids[rows] = seq.token_ids(chunk.start, chunk.end)
        x.positions[rows] = positions
        x.write_blocks[rows] = table[positions // bs]
        x.write_offsets[rows] = positions % bs
        x.query_seq[rows] = j
        image_index = seq.image_row_index(chunk.start, chunk.end)
        is_image = image_index >= 0
        if is_image.any():
            x.is_image[rows] = is_image
            x.image_rows[offset:offset + n][is_image] = seq.image_rows[image_index[is_image]]
        keys = slice(block_offset * bs, (block_offset + used) * bs)
        x.context_blocks[block_offset:block_offset + used] = table[:used]
        x.key_seq[keys] = j
        x.key_positions[keys] = np.arange(used * bs)
        x.last_index[j] = offset + n - 1
        if chunk.completes:  # the other rows' samples are dropped: they keep neutral settings
            _set_sampling(x.sampling, j, seq, vocab_size)
        offset += n
        block_offset += used
    return x


def build_mixed(seqs: list[Sequence], chunks: list[Chunk], shapes: DecoderShapes, *,
                graph: tuple[int, int], hidden_size: int, vocab_size: int) -> MixedInputs:
    """`graph`: (tokens, blocks), at least `mixed_need`; at most `mixed_batch` decodes."""
    if len(seqs) > shapes.mixed_batch:
        raise ValueError(f"a mixed step holds at most {shapes.mixed_batch} decodes, got {len(seqs)}")
    return MixedInputs(
        build_decode(seqs, shapes, graph=(shapes.mixed_batch, graph[1]), vocab_size=vocab_size),
        build_prefill(chunks, shapes, graph=graph, hidden_size=hidden_size, vocab_size=vocab_size))
