"""What one engine step carries, through the fake runner (tests/fake_decoder.py): chunks
within the budget and beside decodes, the chunk cap and its halving while the cores are
shared, one mixed graph or two calls, serving on the covering prefill graph until the
decode graph compiles, and chunk boundaries inside an image."""

import pytest

from decoder_service.config import DecoderConfig
from decoder_service.graph_times import GraphTimes
from decoder_service.inputs import build_prefill, decodes_as_chunks
from decoder_service.scheduler import Chunk
from runtime.host_cpu import HostCpu
from tests.decoder_harness import (
    fake_engine,
    image_seq,
    plain_seq,
    record_steps,
    run_to_end,
    submit,
    tokens_of,
)
from tests.fake_decoder import TINY_KV, decoder_shapes, expected_tokens


def test_prompts_are_chunked_within_the_budget_and_share_steps_with_decodes():
    engine, runner = fake_engine(kv_cache_bytes=2**20)
    short, short_values = image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = image_seq("long", [101] * 30, ["a", "b"], [9] * 90)  # 152 tokens
    out_short = submit(engine, short)
    engine.step()  # short prefilled alone, then it decodes
    out_long = submit(engine, long)
    run_to_end(engine)
    assert tokens_of(out_short) == expected_tokens(short_values, 8)
    assert tokens_of(out_long) == expected_tokens(long_values, 8)
    prefill_tokens = [g[0] for kind, g in runner.graphs if kind == "prefill"]
    assert max(prefill_tokens) <= 64 and len(prefill_tokens) >= 3  # 152 tokens over >= 3 steps
    kinds = [kind for kind, _ in runner.graphs]
    mixed = sum(a == "decode" and b == "prefill" for a, b in zip(kinds, kinds[1:]))
    assert mixed >= 2  # the long prompt's chunks ran between the short one's decodes


def test_a_step_that_decodes_carries_at_most_the_chunk_cap_and_one_that_does_not_a_budget():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=16)
    steps = record_steps(engine)
    short, short_values = image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = image_seq("long", [101] * 30, ["a", "b"], [9] * 150)  # 212 tokens
    out_short = submit(engine, short)
    engine.step()  # short prefilled alone, then it decodes for 7 steps
    out_long = submit(engine, long)
    run_to_end(engine)
    assert tokens_of(out_short) == expected_tokens(short_values, 8)
    assert tokens_of(out_long) == expected_tokens(long_values, 8)
    beside_decodes = [s.chunk_tokens for s in steps if s.decodes and s.chunk_tokens]
    alone = [s.chunk_tokens for s in steps if not s.decodes and s.chunk_tokens]
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


def test_other_threads_on_every_core_mark_the_engine_contended_before_a_call_runs_slow():
    host = HostCpu(read=lambda: None, read_running=iter([2, 3, 4, 2]).__next__, cpus=2)
    times = GraphTimes(contended_slowdown=1.5, others_computing=host.others_computing)
    times.record("g", 0.10)
    times.record("g", 0.10)  # at speed
    assert not times.contended  # the engine thread and one other: a core left
    assert times.contended and times.contended  # two, then three others: every core shared
    assert not times.contended and times.contended_calls == 0  # counts slow calls only
    asked = []
    off = GraphTimes(contended_slowdown=None, others_computing=lambda: asked.append(1) or True)
    assert not off.contended and not asked  # None turns both signals off
    assert times.watches_host and not off.watches_host


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
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32,
                                 graph_times=GraphTimes(contended_slowdown=1.5), clock=clock)
    steps = record_steps(engine)
    short, short_values = image_seq("short", [101, 5, 6], [], [7], per_image=16)
    longs = [image_seq(f"long{i}", [101] * 30, ["a", "b"], [9 + i] * 150) for i in range(2)]
    outs = [submit(engine, short)]
    engine.step()  # short prefilled alone; it decodes from the next step on
    outs.append(submit(engine, longs[0][0]))
    for _ in range(4):  # uncontended: the first long prompt's chunks take the whole cap
        engine.step()
    clock.shared = True
    outs.append(submit(engine, longs[1][0]))
    run_to_end(engine)
    for (_, values), out in zip([(short, short_values), *longs], outs):
        assert tokens_of(out) == expected_tokens(values, 8)
    beside = [(s.contended, s.chunk_tokens) for s in steps if s.decodes and s.chunk_tokens]
    assert max(chunk for contended, chunk in beside if not contended) == 32
    contended_chunks = [chunk for contended, chunk in beside if contended]
    assert contended_chunks and max(contended_chunks) == 16
    assert engine.stats()["contended_graph_calls"] > 0
    alone = [s.chunk_tokens for s in steps if s.contended and not s.decodes and s.chunk_tokens]
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
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32,
                                 **overrides)
    shorts = [image_seq(f"s{i}", [101, 5 + i, 6], [], [7], per_image=16) for i in range(3)]
    outs = [submit(engine, seq) for seq, _ in shorts]
    engine.step()  # the three prefilled together; they decode from the next step on
    long, long_values = image_seq("long", [101] * 30, ["a", "b"], [9] * 90)
    outs.append(submit(engine, long))
    run_to_end(engine)
    return [values for _, values in shorts] + [long_values], outs, runner, engine


def test_a_full_batch_and_a_chunk_share_one_mixed_graph_with_the_sametokens_of():
    values, outs, runner, engine = _full_batch_beside_a_long_prompt()
    for prompt, out in zip(values, outs):
        assert tokens_of(out) == expected_tokens(prompt, 8)
    mixed = [g for kind, g in runner.graphs if kind == "mixed"]
    assert mixed and all(g in runner.shapes.mixed_graphs() for g in mixed)
    assert engine.stats()["fused_steps"] == len(mixed) > 0
    # Off: the same steps run as a decode graph then a prefill graph, with the same tokens.
    _, apart, runner_off, engine_off = _full_batch_beside_a_long_prompt(mixed_graphs=False)
    assert [tokens_of(o) for o in apart] == [tokens_of(o) for o in outs]
    assert "mixed" not in {kind for kind, _ in runner_off.graphs}
    assert engine_off.stats()["fused_steps"] == 0
    assert engine_off.stats()["mixed_steps"] == engine.stats()["mixed_steps"]


def test_a_batch_below_half_the_mixed_rows_or_a_graph_not_yet_compiled_runs_two_graphs():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    assert runner.mixed_graph_for(3, (32, 8)) == (32, 8)
    assert runner.mixed_graph_for(2, (32, 8)) == (32, 8)  # half the mixed rows: padded up
    assert runner.mixed_graph_for(1, (32, 8)) is None  # 1 decode: bucket 1, below half of 4
    assert runner.mixed_graph_for(4, (64, 8)) is None  # more chunk tokens than a mixed step holds
    runner.plans["mixed"].compiled.clear()
    assert runner.mixed_graph_for(4, (32, 8)) is None
    short, short_values = image_seq("short", [101, 5, 6], [], [7], per_image=16)
    long, long_values = image_seq("long", [101] * 30, ["a", "b"], [9] * 90)
    out_short = submit(engine, short)
    engine.step()
    out_long = submit(engine, long)
    run_to_end(engine)  # one decode beside the chunks: two graphs a step
    assert tokens_of(out_short) == expected_tokens(short_values, 8)
    assert tokens_of(out_long) == expected_tokens(long_values, 8)
    assert "mixed" not in {kind for kind, _ in runner.graphs} and engine.stats()["mixed_steps"] > 0


def _decoding(engine, count):
    """`count` short sequences, prefilled by one step; they decode from the next one on."""
    work = [image_seq(f"s{i}", [101, 5 + i, 6], [], [7]) for i in range(count)]
    outs = [submit(engine, seq) for seq, _ in work]
    engine.step()
    return work, outs


def test_half_a_batch_decoding_beside_a_chunk_runs_padded_on_one_mixed_graph():
    """Two graphs would hold the decodes' next token back by the prefill graph and the whole
    next step; half a batch or more pads up to the mixed graph instead, with the same tokens."""
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    assert runner.shapes.mixed_batch == 4
    shorts, outs = _decoding(engine, 2)
    long, long_values = image_seq("long", [101] * 30, ["a", "b"], [9] * 90)
    outs.append(submit(engine, long))
    engine.step()  # 2 decodes (bucket 2: half of 4) and the long prompt's first chunk
    assert runner.graphs[-1][0] == "mixed" and engine.stats()["fused_steps"] == 1
    run_to_end(engine)
    for (_, values), out in zip([*shorts, (long, long_values)], outs):
        assert tokens_of(out) == expected_tokens(values, 8)


def test_chunks_no_compiled_mixed_graph_holds_wait_a_step_instead_of_splitting_it_in_two():
    """Two prompts asking about cached images need more context blocks than any compiled mixed
    graph holds (their graph still compiling, or out of memory maps): the step carries the
    first, the second waits one step, and no step runs as two graphs."""
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_num_seqs=8,
                                 max_chunk_tokens_while_decoding=32)
    value_of = {"a": 5000, "b": 7000}
    seeds = [image_seq(f"seed-{k}", [101] * 15, [k], [7], per_image=100, value_of=value_of)
             for k in "ab"]
    for seq, _ in seeds:
        submit(engine, seq)
    run_to_end(engine)  # both images' blocks are cached
    mixed = runner.plans["mixed"]
    mixed.compiled[:] = [g for g in mixed.compiled if g[1] <= 8]  # one prompt's context at most
    work, outs = _decoding(engine, 4)
    asks = [image_seq(f"ask-{k}", [101] * 15, [k], [8, 9], per_image=100, value_of=value_of)
            for k in "ab"]
    outs += [submit(engine, seq) for seq, _ in asks]
    first = len(runner.graphs)
    engine.step()
    assert runner.graphs[first:] == [("mixed", (32, 8))]
    assert [seq.num_computed for seq, _ in asks] == [117, 112]  # the second: its cached prefix
    assert engine.stats()["fused_steps_deferring_chunks"] == 1
    engine.step()
    assert runner.graphs[first + 1:] == [("mixed", (32, 8))] and asks[1][0].num_computed == 117
    run_to_end(engine)
    assert "prefill" not in {kind for kind, _ in runner.graphs[first:]}
    for (_, values), out in zip([*work, *asks], outs):
        assert tokens_of(out) == expected_tokens(values, 8)


def test_a_chunk_too_large_for_the_compiled_mixed_graphs_is_cut_to_one_that_fits():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_num_seqs=8, max_num_batched_tokens=128,
                                 max_chunk_tokens_while_decoding=64)
    assert runner.shapes.mixed_chunk_buckets == (32, 48, 64)
    mixed = runner.plans["mixed"]
    mixed.compiled[:] = [g for g in mixed.compiled if g[0] != 64]
    work, outs = _decoding(engine, 4)
    long, long_values = image_seq("long", [101] * 30, ["a"], [9] * 20, per_image=100)
    outs.append(submit(engine, long))
    first = len(runner.graphs)
    engine.step()  # a 64-token chunk: 48 of it fits, half or more
    assert runner.graphs[first:] == [("mixed", (48, 8))] and long.num_computed == 48
    mixed.compiled[:] = [g for g in mixed.compiled if g[0] == 32]
    engine.step()  # 32: half of the next 64, the least a cut keeps
    assert runner.graphs[first + 1:] == [("mixed", (32, 8))] and long.num_computed == 80
    mixed.compiled.clear()
    engine.step()  # no mixed graph at all: two
    assert [kind for kind, _ in runner.graphs[first + 2:]] == ["decode", "prefill"]
    assert long.num_computed == 144 and engine.stats()["fused_steps_deferring_chunks"] == 2
    run_to_end(engine)
    for (_, values), out in zip([*work, (long, long_values)], outs):
        assert tokens_of(out) == expected_tokens(values, 8)


def test_before_decode_graphs_exist_decodes_run_as_chunks_on_the_covering_prefill_graph():
    """A replica serves on one graph: decodes are one-token chunks, a few sequences per step,
    until the engine compiles the decode graph (here: when idle), and outputs stay exact."""
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_num_seqs=8, max_prefill_seqs=3,
                                 all_warm=False)
    covering = runner.plans["prefill"].covering
    assert runner.graphs_compiled == 1 and not runner.can_decode
    work = [image_seq(f"s{i}", [101] + [5 + i] * (3 + 7 * i), ["a"] if i % 2 else [], [7],
                      per_image=16) for i in range(7)]
    outs = [submit(engine, seq) for seq, _ in work]
    run_to_end(engine)  # never idle: no background compilation in between
    for (seq, values), out in zip(work, outs):
        assert tokens_of(out) == expected_tokens(values, 8), seq.request_id
    assert {kind for kind, _ in runner.graphs} == {"prefill"}
    assert {graph for _, graph in runner.graphs} == {covering}
    # 7 decode tokens for each of 7 sequences, at most 3 sequences per step
    assert engine.steps["decode"] >= -(-7 * 7 // 3) and not runner.can_decode
    assert engine.stats()["decode_steps_on_prefill_graph"] == engine.steps["decode"]
    assert engine.compiles.decodes_on_prefill_s > 0  # the ski-rental rule sees what they cost
    assert engine.compiles.compile_one(busy=False) and runner.can_decode  # idle: decode first
    assert runner.plans["decode"].compiled == [runner.plans["decode"].covering]
    seq, values = image_seq("after", [101, 9, 9], [], [7], per_image=16)
    out = submit(engine, seq)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(values, 8) and runner.graphs[-1][0] == "decode"


def test_decode_graph_compiles_under_load_once_slow_decodes_cost_a_compile():
    engine, runner = fake_engine(kv_cache_bytes=2**20, all_warm=False)
    runner.compile_seconds[("prefill", runner.plans["prefill"].covering)] = 0.5
    engine.compiles.share = 0.0  # only the rule for the decode graph can compile
    assert not engine.compiles.compile_one(busy=True)  # nothing lost yet, no share left
    engine.compiles.decodes_on_prefill_s = 0.5
    assert engine.compiles.compile_one(busy=True) and runner.can_decode
    assert not engine.compiles.compile_one(busy=True)  # the rest wait for the share again


def test_idle_compiles_wait_while_the_host_is_busy():
    engine, runner = fake_engine(kv_cache_bytes=2**20, all_warm=False)
    readings = iter([(0, 0), (10, 200), (190, 400)])  # 5 % idle, then 90 %
    engine.compiles.host_cpu = HostCpu(read=readings.__next__)
    assert not engine.compiles.compile_one(busy=False) and not runner.can_decode
    assert engine.compiles.compile_one(busy=False) and runner.can_decode
    while runner.graphs_compiled < runner.graphs_planned:
        runner.compile_next()
    engine.compiles.host_cpu.has_spare = lambda: pytest.fail("read the host with every graph compiled")
    assert not engine.compiles.compile_one(busy=False)


def test_decodes_as_chunks_groups_fit_the_prefill_graph():
    shapes = decoder_shapes(TINY_KV, 1024, kv_cache_bytes=2**20, max_prefill_seqs=4)
    seqs = [plain_seq(f"g{i}", [101] * n) for i, n in enumerate([40, 40, 10, 10, 10, 10, 90])]
    groups = decodes_as_chunks(seqs, shapes, (64, 6))  # 6 blocks of 16: 96 tokens of context
    assert [[c.seq.request_id for c in g] for g in groups] == [
        ["g0", "g1"], ["g2", "g3", "g4", "g5"], ["g6"]]
    for group in groups:
        assert all(c.num_tokens == 1 and c.completes for c in group)
        assert len(group) <= 4 and sum(-(-c.end // 16) for c in group) <= 6


def test_chunk_boundaries_inside_an_image_keep_its_rows():
    engine, _ = fake_engine(kv_cache_bytes=2**20, max_num_batched_tokens=16)
    seq, values = image_seq("img", [101] * 5, ["a", "b", "c"], [3, 4], per_image=16)
    out = submit(engine, seq)
    run_to_end(engine)
    assert tokens_of(out) == expected_tokens(values, 8)  # 16-token chunks cut images at 11, 27, ...



def test_only_a_chunk_that_completes_its_prompt_carries_sampling_settings():
    """A chunk that ends before its prompt does is never sampled: its row keeps the neutral
    padding, so no history is copied and no grammar filled for it."""
    shapes = decoder_shapes(TINY_KV, 1024)
    settings = dict(temperature=0.7, top_k=5, frequency_penalty=0.5, logit_bias=((7, 2.0),))
    first, second = (plain_seq(rid, [101] + list(range(1000, 1040)), **settings) for rid in "ab")
    for seq in (first, second):
        seq.block_table = [1, 2, 3]
    chunks = [Chunk(first, 0, 20), Chunk(second, 0, 41)]
    assert [c.completes for c in chunks] == [False, True]
    rows = build_prefill(chunks, shapes, graph=(64, 8), hidden_size=4, vocab_size=2048).sampling
    assert (rows.temperature[0], rows.top_k[0], rows.frequency[0]) == (0.0, 2048, 0.0)
    assert (rows.temperature[1], rows.top_k[1], rows.frequency[1]) == (pytest.approx(0.7), 5, 0.5)
    assert (rows.history_ids[0] == 2048).all() and rows.history_ids[1, :41].tolist() == second.prompt_ids
    assert rows.bias_ids[1, 0] == 7 and (rows.bias_ids[0] == 2048).all()
