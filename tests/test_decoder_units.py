"""Host-side pieces of the decoder, tested without a model: the block pool and its prefix
cache, prefix reuse and preemption (through the fake runner, whose outputs are checksums of
what each sequence can see) and the engine's fault handling. (What one step carries:
tests/test_decoder_steps.py; shapes and their coverage: tests/test_decoder_shapes.py;
detokenization and sampling: tests/test_detokenizer.py, tests/test_sampler_draws.py.)"""

import random

import numpy as np
import pytest

from decoder_service.block_manager import BlockManager, extend_block_hashes
from decoder_service.engine import DecoderStepError
from runtime.messages import SamplingParams
from tests.decoder_harness import fake_engine, image_seq, plain_seq, run_to_end, submit, tokens_of
from tests.fake_decoder import LLAVA_7B_KV, TINY_KV, expected_tokens


def test_token_ids_slice_prompt_and_output_alike():
    seq = plain_seq("t", [10, 11, 12, 13])
    seq.output_ids += [20, 21, 22]
    whole = [10, 11, 12, 13, 20, 21, 22]
    for start, end in ((0, 4), (1, 3), (4, 7), (5, 6), (2, 6), (0, 7), (3, 5), (7, 7)):
        got = seq.token_ids(start, end)
        assert got.dtype == np.int64 and got.tolist() == whole[start:end], (start, end)


def test_block_hashes_chain_and_name_the_image():
    a, _ = image_seq("a", [101] * 10, ["cat"], [7] * 30, value_of={"cat": 1})
    b, _ = image_seq("b", [101] * 10, ["dog"], [7] * 30, value_of={"dog": 2})
    c, _ = image_seq("c", [101] * 10, ["cat"], [7] * 6 + [8] * 24, value_of={"cat": 1})
    ha, hb, hc = (extend_block_hashes(s, 16, 3) for s in (a, b, c))
    assert ha[1] != hb[1] and ha[2] != hb[2]  # same token ids, another picture
    assert ha[:2] == hc[:2] and ha[2] != hc[2]  # same picture, the text differs from block 2
    moved, _ = image_seq("m", [101] * 11, ["cat"], [7] * 29, value_of={"cat": 1})
    assert extend_block_hashes(moved, 16, 1) != ha[:1]


def test_pool_counts_references_and_evicts_cached_blocks_lru():
    pool = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    a = pool.allocate(2)
    pool.register(a, [b"a0", b"a1"])
    b = pool.allocate(2)
    assert pool.num_free == 0 and 0 not in a + b
    cached = pool.match_prefix([b"a0", b"a1", b"zz"])
    pool.acquire(cached)
    pool.count_lookup(12, len(cached))
    assert pool.hit_tokens == 8 and pool.queried_tokens == 12
    pool.release(a)
    pool.release(a)  # both users gone: cached and evictable, the tail first
    pool.release(b)
    assert pool.num_free == 4 and pool.num_cached == 2
    fresh = pool.allocate(3)  # two uncached blocks, then the LRU cached one: a's tail
    assert set(fresh) == set(b) | {a[1]} and pool.match_prefix([b"a0", b"a1"]) == [a[0]]
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks, 1 free"):
        pool.allocate(2)
    off = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    blocks = off.allocate(1)
    off.register(blocks, [b"x"])
    assert off.match_prefix([b"x"]) == []



def test_a_repeated_image_prefix_is_reused_and_a_different_image_is_not():
    engine, _ = fake_engine(kv_cache_bytes=2**20)
    values = {"cat": 100, "dog": 200}
    first, first_values = image_seq("q1", [101] * 4, ["cat"], [11] * 20, value_of=values)
    out = submit(engine, first)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(first_values, 8)
    blocks = engine.scheduler.blocks
    second, second_values = image_seq("q2", [101] * 4, ["cat"], [12] * 20, value_of=values)
    out = submit(engine, second)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(second_values, 8)
    assert blocks.hit_tokens == 16  # block 0 (4 text + 12 image) only: block 1 holds new text
    other, other_values = image_seq("q3", [101] * 4, ["dog"], [11] * 20, value_of=values)
    out = submit(engine, other)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(other_values, 8) and blocks.hit_tokens == 16
    again, again_values = image_seq("q4", [101] * 4, ["cat"], [11] * 20, value_of=values)
    out = submit(engine, again)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(again_values, 8)
    assert blocks.hit_tokens == 16 + 32  # both of q1's full blocks (40 tokens: the last recomputed)


def test_without_prefix_caching_nothing_is_hashed_or_reused():
    engine, _ = fake_engine(kv_cache_bytes=2**20, prefix_caching=False)
    values = {"cat": 100}
    seqs = [image_seq(f"q{i}", [101] * 4, ["cat"], [11] * 20, value_of=values) for i in range(2)]
    for seq, prompt_values in seqs:  # one after the other: the first's blocks could be reused
        out = submit(engine, seq)
        run_to_end(engine)
        assert tokens_of(out) == expected_tokens(prompt_values, 8)
    blocks = engine.scheduler.blocks
    assert blocks.hit_tokens == 0 and blocks.num_cached == 0
    assert all(seq.block_hashes == [] for seq, _ in seqs)


def test_an_image_sent_twice_at_once_is_prefilled_once():
    engine, _ = fake_engine(kv_cache_bytes=2**20)  # a 64-token step, no cap: room for all three
    values = {"cat": 100, "dog": 200}
    first, first_values = image_seq("q1", [101] * 4, ["cat"], [11] * 20, value_of=values)
    second, second_values = image_seq("q2", [101] * 4, ["cat"], [12] * 20, value_of=values)
    other, other_values = image_seq("q3", [101] * 4, ["dog"], [11] * 20, value_of=values)
    outs = [submit(engine, seq) for seq in (first, second, other)]
    engine.step()
    scheduler = engine.scheduler
    # q2 waits for q1's block of the cat image; q3, behind it, is not held up.
    assert scheduler.running == [first, other] and list(scheduler.waiting) == [second]
    run_to_end(engine)
    for out, values_ in zip(outs, (first_values, second_values, other_values)):
        assert tokens_of(out) == expected_tokens(values_, 8)
    assert scheduler.blocks.hit_tokens == 16  # q2 took block 0 (4 text + 12 image) from q1


def test_a_full_pool_makes_work_wait_or_preempts_and_outputs_stay_exact():
    # 17 usable blocks of 16 tokens: one sequence of 256 fits, four of ~100 do not.
    engine, runner = fake_engine(kv_cache_bytes=TINY_KV.block_bytes(16) * 18,
                                 max_num_batched_tokens=64)
    rng = np.random.default_rng(1)
    seqs = []
    for i in range(6):
        prompt = [101] + rng.integers(1000, 20000, size=40 + 10 * i).tolist()
        seq = plain_seq(f"p{i}", prompt, max_tokens=60)
        seqs.append((seq, prompt, submit(engine, seq)))
    run_to_end(engine)
    for seq, prompt, out in seqs:
        assert tokens_of(out) == expected_tokens(prompt, 60), seq.request_id
    assert engine.scheduler.preemptions > 0
    assert engine.scheduler.blocks.num_used == 0
    # Each prompt is looked up once, at its first admission: a preempted sequence finding its
    # own blocks again is not a prefix-cache hit, and these prompts share no prefix.
    blocks = engine.scheduler.blocks
    assert (blocks.queried_tokens, blocks.hit_tokens) == (sum(len(p) for _, p, _ in seqs), 0)


def test_randomized_workload_is_exact_and_uses_only_warmdecoder_shapes():
    # The real LLaVA-1.5 geometry: 576 tokens per image, 4096 positions, 1-4 images a request.
    engine, runner = fake_engine(kv=LLAVA_7B_KV, max_position_embeddings=4096, max_model_len=4096,
                                 max_num_seqs=16, max_num_batched_tokens=512,
                                 kv_cache_bytes=LLAVA_7B_KV.block_bytes(16) * 280)
    rng, pyrng = np.random.default_rng(3), random.Random(3)
    values = {f"photo{k}": 10_000 + 1000 * k for k in range(6)}
    pending = []
    for i in range(40):
        keys = [f"photo{pyrng.randrange(6)}" for _ in range(pyrng.choice([0, 1, 1, 2, 4]))]
        before = ([101, 2023, 2003, 1037] if pyrng.random() < 0.6  # a shared system prompt
                  else [101] + rng.integers(1000, 20000, size=pyrng.randint(0, 30)).tolist())
        after = rng.integers(1000, 20000, size=pyrng.randint(1, 200)).tolist()
        seq, prompt_values = image_seq(f"r{i}", before, keys, after, per_image=576, value_of=values)
        seq.sampling = SamplingParams(max_tokens=pyrng.randint(1, 40), temperature=0.0, ignore_eos=True)
        pending.append((seq, prompt_values, submit(engine, seq)))
        if pyrng.random() < 0.5:
            for _ in range(pyrng.randint(1, 6)):
                engine.step()
    run_to_end(engine)
    for seq, prompt_values, out in pending:
        assert tokens_of(out) == expected_tokens(prompt_values, seq.sampling.max_tokens), seq.request_id
    blocks = engine.scheduler.blocks
    assert blocks.hit_tokens > 0 and engine.scheduler.preemptions > 0
    assert blocks.num_used == 0
    assert {kind for kind, _ in runner.graphs} <= {"decode", "prefill", "mixed"}


# --- faults --------------------------------------------------------------------------------
def test_a_failing_sink_or_postprocessing_ends_only_its_own_request():
    engine, runner = fake_engine(kv_cache_bytes=2**20)

    def bad_sink(item):
        if not isinstance(item, BaseException):
            raise RuntimeError("client callback broke")

    def broken_detokenizer(token_id):
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "planted")

    good_out = submit(engine, plain_seq("good", [101, 5, 6, 7]))
    engine.submit(plain_seq("bad", [101, 8, 9]), bad_sink)
    broken_out = submit(engine, plain_seq("broken", [101, 8, 9, 10]))
    engine.step()  # one prefill for all three: "bad"'s sink raises on its first token
    engine._requests["broken"].detokenizer.add = broken_detokenizer
    run_to_end(engine)
    assert tokens_of(good_out) == expected_tokens([101, 5, 6, 7], 8)
    assert len(broken_out) == 2 and isinstance(broken_out[1], DecoderStepError)
    assert "planted" in str(broken_out[1])
    assert engine.stats()["step_errors"] == 2 and engine.scheduler.blocks.num_used == 0

    runner.fail_next = "prefill"
    failed = submit(engine, plain_seq("graph", [101, 4]))
    engine.step()
    after = submit(engine, plain_seq("after", [101, 4]))
    run_to_end(engine)
    assert isinstance(failed[-1], DecoderStepError) and "injected prefill failure" in str(failed[-1])
    assert tokens_of(after) == expected_tokens([101, 4], 8)


def test_a_failing_mixed_graph_fails_its_decodes_and_chunks_and_the_engine_goes_on():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    outs = [submit(engine, plain_seq(f"s{i}", [101, 5 + i, 6])) for i in range(3)]
    engine.step()
    long = submit(engine, plain_seq("long", [101] * 100))
    runner.fail_next = "mixed"
    engine.step()  # three decodes and long's first chunk, on one graph that raises
    assert [kind for kind, _ in runner.graphs][-1] == "mixed"
    for out in [*outs, long]:
        assert isinstance(out[-1], DecoderStepError) and "injected mixed failure" in str(out[-1])
    assert engine.scheduler.blocks.num_used == 0
    after = submit(engine, plain_seq("after", [101, 4]))
    run_to_end(engine)
    assert tokens_of(after) == expected_tokens([101, 4], 8)


def test_a_duplicate_request_id_is_refused_without_touching_the_first():
    engine, _ = fake_engine(kv_cache_bytes=2**20)
    first = submit(engine, plain_seq("same", [101, 5]))
    second = submit(engine, plain_seq("same", [101, 6]))
    run_to_end(engine)
    assert tokens_of(first) == expected_tokens([101, 5], 8)
    assert len(second) == 1 and "already running" in str(second[0])


def test_aborting_frees_blocks_at_once():
    engine, _ = fake_engine(kv_cache_bytes=2**20)
    out = submit(engine, plain_seq("gone", [101] * 40, max_tokens=100))
    engine.step()
    engine.step()
    assert engine.scheduler.blocks.num_used == 3 and out
    engine.abort("gone")
    engine.step()
    assert engine.scheduler.blocks.num_used == 0 and not engine.scheduler.has_work()
