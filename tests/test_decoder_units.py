"""Host-side pieces of the decoder, tested without a model: the block pool and its prefix
cache, scheduling with chunked prefill and preemption (through the fake runner, whose
outputs are checksums of what each sequence can see) and the engine's fault handling. (Shapes and their coverage: tests/test_decoder_shapes.py; detokenization
and sampling: tests/test_detokenizer.py, tests/test_sampler_draws.py.)"""

import random

import numpy as np
import pytest

from decoder_service.block_manager import BlockManager, extend_block_hashes
from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderStepError, Engine
from decoder_service.graph_times import GraphTimes
from decoder_service.inputs import decodes_as_chunks
from runtime.host_cpu import HostCpu
from decoder_service.scheduler import Scheduler
from decoder_service.sequence import Sequence, image_spans
from deploy.demo_checkpoint import build_tokenizer
from runtime.messages import SamplingParams
from tests.fake_decoder import LLAVA_7B_KV, TINY_KV, FakeRunner, decoder_shapes, expected_tokens

IMG = 30522


# --- block pool ----------------------------------------------------------------------------
def _seq(rid, prompt, images=(), rows=None, **sampling):
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **sampling})
    return Sequence(rid, list(prompt), params, seed=0, images=tuple(images), image_rows=rows)


def _image_seq(rid, text_before, keys, text_after, per_image=16, value_of=None):
    """A prompt: text, then one run of placeholders per image, then text. Image k's rows hold
    `value_of[key]` in column 0 (the fake runner's value for those positions)."""
    prompt = list(text_before)
    for _ in keys:
        prompt += [IMG] * per_image
    prompt += list(text_after)
    spans = image_spans(np.asarray(prompt), IMG, [per_image] * len(keys), list(keys))
    rows = np.zeros((per_image * len(keys), 4), np.float32)
    values = []
    for i, key in enumerate(keys):
        v = value_of[key] if value_of else 5000 + i
        rows[i * per_image:(i + 1) * per_image, 0] = v + np.arange(per_image)
        values.append(v + np.arange(per_image))
    prompt_values = list(text_before) + [int(x) for v in values for x in v] + list(text_after)
    return _seq(rid, prompt, spans, rows if keys else None), prompt_values


def test_token_ids_slice_prompt_and_output_alike():
    seq = _seq("t", [10, 11, 12, 13])
    seq.output_ids += [20, 21, 22]
    whole = [10, 11, 12, 13, 20, 21, 22]
    for start, end in ((0, 4), (1, 3), (4, 7), (5, 6), (2, 6), (0, 7), (3, 5), (7, 7)):
        got = seq.token_ids(start, end)
        assert got.dtype == np.int64 and got.tolist() == whole[start:end], (start, end)


def test_block_hashes_chain_and_name_the_image():
    a, _ = _image_seq("a", [101] * 10, ["cat"], [7] * 30, value_of={"cat": 1})
    b, _ = _image_seq("b", [101] * 10, ["dog"], [7] * 30, value_of={"dog": 2})
    c, _ = _image_seq("c", [101] * 10, ["cat"], [7] * 6 + [8] * 24, value_of={"cat": 1})
    ha, hb, hc = (extend_block_hashes(s, 16, 3) for s in (a, b, c))
    assert ha[1] != hb[1] and ha[2] != hb[2]  # same token ids, another picture
    assert ha[:2] == hc[:2] and ha[2] != hc[2]  # same picture, the text differs from block 2
    moved, _ = _image_seq("m", [101] * 11, ["cat"], [7] * 29, value_of={"cat": 1})
    assert extend_block_hashes(moved, 16, 1) != ha[:1]


def test_pool_counts_references_and_evicts_cached_blocks_lru():
    pool = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    a = pool.allocate(2)
    pool.register(a, [b"a0", b"a1"])
    b = pool.allocate(2)
    assert pool.num_free == 0 and 0 not in a + b
    pool.acquire(pool.match_prefix([b"a0", b"a1", b"zz"]), num_tokens=12)
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


# --- scheduling through the fake runner -----------------------------------------------------
def _engine(kv=TINY_KV, max_position_embeddings=1024, prefix_caching=True, all_warm=True,
            graph_times=None, clock=None, **overrides):
    shapes = decoder_shapes(kv, max_position_embeddings, **overrides)
    runner = FakeRunner(shapes, all_warm=all_warm)
    blocks = BlockManager(shapes.num_blocks, shapes.block_size, prefix_caching)
    budget = overrides.get("max_num_batched_tokens", 64)
    cap = overrides.get("max_chunk_tokens_while_decoding", budget)  # default: no cap
    scheduler = Scheduler(shapes, blocks, budget, cap)
    engine = Engine(runner, scheduler, _TOKENIZER, eos_token_id=102,
                    host_cpu=HostCpu(read=lambda: None),  # the host always has CPUs to spare
                    graph_times=graph_times, **({"clock": clock} if clock else {}))
    return engine, runner


_TOKENIZER = build_tokenizer(max_length=512)


def _submit(engine, seq):
    out = []
    engine.submit(seq, out.append)
    return out


def _run(engine, limit=10_000):
    steps = 0
    while engine.scheduler.has_work() or not engine._inbox.empty():
        engine.step()
        steps += 1
        assert steps < limit, "the engine made no progress"
    return steps


def _tokens(chunks):
    assert not any(isinstance(c, BaseException) for c in chunks), chunks
    return [t for c in chunks for t in c.token_ids]


def test_prompts_are_chunked_within_the_budget_and_share_steps_with_decodes():
    engine, runner = _engine(kv_cache_bytes=2**20)
    short, short_values = _image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = _image_seq("long", [101] * 30, ["a", "b"], [9] * 90)  # 152 tokens
    out_short = _submit(engine, short)
    engine.step()  # short prefilled alone, then it decodes
    out_long = _submit(engine, long)
    _run(engine)
    assert _tokens(out_short) == expected_tokens(short_values, 8)
    assert _tokens(out_long) == expected_tokens(long_values, 8)
    prefill_tokens = [g[0] for kind, g in runner.graphs if kind == "prefill"]
    assert max(prefill_tokens) <= 64 and len(prefill_tokens) >= 3  # 152 tokens over >= 3 steps
    kinds = [kind for kind, _ in runner.graphs]
    mixed = sum(a == "decode" and b == "prefill" for a, b in zip(kinds, kinds[1:]))
    assert mixed >= 2  # the long prompt's chunks ran between the short one's decodes


def test_a_step_that_decodes_carries_at_most_the_chunk_cap_and_one_that_does_not_a_budget():
    engine, runner = _engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=16)
    steps = []  # (decoding sequences, chunk tokens) of each step
    schedule = engine.scheduler.schedule

    def recording(contended=False):
        step = schedule(contended=contended)
        if step is not None:
            steps.append((len(step.decodes), sum(c.num_tokens for c in step.chunks)))
        return step
    engine.scheduler.schedule = recording
    short, short_values = _image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = _image_seq("long", [101] * 30, ["a", "b"], [9] * 150)  # 212 tokens
    out_short = _submit(engine, short)
    engine.step()  # short prefilled alone, then it decodes for 7 steps
    out_long = _submit(engine, long)
    _run(engine)
    assert _tokens(out_short) == expected_tokens(short_values, 8)
    assert _tokens(out_long) == expected_tokens(long_values, 8)
    beside_decodes = [chunk for decodes, chunk in steps if decodes and chunk]
    alone = [chunk for decodes, chunk in steps if not decodes and chunk]
    assert beside_decodes and max(beside_decodes) == 16  # the long prompt, while short decodes
    assert max(alone) == 64  # once short is done: the whole budget


def test_a_call_slower_than_its_graphs_best_marks_the_engine_contended_until_one_is_not():
    times = GraphTimes(contended_slowdown=1.5)
    times.record(("decode", (4, 8)), 0.10)
    assert not times.contended  # a graph's first call only sets its best
    times.record(("decode", (4, 8)), 0.14)
    assert not times.contended and times.last_slowdown == pytest.approx(1.4)
    times.record(("decode", (4, 8)), 0.20)
    assert times.contended and times.contended_calls == 1
    times.record(("prefill", (64, 8)), 0.90)  # another graph, first seen while contended
    assert not times.contended
    times.record(("decode", (4, 8)), 0.08)  # faster than ever: the new best
    assert not times.contended and times.best(("decode", (4, 8))) == 0.08
    never = GraphTimes(contended_slowdown=None)
    never.record("g", 1.0)
    never.record("g", 50.0)
    assert not never.contended and never.contended_calls == 0
    with pytest.raises(ValueError, match="contended_slowdown must be > 1 or None"):
        GraphTimes(contended_slowdown=1.0)
    with pytest.raises(ValueError, match="contended_slowdown must be a number above 1 or None"):
        DecoderConfig(model="m", contended_slowdown=0.5)


class _SharedCores:
    """An engine clock under which every graph call takes 1 s, or 3 s once `shared` is set."""

    def __init__(self):
        self.now, self.calls, self.shared = 0.0, 0, False

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the engine reads the clock before and after each call
            self.now += 3.0 if self.shared else 1.0
        return self.now


def test_while_graph_calls_run_slow_a_step_that_decodes_carries_half_the_chunk_cap():
    """Contended cores (the encoder computing beside the decoder) make every call slower; the
    chunks beside decodes then halve, so the running streams wait about what an uncontended
    capped step would make them wait, and the tokens stay the same."""
    clock = _SharedCores()
    engine, runner = _engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32,
                             graph_times=GraphTimes(contended_slowdown=1.5), clock=clock)
    steps = []  # (contended, decoding sequences, chunk tokens) of each step
    schedule = engine.scheduler.schedule

    def recording(contended=False):
        step = schedule(contended=contended)
        if step is not None:
            steps.append((contended, len(step.decodes), sum(c.num_tokens for c in step.chunks)))
        return step
    engine.scheduler.schedule = recording
    short, short_values = _image_seq("short", [101, 5, 6], [], [7], per_image=16)
    longs = [_image_seq(f"long{i}", [101] * 30, ["a", "b"], [9 + i] * 150) for i in range(2)]
    outs = [_submit(engine, short)]
    engine.step()  # short prefilled alone; it decodes from the next step on
    outs.append(_submit(engine, longs[0][0]))
    for _ in range(4):  # uncontended: the first long prompt's chunks take the whole cap
        engine.step()
    clock.shared = True
    outs.append(_submit(engine, longs[1][0]))
    _run(engine)
    for (_, values), out in zip([(short, short_values), *longs], outs):
        assert _tokens(out) == expected_tokens(values, 8)
    beside = [(contended, chunk) for contended, decodes, chunk in steps if decodes and chunk]
    assert max(chunk for contended, chunk in beside if not contended) == 32
    contended_chunks = [chunk for contended, chunk in beside if contended]
    assert contended_chunks and max(contended_chunks) == 16
    assert engine.stats()["contended_graph_calls"] > 0
    alone = [chunk for contended, decodes, chunk in steps if contended and not decodes and chunk]
    assert not alone or max(alone) > 16  # nothing decoding: no stream waits, the budget stays


def test_the_chunk_cap_while_decoding_defaults_to_half_the_budget():
    assert DecoderConfig(model="m", max_num_batched_tokens=256).chunk_tokens_while_decoding == 128
    assert DecoderConfig(model="m", max_num_batched_tokens=256,
                         max_chunk_tokens_while_decoding=200).chunk_tokens_while_decoding == 200
    with pytest.raises(ValueError, match="max_chunk_tokens_while_decoding must be between 1 and"):
        DecoderConfig(model="m", max_num_batched_tokens=256, max_chunk_tokens_while_decoding=300)


def _full_batch_beside_a_long_prompt(**overrides):
    """Three short requests decode (a full batch: 3 pads to the largest bucket, 4) while a
    152-token prompt is chunked beside them; returns the outputs, runner and engine."""
    engine, runner = _engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32, **overrides)
    shorts = [_image_seq(f"s{i}", [101, 5 + i, 6], [], [7], per_image=16) for i in range(3)]
    outs = [_submit(engine, seq) for seq, _ in shorts]
    engine.step()  # the three prefilled together; they decode from the next step on
    long, long_values = _image_seq("long", [101] * 30, ["a", "b"], [9] * 90)
    outs.append(_submit(engine, long))
    _run(engine)
    return [values for _, values in shorts] + [long_values], outs, runner, engine


def test_a_full_batch_and_a_chunk_share_one_mixed_graph_with_the_same_tokens():
    values, outs, runner, engine = _full_batch_beside_a_long_prompt()
    for prompt, out in zip(values, outs):
        assert _tokens(out) == expected_tokens(prompt, 8)
    mixed = [g for kind, g in runner.graphs if kind == "mixed"]
    assert mixed and all(g in runner.shapes.mixed_graphs() for g in mixed)
    assert engine.stats()["fused_steps"] == len(mixed) > 0
    # Off: the same steps run as a decode graph then a prefill graph, with the same tokens.
    _, apart, runner_off, engine_off = _full_batch_beside_a_long_prompt(mixed_graphs=False)
    assert [_tokens(o) for o in apart] == [_tokens(o) for o in outs]
    assert "mixed" not in {kind for kind, _ in runner_off.graphs}
    assert engine_off.stats()["fused_steps"] == 0
    assert engine_off.stats()["mixed_steps"] == engine.stats()["mixed_steps"]


def test_a_batch_below_the_mixed_bucket_or_a_graph_not_yet_compiled_runs_two_graphs():
    engine, runner = _engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    assert runner.mixed_graph_for(3, (32, 8)) == (32, 8)
    assert runner.mixed_graph_for(2, (32, 8)) is None  # 2 decodes: bucket 2, not the full 4
    assert runner.mixed_graph_for(4, (64, 8)) is None  # more chunk tokens than a mixed step holds
    runner.plans["mixed"].compiled.clear()
    assert runner.mixed_graph_for(4, (32, 8)) is None
    short, short_values = _image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = _image_seq("long", [101] * 30, ["a", "b"], [9] * 90)
    out_short = _submit(engine, short)
    engine.step()
    out_long = _submit(engine, long)
    _run(engine)  # one decode beside the chunks: two graphs a step
    assert _tokens(out_short) == expected_tokens(short_values, 8)
    assert _tokens(out_long) == expected_tokens(long_values, 8)
    assert "mixed" not in {kind for kind, _ in runner.graphs} and engine.stats()["mixed_steps"] > 0


def test_before_decode_graphs_exist_decodes_run_as_chunks_on_the_covering_prefill_graph():
    """A replica serves on one graph: decodes are one-token chunks, a few sequences per step,
    until the engine compiles the decode graph (here: when idle), and outputs stay exact."""
    engine, runner = _engine(kv_cache_bytes=2**20, max_num_seqs=8, max_prefill_seqs=3,
                             all_warm=False)
    covering = runner.plans["prefill"].covering
    assert runner.graphs_compiled == 1 and not runner.can_decode
    work = [_image_seq(f"s{i}", [101] + [5 + i] * (3 + 7 * i), ["a"] if i % 2 else [], [7],
                       per_image=16) for i in range(7)]
    outs = [_submit(engine, seq) for seq, _ in work]
    _run(engine)  # never idle: no background compilation in between
    for (seq, values), out in zip(work, outs):
        assert _tokens(out) == expected_tokens(values, 8), seq.request_id
    assert {kind for kind, _ in runner.graphs} == {"prefill"}
    assert {graph for _, graph in runner.graphs} == {covering}
    # 7 decode tokens for each of 7 sequences, at most 3 sequences per step
    assert engine.steps["decode"] >= -(-7 * 7 // 3) and not runner.can_decode
    assert engine.stats()["decode_steps_on_prefill_graph"] == engine.steps["decode"]
    assert engine._compile_in_background(busy=False) and runner.can_decode  # idle: decode first
    assert runner.plans["decode"].compiled == [runner.plans["decode"].covering]
    seq, values = _image_seq("after", [101, 9, 9], [], [7], per_image=16)
    out = _submit(engine, seq)
    _run(engine)
    assert _tokens(out) == expected_tokens(values, 8) and runner.graphs[-1][0] == "decode"


def test_decode_graph_compiles_under_load_once_slow_decodes_cost_a_compile():
    engine, runner = _engine(kv_cache_bytes=2**20, all_warm=False)
    runner.compile_seconds[("prefill", runner.plans["prefill"].covering)] = 0.5
    engine.background_compile_share = 0.0  # only the rule for the decode graph can compile
    assert not engine._compile_in_background(busy=True)  # nothing lost yet, no share left
    engine._decodes_on_prefill_s = 0.5
    assert engine._compile_in_background(busy=True) and runner.can_decode
    assert not engine._compile_in_background(busy=True)  # the rest wait for the share again


def test_idle_compiles_wait_while_the_host_is_busy():
    engine, runner = _engine(kv_cache_bytes=2**20, all_warm=False)
    readings = iter([(0, 0), (10, 200), (190, 400)])  # 5 % idle, then 90 %
    engine.host_cpu = HostCpu(read=readings.__next__)
    assert not engine._compile_in_background(busy=False) and not runner.can_decode
    assert engine._compile_in_background(busy=False) and runner.can_decode
    while runner.graphs_compiled < runner.graphs_planned:
        runner.compile_next()
    engine.host_cpu.has_spare = lambda: pytest.fail("read the host with every graph compiled")
    assert not engine._compile_in_background(busy=False)


def test_decodes_as_chunks_groups_fit_the_prefill_graph():
    shapes = decoder_shapes(TINY_KV, 1024, kv_cache_bytes=2**20, max_prefill_seqs=4)
    seqs = [_seq(f"g{i}", [101] * n) for i, n in enumerate([40, 40, 10, 10, 10, 10, 90])]
    groups = decodes_as_chunks(seqs, shapes, (64, 6))  # 6 blocks of 16: 96 tokens of context
    assert [[c.seq.request_id for c in g] for g in groups] == [
        ["g0", "g1"], ["g2", "g3", "g4", "g5"], ["g6"]]
    for group in groups:
        assert all(c.num_tokens == 1 and c.completes for c in group)
        assert len(group) <= 4 and sum(-(-c.end // 16) for c in group) <= 6


def test_chunk_boundaries_inside_an_image_keep_its_rows():
    engine, _ = _engine(kv_cache_bytes=2**20, max_num_batched_tokens=16)
    seq, values = _image_seq("img", [101] * 5, ["a", "b", "c"], [3, 4], per_image=16)
    out = _submit(engine, seq)
    _run(engine)
    assert _tokens(out) == expected_tokens(values, 8)  # 16-token chunks cut images at 11, 27, ...


def test_a_repeated_image_prefix_is_reused_and_a_different_image_is_not():
    engine, _ = _engine(kv_cache_bytes=2**20)
    values = {"cat": 100, "dog": 200}
    first, first_values = _image_seq("q1", [101] * 4, ["cat"], [11] * 20, value_of=values)
    out = _submit(engine, first)
    _run(engine)
    assert _tokens(out) == expected_tokens(first_values, 8)
    blocks = engine.scheduler.blocks
    second, second_values = _image_seq("q2", [101] * 4, ["cat"], [12] * 20, value_of=values)
    out = _submit(engine, second)
    _run(engine)
    assert _tokens(out) == expected_tokens(second_values, 8)
    assert blocks.hit_tokens == 16  # block 0 (4 text + 12 image) only: block 1 holds new text
    other, other_values = _image_seq("q3", [101] * 4, ["dog"], [11] * 20, value_of=values)
    out = _submit(engine, other)
    _run(engine)
    assert _tokens(out) == expected_tokens(other_values, 8) and blocks.hit_tokens == 16
    again, again_values = _image_seq("q4", [101] * 4, ["cat"], [11] * 20, value_of=values)
    out = _submit(engine, again)
    _run(engine)
    assert _tokens(out) == expected_tokens(again_values, 8)
    assert blocks.hit_tokens == 16 + 32  # both of q1's full blocks (40 tokens: the last recomputed)


def test_an_image_sent_twice_at_once_is_prefilled_once():
    engine, _ = _engine(kv_cache_bytes=2**20)  # a 64-token step, no cap: room for all three
    values = {"cat": 100, "dog": 200}
    first, first_values = _image_seq("q1", [101] * 4, ["cat"], [11] * 20, value_of=values)
    second, second_values = _image_seq("q2", [101] * 4, ["cat"], [12] * 20, value_of=values)
    other, other_values = _image_seq("q3", [101] * 4, ["dog"], [11] * 20, value_of=values)
    outs = [_submit(engine, seq) for seq in (first, second, other)]
    engine.step()
    scheduler = engine.scheduler
    # q2 waits for q1's block of the cat image; q3, behind it, is not held up.
    assert scheduler.running == [first, other] and list(scheduler.waiting) == [second]
    _run(engine)
    for out, values_ in zip(outs, (first_values, second_values, other_values)):
        assert _tokens(out) == expected_tokens(values_, 8)
    assert scheduler.blocks.hit_tokens == 16  # q2 took block 0 (4 text + 12 image) from q1


def test_a_full_pool_makes_work_wait_or_preempts_and_outputs_stay_exact():
    # 17 usable blocks of 16 tokens: one sequence of 256 fits, four of ~100 do not.
    engine, runner = _engine(kv_cache_bytes=TINY_KV.block_bytes(16) * 18, max_num_batched_tokens=64)
    rng = np.random.default_rng(1)
    seqs = []
    for i in range(6):
        prompt = [101] + rng.integers(1000, 20000, size=40 + 10 * i).tolist()
        seq = _seq(f"p{i}", prompt, max_tokens=60)
        seqs.append((seq, prompt, _submit(engine, seq)))
    _run(engine)
    for seq, prompt, out in seqs:
        assert _tokens(out) == expected_tokens(prompt, 60), seq.request_id
    assert engine.scheduler.preemptions > 0
    assert engine.scheduler.blocks.num_used == 0


def test_randomized_workload_is_exact_and_uses_only_warmdecoder_shapes():
    # The real LLaVA-1.5 geometry: 576 tokens per image, 4096 positions, 1-4 images a request.
    engine, runner = _engine(kv=LLAVA_7B_KV, max_position_embeddings=4096, max_model_len=4096,
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
        seq, prompt_values = _image_seq(f"r{i}", before, keys, after, per_image=576, value_of=values)
        seq.sampling = SamplingParams(max_tokens=pyrng.randint(1, 40), temperature=0.0, ignore_eos=True)
        pending.append((seq, prompt_values, _submit(engine, seq)))
        if pyrng.random() < 0.5:
            for _ in range(pyrng.randint(1, 6)):
                engine.step()
    _run(engine)
    for seq, prompt_values, out in pending:
        assert _tokens(out) == expected_tokens(prompt_values, seq.sampling.max_tokens), seq.request_id
    blocks = engine.scheduler.blocks
    assert blocks.hit_tokens > 0 and engine.scheduler.preemptions > 0
    assert blocks.num_used == 0
    assert {kind for kind, _ in runner.graphs} <= {"decode", "prefill", "mixed"}


# --- faults --------------------------------------------------------------------------------
def test_a_failing_sink_or_postprocessing_ends_only_its_own_request():
    engine, runner = _engine(kv_cache_bytes=2**20)

    def bad_sink(item):
        if not isinstance(item, BaseException):
            raise RuntimeError("client callback broke")

    def broken_detokenizer(token_id):
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "planted")

    good_out = _submit(engine, _seq("good", [101, 5, 6, 7]))
    engine.submit(_seq("bad", [101, 8, 9]), bad_sink)
    broken_out = _submit(engine, _seq("broken", [101, 8, 9, 10]))
    engine.step()  # one prefill for all three: "bad"'s sink raises on its first token
    engine._requests["broken"].detokenizer.add = broken_detokenizer
    _run(engine)
    assert _tokens(good_out) == expected_tokens([101, 5, 6, 7], 8)
    assert len(broken_out) == 2 and isinstance(broken_out[1], DecoderStepError)
    assert "planted" in str(broken_out[1])
    assert engine.stats()["step_errors"] == 2 and engine.scheduler.blocks.num_used == 0

    runner.fail_next = "prefill"
    failed = _submit(engine, _seq("graph", [101, 4]))
    engine.step()
    after = _submit(engine, _seq("after", [101, 4]))
    _run(engine)
    assert isinstance(failed[-1], DecoderStepError) and "injected prefill failure" in str(failed[-1])
    assert _tokens(after) == expected_tokens([101, 4], 8)


def test_a_failing_mixed_graph_fails_its_decodes_and_chunks_and_the_engine_goes_on():
    engine, runner = _engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    outs = [_submit(engine, _seq(f"s{i}", [101, 5 + i, 6])) for i in range(3)]
    engine.step()
    long = _submit(engine, _seq("long", [101] * 100))
    runner.fail_next = "mixed"
    engine.step()  # three decodes and long's first chunk, on one graph that raises
    assert [kind for kind, _ in runner.graphs][-1] == "mixed"
    for out in [*outs, long]:
        assert isinstance(out[-1], DecoderStepError) and "injected mixed failure" in str(out[-1])
    assert engine.scheduler.blocks.num_used == 0
    after = _submit(engine, _seq("after", [101, 4]))
    _run(engine)
    assert _tokens(after) == expected_tokens([101, 4], 8)


def test_a_duplicate_request_id_is_refused_without_touching_the_first():
    engine, _ = _engine(kv_cache_bytes=2**20)
    first = _submit(engine, _seq("same", [101, 5]))
    second = _submit(engine, _seq("same", [101, 6]))
    _run(engine)
    assert _tokens(first) == expected_tokens([101, 5], 8)
    assert len(second) == 1 and "already running" in str(second[0])


def test_aborting_frees_blocks_at_once():
    engine, _ = _engine(kv_cache_bytes=2**20)
    out = _submit(engine, _seq("gone", [101] * 40, max_tokens=100))
    engine.step()
    engine.step()
    assert engine.scheduler.blocks.num_used == 3 and out
    engine.abort("gone")
    engine.step()
    assert engine.scheduler.blocks.num_used == 0 and not engine.scheduler.has_work()
