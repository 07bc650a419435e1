"""runtime.chunk_step_gate: an encoder's batch waits for the decoders' chunk-carrying steps (held
shared, so decoders never wait for each other), at most `max_wait_s`, and is announced from
before that wait until it is computed; the engine holds the gate through exactly the steps that
carry a chunk beside decodes, unless an announced batch sized the step (a halved chunk)."""

import threading
import time
from contextlib import contextmanager

from runtime.chunk_step_gate import ChunkStepGate
from tests.decoder_harness import fake_engine, plain_seq, record_steps, run_to_end, submit, tokens_of
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


def test_an_encoders_batch_is_announced_from_before_its_wait_until_it_is_computed(tmp_path):
    path = str(tmp_path / "gate")
    decoder, encoder, other_encoder = (ChunkStepGate(path), ChunkStepGate(path, max_wait_s=5),
                                       ChunkStepGate(path))
    assert not decoder.encoder_busy()
    seen = []
    with decoder.chunk_step():
        def encode():
            with encoder.encoding():
                seen.append(("computing", decoder.encoder_busy()))
                with other_encoder.encoding():  # shared: a second encoder does not wait
                    seen.append(("both computing", decoder.encoder_busy()))

        thread = threading.Thread(target=encode)
        thread.start()
        time.sleep(0.2)
        seen.append(("waiting for the chunk step", decoder.encoder_busy()))
    thread.join(5)
    assert seen == [("waiting for the chunk step", True), ("computing", True), ("both computing", True)]
    assert not decoder.encoder_busy()  # released when the batch is done
    assert encoder.waited_s > 0.15


class RecordingGate:
    """Records the graphs each held step ran (the fake runner logs every call); `busy`: what
    `encoder_busy` answers."""

    def __init__(self, runner, busy=False):
        self.runner = runner
        self.held = []
        self.busy = busy

    def encoder_busy(self):
        return self.busy

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


def test_an_announced_encoder_batch_halves_the_chunk_beside_half_a_decode_batch_and_is_not_waited_for():
    engine, runner = fake_engine(kv_cache_bytes=2**20, max_chunk_tokens_while_decoding=32, max_num_seqs=4)
    engine.chunk_gate = gate = RecordingGate(runner, busy=True)
    steps = record_steps(engine)

    def mixed():  # (decodes, chunk tokens, beside_encoder) of the steps with both
        return [(s.decodes, s.chunk_tokens, s.beside_encoder) for s in steps if s.decodes and s.chunk_tokens]

    first = submit(engine, plain_seq("a", [101, 5, 6]))
    engine.step()  # its prompt alone
    second = submit(engine, plain_seq("b", [101] * 40))
    engine.step()  # one decode of 4: the prompt filling the batch keeps its whole chunk
    assert mixed() == [(1, 32, False)] and len(gate.held) == 1
    long = submit(engine, plain_seq("long", [101] * 100))
    run_to_end(engine)
    sized = mixed()
    beside = [s for s in sized if s[2]]
    assert beside and all(d >= 2 and tokens <= 16 for d, tokens, _ in beside)
    assert all(tokens <= 32 and (d >= 2) == b for d, tokens, b in sized)
    assert len(gate.held) == len(sized) - len(beside)  # the steps sized for the encoder do not hold it
    assert tokens_of(first) == expected_tokens([101, 5, 6], 8)
    assert tokens_of(second) == expected_tokens([101] * 40, 8)
    assert tokens_of(long) == expected_tokens([101] * 100, 8)
