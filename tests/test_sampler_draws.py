"""The sampler's draws on eager torch: greedy and the top-k / top-p limits, counter-based
noise that depends only on (seed, step, token), and draws that follow the distribution.
(Logit adjustments: tests/test_sampler_adjust.py.)"""

import numpy as np
import torch

from decoder_service.sampler import SamplingRows, index_tensors, sample, split_seed, uniform_noise, unpack


def _rows(n, temperature=1.0, top_p=1.0, top_k=0, seed=0, step=0, vocab=50):
    rows = SamplingRows.padding(n, vocab, history_len=8)
    for i in range(n):
        rows.set_row(i, temperature=temperature, top_p=top_p, top_k=top_k or vocab, seed=seed, step=step)
    return rows.to(torch.device("cpu"))


def _sample(logits, rows):
    return sample(logits, **rows, **index_tensors(logits.shape[-1], torch.device("cpu"), 8))


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
