"""The decoder's shapes: the bucket lists derived from the config, and proof that warm-up
compiles every graph a step can ask for (decode, prefill and mixed), for the real LLaVA-1.5
configuration and the demo checkpoints."""

import pytest

from decoder_service.config import DecoderConfig, KVGeometry
from runtime.buckets import pad_to_bucket
from runtime.graphs import GraphPlan
from tests.fake_decoder import LLAVA_7B_KV, TINY_KV, decoder_shapes


def test_shapes_follow_the_config_and_refuse_a_pool_too_small_for_one_sequence():
    shapes = decoder_shapes(kv_cache_bytes=2**20)
    assert shapes.decode_batch_buckets == (1, 2, 4)
    assert shapes.block_buckets == (2, 4, 8, 16)  # 32..256 tokens of context
    assert shapes.decode_block_buckets == (2, 4, 8, 12, 16)  # 1.5x midpoints from 8 blocks
    # ... for batches of 4 or more: below, attention is too small a share of a step
    assert (4, 12) in shapes.decode_graphs() and (2, 12) not in shapes.decode_graphs()
    assert shapes.decode_blocks_for(2) == shapes.block_buckets
    assert shapes.chunk_buckets == (16, 32, 64)
    assert shapes.num_blocks == 2**20 // TINY_KV.block_bytes(16)
    assert (64, 2) not in shapes.prefill_graphs()  # 33+ tokens never fit 2 blocks
    assert (64, 4) in shapes.prefill_graphs() and (16, 2) in shapes.prefill_graphs()
    small = decoder_shapes(KVGeometry(12, 4, 64, 4), max_position_embeddings=1024, max_model_len=1024,
                           max_num_seqs=16, max_num_batched_tokens=256)
    # A step that decodes carries up to 128 chunk tokens: 41 of them pad to 48, not 64.
    assert small.mixed_chunk_buckets == (32, 48, 64, 96, 128)
    assert pad_to_bucket(41, small.mixed_chunk_buckets) == 48
    assert (48, 8) in small.mixed_graphs() and small.chunk_buckets == (16, 32, 64, 128, 256)
    assert decoder_shapes(KVGeometry(12, 4, 64, 4), max_position_embeddings=1024, max_model_len=1024,
                          max_num_seqs=16, max_num_batched_tokens=256,
                          mixed_chunk_midpoints=False).mixed_chunk_buckets == (32, 64, 128)
    with pytest.raises(ValueError, match="one sequence of max_model_len 256 needs 16"):
        decoder_shapes(kv_cache_bytes=TINY_KV.block_bytes(16) * 16)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        decoder_shapes(max_model_len=2048)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        DecoderConfig(model="x", max_num_seqs=8, max_num_batched_tokens=8)


def _reachable_graphs(shapes, chunk_cap):
    """Every (kind, graph) a step can ask for: decode batches of 1..max_num_seqs sequences whose
    longest context is 1..max_model_len tokens; prefill steps of 1..max_chunk_tokens tokens whose
    prompts' context blocks (at least the chunk's own, at most one sequence's worth, which the
    scheduler enforces) are anything between; mixed steps: a full decode batch (its bucket is
    the largest) beside 1..`chunk_cap` chunk tokens, the blocks bucket holding both."""
    bs, top = shapes.block_size, shapes.max_blocks_per_seq
    decode = {shapes.decode_graph_for((n, k)) for n in range(1, shapes.max_num_seqs + 1)
              for k in range(1, top + 1)}
    prefill = {(pad_to_bucket(c, shapes.chunk_buckets), pad_to_bucket(k, shapes.block_buckets))
               for c in range(1, shapes.max_chunk_tokens + 1) for k in range(-(-c // bs), top + 1)}
    fewest_decodes = shapes.decode_batch_buckets[-2] + 1 if len(shapes.decode_batch_buckets) > 1 else 1
    most_tokens = min(chunk_cap, shapes.max_chunk_tokens - fewest_decodes)  # the scheduler's budget
    mixed = {(pad_to_bucket(c, shapes.mixed_chunk_buckets), pad_to_bucket(k, shapes.mixed_block_buckets))
             for c in range(1, most_tokens + 1) for k in range(-(-c // bs), top + 1)}
    return decode, prefill, mixed


@pytest.mark.parametrize("name, kv, overrides", [
    # LLaVA-1.5 at 336 px (576 tokens per image), 4096 positions, the TPU config's budget.
    ("llava-1.5-7b", LLAVA_7B_KV, dict(max_model_len=4096, max_num_seqs=16, kv_cache_bytes=16 * 2**30,
                                       max_num_batched_tokens=512, max_images_per_request=4,
                                       mixed_chunk_midpoints=False)),
    ("llava-1.5-7b, chunk midpoints", LLAVA_7B_KV, dict(
        max_model_len=4096, max_num_seqs=16, kv_cache_bytes=16 * 2**30, max_num_batched_tokens=512)),
    ("demo-small, cap 80", KVGeometry(12, 4, 64, 4), dict(max_model_len=1024, max_num_seqs=16,
                                                          max_num_batched_tokens=256,
                                                          max_chunk_tokens_while_decoding=80)),
    ("demo-tiny", TINY_KV, dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)),
    ("demo-small", KVGeometry(12, 4, 64, 4), dict(max_model_len=1024, max_num_seqs=16,
                                                  max_num_batched_tokens=256)),
])
def test_warm_up_covers_every_shape_the_runtime_can_produce(name, kv, overrides):
    # Images add no shape dimension: their rows ride in the chunk's token rows, so the
    # 576-token images of LLaVA-1.5 need no graphs of their own.
    shapes = decoder_shapes(kv, max_position_embeddings=4096, **overrides)
    cap = DecoderConfig(model="unused", **overrides).chunk_tokens_while_decoding
    decode, prefill, mixed = _reachable_graphs(shapes, cap)
    assert decode == set(shapes.decode_graphs()), name
    # and the runtime, picking the cheapest compiled graph that fits, picks that same graph
    plan = GraphPlan(shapes.decode_graphs())
    for graph in plan.planned:
        plan.mark_compiled(graph)
    assert all(plan.fit((n, k)) == shapes.decode_graph_for((n, k))
               for n in range(1, shapes.max_num_seqs + 1) for k in range(1, shapes.max_blocks_per_seq + 1))
    assert prefill == set(shapes.prefill_graphs()), name
    assert mixed == set(shapes.mixed_graphs()) and shapes.mixed_batch == shapes.max_num_seqs, name
    print(f"{name}: {len(decode)} decode + {len(prefill)} prefill + {len(mixed)} mixed graphs")
    assert not decoder_shapes(kv, max_position_embeddings=4096, mixed_graphs=False, **overrides).mixed_graphs()
