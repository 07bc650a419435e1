"""An engine over the fake runner (tests/fake_decoder.py), and sequences to feed it: the
harness of the decoder's host-side tests (tests/test_decoder_units.py, test_decoder_steps.py)."""

import time
from typing import NamedTuple

import numpy as np

from decoder_service.background_compiles import BackgroundCompiles
from decoder_service.block_manager import BlockManager
from decoder_service.engine import Engine
from decoder_service.scheduler import Scheduler
from decoder_service.sequence import Sequence, image_spans
from deploy.demo_checkpoint import build_tokenizer
from runtime.host_cpu import HostCpu
from runtime.messages import SamplingParams
from tests.fake_decoder import TINY_KV, FakeRunner, decoder_shapes

IMG = 30522
TOKENIZER = build_tokenizer(max_length=512)


def plain_seq(rid, prompt, images=(), rows=None, **sampling):
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **sampling})
    return Sequence(rid, list(prompt), params, seed=0, images=tuple(images), image_rows=rows)


def image_seq(rid, text_before, keys, text_after, per_image=16, value_of=None):
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
    return plain_seq(rid, prompt, spans, rows if keys else None), prompt_values


def fake_engine(kv=TINY_KV, max_position_embeddings=1024, prefix_caching=True, all_warm=True,
                graph_times=None, clock=None, **overrides):
    shapes = decoder_shapes(kv, max_position_embeddings, **overrides)
    runner = FakeRunner(shapes, all_warm=all_warm)
    blocks = BlockManager(shapes.num_blocks, shapes.block_size, prefix_caching)
    cap = overrides.get("max_chunk_tokens_while_decoding", shapes.max_chunk_tokens)  # default: none
    scheduler = Scheduler(shapes, blocks, cap)
    compiles = BackgroundCompiles(runner, host_cpu=HostCpu(read=lambda: None))  # always spare CPUs
    engine = Engine(runner, scheduler, TOKENIZER, eos_token_id=102, compiles=compiles,
                    graph_times=graph_times, clock=clock or time.monotonic)
    return engine, runner


def submit(engine, seq):
    out = []
    engine.submit(seq, out.append)
    return out


def run_to_end(engine, limit=10_000):
    steps = 0
    while engine.scheduler.has_work() or not engine._inbox.empty():
        engine.step()
        steps += 1
        assert steps < limit, "the engine made no progress"
    return steps


def tokens_of(chunks):
    assert not any(isinstance(c, BaseException) for c in chunks), chunks
    return [t for c in chunks for t in c.token_ids]


class RecordedStep(NamedTuple):
    contended: bool
    decodes: int  # decoding sequences
    chunk_tokens: int
    beside_encoder: bool  # sized for an announced encoder batch


def record_steps(engine) -> list[RecordedStep]:
    """From now on, each step the engine's scheduler makes."""
    steps = []
    schedule = engine.scheduler.schedule

    def recording(contended=False, encoder_busy=False):
        step = schedule(contended=contended, encoder_busy=encoder_busy)
        if step is not None:
            steps.append(RecordedStep(contended, len(step.decodes),
                                      sum(c.num_tokens for c in step.chunks), step.beside_encoder))
        return step
    engine.scheduler.schedule = recording
    return steps
