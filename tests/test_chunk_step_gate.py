"""runtime.chunk_step_gate: an encoder's batch waits for the decoders' chunk-carrying steps (held
shared, so decoders never wait for each other), at most `max_wait_s`; and the engine holds the
gate through exactly the steps that carry a chunk beside decodes."""

import threading
import time
from contextlib import contextmanager

from runtime.chunk_step_gate import ChunkStepGate
from tests.decoder_harness import fake_engine, plain_seq, run_to_end, submit, tokens_of
from tests.fake_decoder import expected_tokens


def test_the_encoder_waits_for_a_chunk_step_and_decoders_share_it(tmp_path):
    path = str(tmp_path / "gate")
    decoder, other_decoder, encoder = ChunkStepGate(path), ChunkStepGate(path), ChunkStepGate(path, max_wait_s=5)
    events = []
    with decoder.chunk_step():
        with other_decoder.chunk_step():  # shared: a second decoder's step does not wait
            events.append("both decoders in a chunk step")

        def encode():
            encoder.wait_for_gap()
            events.append("encoder starts")

        thread = threading.Thread(target=encode)
        thread.start()
        time.sleep(0.2)
        events.append("chunk step ends")
    thread.join(5)
    assert events == ["both decoders in a chunk step", "chunk step ends", "encoder starts"]
    assert 0.15 < encoder.waited_s < 2
    assert encoder.wait_for_gap() < 0.1  # no step in flight: at once


def test_the_encoder_waits_at_most_max_wait(tmp_path):
    path = str(tmp_path / "gate")
    decoder, encoder = ChunkStepGate(path), ChunkStepGate(path, max_wait_s=0.1)
    with decoder.chunk_step():
        began = time.monotonic()
        waited = encoder.wait_for_gap()
        assert 0.1 <= waited and time.monotonic() - began < 1


class RecordingGate:
    """Records the graphs each held step ran (the fake runner logs every call)."""

    def __init__(self, runner):
        self.runner = runner
        self.held = []

    @contextmanager
    def chunk_step(self):
        before = len(self.runner.graphs)
        yield
        self.held.append([kind for kind, _ in self.runner.graphs[before:]])


def test_the_engine_holds_the_gate_through_exactly_the_steps_with_a_chunk_beside_decodes():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32)
    engine.chunk_gate = gate = RecordingGate(runner)
    first = submit(engine, plain_seq("a", [101, 5, 6]))
    engine.step()  # its prompt alone: nothing decodes
    engine.step()  # its decode alone
    assert gate.held == [] and [kind for kind, _ in runner.graphs] == ["prefill", "decode"]
    long = submit(engine, plain_seq("long", [101] * 100))
    run_to_end(engine)
    assert gate.held and len(gate.held) == engine.steps["mixed"]
    assert all(kinds in (["mixed"], ["decode", "prefill"]) for kinds in gate.held)
    assert len(runner.graphs) > sum(map(len, gate.held))  # decode-only steps ran outside it
    assert tokens_of(first) == expected_tokens([101, 5, 6], 8)
    assert tokens_of(long) == expected_tokens([101] * 100, 8)
