"""The sampler's logit adjustments against numpy: logit_bias and min_tokens' bans, vLLM's
repetition / frequency / presence penalties, and the grammar bitmask (xgrammar's layout).
Rows with neutral padding are unchanged, so one graph serves rows with and without them.
Run on eager torch and on the XLA device (PJRT CPU): the two differ in integer corners."""

import numpy as np
import pytest
import torch

from decoder_service.sampler import SamplingRows, bitmask_words, index_tensors, sample, unpack

VOCAB, HISTORY = 70, 12


def _adjusted_by_numpy(logits, *, bias=(), prompt=(), output=(), rep=1.0, freq=0.0, pres=0.0,
                       allowed=None):
    """vLLM's formulas, one row."""
    x = logits.astype(np.float64).copy()
    for token, value in bias:
        x[token] += value
    seen = np.zeros(VOCAB, bool)
    seen[list(prompt) + list(output)] = True
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    counts = np.bincount(np.asarray(output, np.int64), minlength=VOCAB)
    x = x - freq * counts - pres * (counts > 0)
    if allowed is not None:
        x = np.where(np.isin(np.arange(VOCAB), allowed), x, -np.inf)
    return x


def _bitmask_row(allowed):
    words = np.zeros(bitmask_words(VOCAB), np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32)


@pytest.fixture(params=["cpu", "xla"])
def device(request):
    if request.param == "cpu":
        return torch.device("cpu")
    from runtime.device import open_device

    return open_device("xla").torch_device


def _run(logits, rows, device):
    out = sample(torch.from_numpy(logits).to(device), **rows.to(device),
                 **index_tensors(VOCAB, device, HISTORY))
    return unpack(out.cpu().numpy(), len(logits))


def test_penalties_bias_and_bitmask_follow_vllms_formulas(device):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, VOCAB)) * 3).astype(np.float32)
    rows = SamplingRows.padding(5, VOCAB, HISTORY)
    cases = [  # row 4 stays padding: unchanged
        dict(prompt=(3, 4, 5, 5), output=(7, 7, 7, 9), rep=1.7, freq=0.5, pres=0.8),
        dict(prompt=(1, 2), output=(2, 60, 60), rep=0.6, freq=-0.4, pres=-1.0),
        dict(bias=((11, 100.0), (12, -5.5), (11, 0.25), (0, float("-inf")))),
        dict(allowed=(2, 31, 32, 33, 63, 64, 69), bias=((31, 2.0),), prompt=(31,), output=(32,),
             rep=1.3, pres=0.2),
    ]
    for i, case in enumerate(cases):
        rows.set_row(i, temperature=0.0, top_p=1.0, top_k=VOCAB, seed=i, step=0)
        if "rep" in case:
            rows.set_penalties(i, presence=case.get("pres", 0.0), frequency=case.get("freq", 0.0),
                               repetition=case["rep"], prompt_ids=list(case.get("prompt", ())),
                               output_ids=list(case.get("output", ())))
        if "bias" in case:
            rows.set_bias(i, list(case["bias"]))
        if "allowed" in case:
            rows.bitmask[i] = _bitmask_row(case["allowed"])
    sampled = _run(logits, rows, device)
    for i, case in enumerate(cases + [{}]):
        expected = _adjusted_by_numpy(logits[i], **case)
        logprobs = expected - np.logaddexp.reduce(expected[np.isfinite(expected)])
        assert sampled[i].token_id == int(np.argmax(expected)), i  # greedy = argmax of adjusted
        np.testing.assert_allclose(sampled[i].logprob, logprobs[sampled[i].token_id], rtol=1e-4,
                                   atol=1e-4)
        top = sampled[i].top_logprobs
        np.testing.assert_allclose(top, np.sort(logprobs)[::-1][:len(top)], rtol=1e-4, atol=1e-4)
    assert sampled[2].token_id == 11  # +100.25
    assert sampled[3].token_id in cases[3]["allowed"]


def test_the_bitmask_confines_sampled_tokens_and_leaves_other_rows_alone(device):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, VOCAB)).astype(np.float32)
    allowed = (5, 40, 41)
    for seed in range(30):
        rows = SamplingRows.padding(2, VOCAB, HISTORY)
        for i in range(2):
            rows.set_row(i, temperature=1.0, top_p=1.0, top_k=VOCAB, seed=seed, step=3)
        rows.bitmask[0] = _bitmask_row(allowed)
        free = SamplingRows.padding(2, VOCAB, HISTORY)
        for i in range(2):
            free.set_row(i, temperature=1.0, top_p=1.0, top_k=VOCAB, seed=seed, step=3)
        constrained, unconstrained = _run(logits, rows, device), _run(logits, free, device)
        assert constrained[0].token_id in allowed
        assert constrained[1].token_id == unconstrained[1].token_id  # its neighbour is unchanged
        assert constrained[1].logprob == unconstrained[1].logprob


def test_top_logprobs_are_the_distributions_best_whatever_the_temperature(device):
    """The top logprobs come from the sampling candidates' top-k of the temperature-scaled
    logits: the same tokens, in the same order, as the top of log_softmax of the logits."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, VOCAB)) * 4).astype(np.float32)
    rows = SamplingRows.padding(6, VOCAB, HISTORY)
    settings = [(0.0, 1.0, VOCAB), (0.7, 1.0, VOCAB), (1.5, 1.0, VOCAB), (0.3, 0.5, VOCAB),
                (2.0, 1.0, 3), (1.0, 0.9, 10)]
    for i, (temperature, top_p, top_k) in enumerate(settings):
        rows.set_row(i, temperature=temperature, top_p=top_p, top_k=top_k, seed=i, step=i)
    for i, row in enumerate(_run(logits, rows, device)):
        logprobs = logits[i].astype(np.float64) - np.logaddexp.reduce(logits[i].astype(np.float64))
        best = np.argsort(-logprobs)[:len(row.top_ids)]
        assert row.top_ids.tolist() == best.tolist(), settings[i]
        np.testing.assert_allclose(row.top_logprobs, logprobs[best], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(row.logprob, logprobs[row.token_id], rtol=1e-4, atol=1e-4)
