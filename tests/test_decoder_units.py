"""Host-side pieces of the decoder, tested without a model: scatter indices, scheduling,
detokenization, sampling."""

import numpy as np
import pytest
import torch

from decoder_service.config import DecoderConfig, derive_shapes
from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.image_merge import build_image_index, merge_image_rows
from decoder_service.sampler import SamplingRows, index_tensors, sample, split_seed, uniform_noise, unpack
from decoder_service.scheduler import Scheduler, Sequence, SeqStatus
from deploy.demo_checkpoint import build_tokenizer
from runtime.messages import SamplingParams

IMG = 9


def test_image_index_fills_placeholders_in_order_across_prompts():
    # prompt 0: text, 2 placeholders; prompt 1: 3 placeholders split by text; then padding
    tokens = np.array([1, IMG, IMG, 2, IMG, 3, IMG, IMG, 0, 0])
    row_index, is_image = build_image_index(tokens, IMG, row_offsets=[0, 2], placeholder_counts=[2, 3])
    assert is_image.tolist() == [t == IMG for t in tokens]
    assert row_index[is_image].tolist() == [0, 1, 2, 3, 4]

    text = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 4)
    rows = -torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4) - 1  # 5 real + 3 padding
    merged = merge_image_rows(text, rows, torch.from_numpy(row_index), torch.from_numpy(is_image))
    expected = text.clone().masked_scatter(torch.from_numpy(is_image)[:, None].expand(-1, 4), rows[:5])
    torch.testing.assert_close(merged, expected)


def test_image_index_rejects_a_count_mismatch():
    with pytest.raises(ValueError, match="3 image placeholders in the step, but the prompts declare 2"):
        build_image_index(np.array([IMG, IMG, IMG]), IMG, [0], [2])


def _shapes(**overrides):
    config = DecoderConfig(model="unused", max_num_seqs=3, max_prefill_seqs=2, **overrides)
    return derive_shapes(config, max_position_embeddings=128, tokens_per_image=16)


def _seq(rid, n, images=0):
    return Sequence(rid, np.zeros(n, np.int64), None, images, SamplingParams(), seed=0)


def test_shapes_cover_every_bucket_pair():
    shapes = _shapes()
    assert shapes.prefill_token_buckets == (16, 32, 64, 128)
    assert shapes.decode_batch_buckets == (1, 2, 3)
    assert (16, 1) in shapes.prefill_graphs() and (16, 2) not in shapes.prefill_graphs()
    assert len(shapes.decode_graphs()) == 3 * len(shapes.attention_len_buckets)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        derive_shapes(DecoderConfig(model="x", max_model_len=256), 128, 16)


def test_scheduler_packs_prefills_within_budgets_then_decodes():
    scheduler = Scheduler(_shapes(), max_prefill_images=2)
    a, b, c, d = _seq("a", 100), _seq("b", 40), _seq("c", 10, images=2), _seq("d", 5)
    for s in (a, b, c, d):
        scheduler.add(s)
    first = scheduler.schedule()
    assert first.kind == "prefill" and first.seqs == [a]  # a + b would pass 128 tokens
    second = scheduler.schedule()
    assert second.kind == "prefill" and second.seqs == [b, c]  # two prompts per step at most
    third = scheduler.schedule()
    assert third.kind == "decode" and third.seqs == [a, b, c]  # d waits: no free slot
    assert {s.slot for s in third.seqs} == {0, 1, 2}
    scheduler.finish(b)
    assert b.status is SeqStatus.FINISHED and scheduler.num_free_slots == 1
    fourth = scheduler.schedule()
    assert fourth.kind == "prefill" and fourth.seqs == [d] and d.slot == 1
    e = _seq("e", 3)
    scheduler.add(e)
    scheduler.finish(e)  # aborted while waiting
    assert e not in scheduler.waiting


def test_detokenizer_cuts_stop_strings_split_across_tokens():
    tokenizer = build_tokenizer(max_length=64)
    ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("on th",))
    pieces = [detok.add(i) for i in ids]
    assert detok.stopped
    assert "".join(pieces) + detok.flush() == "the cat sat "
    plain = IncrementalDetokenizer(tokenizer)
    assert "".join(plain.add(i) for i in ids) + plain.flush() == "the cat sat on the mat"


def test_detokenizer_holds_back_a_possible_stop_prefix_until_the_end():
    tokenizer = build_tokenizer(max_length=64)
    detok = IncrementalDetokenizer(tokenizer, stop=("mat!",))
    emitted = [detok.add(i) for i in tokenizer("the mat", add_special_tokens=False)["input_ids"]]
    assert not "".join(emitted).endswith("mat")  # "mat" could begin "mat!"
    assert "".join(emitted) + detok.flush() == "the mat"


def _rows(n, temperature=1.0, top_p=1.0, top_k=0, seed=0, step=0, vocab=50):
    rows = SamplingRows.padding(n, vocab)
    for i in range(n):
        rows.set_row(i, temperature=temperature, top_p=top_p, top_k=top_k or vocab, seed=seed, step=step)
    return rows.to(torch.device("cpu"))


def _sample(logits, rows):
    return sample(logits, **rows, **index_tensors(logits.shape[-1], torch.device("cpu")))


def test_sampler_greedy_top_k_and_top_p_limits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1).tolist()
    for params in (dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)):
        rows = unpack(_sample(logits, _rows(4, **params)).numpy(), 4)
        assert [r.token_id for r in rows] == greedy, params
    # top_k=3: every draw is among the 3 best tokens of its row
    top3 = logits.topk(3).indices
    for seed in range(20):
        rows = unpack(_sample(logits, _rows(4, top_k=3, seed=seed)).numpy(), 4)
        assert all(r.token_id in top3[i].tolist() for i, r in enumerate(rows))


def _noise(seeds, steps, vocab):
    halves = [split_seed(s) for s in seeds]
    lo = torch.tensor([h[0] for h in halves], dtype=torch.int32)
    hi = torch.tensor([h[1] for h in halves], dtype=torch.int32)
    return uniform_noise(lo, hi, torch.tensor(steps, dtype=torch.int32),
                         torch.arange(vocab, dtype=torch.int32))


def test_sampler_noise_depends_only_on_seed_step_and_token():
    a = _noise([5, 5, 6], [0, 1, 0], 1000)
    b = _noise([6, 5], [0, 0], 1000)
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0.0 < float(a.min()) and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.02  # roughly uniform
    assert not torch.equal(_noise([5], [0], 100), _noise([5 + 2**40], [0], 100))  # high bits count
    assert split_seed(2**63 - 1) == (-1, 2**31 - 1)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-12] * 5]))
    draws = [unpack(_sample(logits, _rows(1, seed=s, vocab=8)).numpy(), 1)[0].token_id
             for s in range(600)]
    freq = np.bincount(draws, minlength=8) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1] + [0] * 5, atol=0.06)
