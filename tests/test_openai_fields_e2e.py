"""Issue 16 through the official OpenAI client against the whole app on Ray Serve: structured
outputs (json_object, json_schema) that parse, validate and are the model's greedy choice
among the grammar's allowed tokens; n > 1 choices, streamed and not; penalties and biases;
no graph compiled after warm-up with all of them mixed; unsupported fields refused."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
import torch
from openai import BadRequestError

from tests.support import app_stats, deployed_app, image_data_url, openai_client


APP = "splitserve-fields"
NEAR_TIE = 1e-4
SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "indoor": {"type": "boolean"},
    },
    "required": ["animal", "count", "indoor"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "describe the animal in the photo as json please, "
                                        "with its name, how many there are and where it is"}]


@pytest.fixture(scope="module")
def app_url(ray_serve, serve_http_port, tiny_checkpoint):
    args = {"model": str(tiny_checkpoint), "served_model_name": "llava-tiny", "strict_compile": True,
            "decoder": {"max_model_len": 256, "max_num_seqs": 4}, "encoder": {"max_batch_items": 4}}
    with deployed_app(ray_serve, serve_http_port, APP, args) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return openai_client(app_url)


def _stats():
    return app_stats(APP)


EXTENSIONS = ("min_tokens", "repetition_penalty", "ignore_eos", "top_k")  # not in OpenAI's client


def _chat(client, messages=QUESTION, **kwargs):
    extra = {k: kwargs.pop(k) for k in EXTENSIONS if k in kwargs}
    if extra:
        kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
    return client.chat.completions.create(model="llava-tiny", messages=messages, **kwargs)


def _masked_greedy(tiny_checkpoint, reference_llava, response_format, max_tokens, bias):
    """The eager reference: transformers' LLaVA logits plus `bias`, masked by the same grammar,
    argmax.
    Returns (token ids, the gap between the two best allowed logits at each step)."""
    from transformers import AutoProcessor

    from decoder_service.grammar import Grammars
    from router.prompt import PromptBuilder
    from router.schemas import ChatMessage
    from runtime.checkpoint import open_config
    from runtime.geometry import geometry_of

    processor, model = reference_llava
    builder = PromptBuilder(AutoProcessor.from_pretrained(tiny_checkpoint),
                            geometry_of(open_config(str(tiny_checkpoint))).tokens_per_image)
    ids = builder.build([ChatMessage.model_validate(m) for m in QUESTION]).token_ids
    vocab = model.config.text_config.vocab_size
    eos = model.config.text_config.eos_token_id
    grammars = Grammars(processor.tokenizer, vocab, eos)
    state = grammars.matcher(response_format)
    bitmask = np.zeros((1, -(-vocab // 32)), np.int32)
    allowed_bits = np.arange(vocab)
    out, gaps = [], []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().numpy()
        for token, value in bias.items():
            logits[token] += value
        state.fill(bitmask, 0)
        allowed = (bitmask[0, allowed_bits // 32] >> (allowed_bits % 32)) & 1
        masked = np.where(allowed == 1, logits, -np.inf)
        best = np.sort(masked)[-2:]
        gaps.append(float(best[1] - best[0]))
        token = int(np.argmax(masked))
        out.append(token)
        state.accept(token)
        if state.is_terminated:
            break
    return out, gaps, state.decode(out), len(ids)


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_json_outputs_validate_and_are_the_masked_greedy_tokens(client, tiny_checkpoint,
                                                                reference_llava, kind):
    from runtime.messages import ResponseFormat

    bias = {}
    if kind == "json_object":
        # Random weights never close an open-ended object by themselves: a nudge towards '"'
        # and '}' (the same in the reference) lets the output end well within max_tokens.
        tokenizer = reference_llava[0].tokenizer
        bias = {tokenizer.convert_tokens_to_ids(t): 8.0 for t in ('"', "}")}
        body = {"type": "json_object"}
        fmt, schema = ResponseFormat("json_object"), {"type": "object"}
    else:
        body = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA,
                                                       "strict": True}}
        fmt, schema = ResponseFormat("json_schema", json.dumps(SCHEMA, sort_keys=True,
                                                               separators=(",", ":"))), SCHEMA
    free_alone = _chat(client, max_tokens=24, temperature=0.0).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:  # an unconstrained request shares the batch
        constrained = pool.submit(_chat, client, max_tokens=60, temperature=0.0, logprobs=True,
                                  response_format=body,
                                  logit_bias={str(t): v for t, v in bias.items()} or None)
        free = pool.submit(_chat, client, max_tokens=24, temperature=0.0)
        response, free_text = constrained.result(), free.result().choices[0].message.content
    assert free_text == free_alone
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    jsonschema.validate(value, schema)

    expected, gaps, expected_text, prompt_len = _masked_greedy(tiny_checkpoint, reference_llava,
                                                               fmt, 60, bias)
    assert response.usage.prompt_tokens == prompt_len
    got = [t.token for t in choice.logprobs.content]
    tokenizer = reference_llava[0].tokenizer
    want = [tokenizer.decode([t]) for t in expected]
    for step, (g, w) in enumerate(zip(got, want)):
        if gaps[step] < NEAR_TIE:
            break  # a near-tie may flip with float rounding; the rest is a different path
        assert g == w, (step, got, want)
    else:
        assert len(got) == len(want)
        assert choice.message.content == expected_text


def test_n_choices_are_indexed_reproducible_and_share_the_prompt(client):
    # A prompt no other test sends: the prefix cache holds none of it before.
    messages = [{"role": "user", "content": "three different short stories about a lighthouse "
                                            "keeper and the sea, please, one for each choice"}]
    params = dict(messages=messages, max_tokens=12, temperature=1.0, seed=7, n=3)
    before = _stats()["decoder"]
    unary = _chat(client, logprobs=True, **params)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    texts = [c.message.content for c in unary.choices]
    assert len(set(texts)) > 1  # sampled independently
    assert unary.usage.completion_tokens == sum(len(c.logprobs.content) for c in unary.choices)
    hits = _stats()["decoder"]["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    full_blocks = (unary.usage.prompt_tokens - 1) // 16
    assert full_blocks >= 1 and hits == 2 * full_blocks * 16  # choices 1, 2 reuse choice 0's blocks

    streamed = {0: "", 1: "", 2: ""}
    finished, usage = set(), None
    for chunk in _chat(client, stream=True, stream_options={"include_usage": True}, **params):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == texts  # seeded: each choice reproduces
    assert usage.prompt_tokens == unary.usage.prompt_tokens  # the prompt counted once
    assert usage.completion_tokens == unary.usage.completion_tokens
    single = _chat(client, messages=messages, max_tokens=12, temperature=1.0, seed=7)
    assert single.choices[0].message.content == texts[0]  # choice 0 keeps the request's seed


def test_biases_and_min_tokens_act_and_nothing_compiles_with_everything_mixed(client, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    cat = tokenizer.convert_tokens_to_ids("cat")
    eos = 102  # the demo checkpoint's [SEP]
    forced = _chat(client, max_tokens=6, temperature=0.0, logit_bias={str(cat): 100})
    assert forced.choices[0].message.content.split() == ["cat"] * 6
    banned = _chat(client, max_tokens=8, temperature=0.0, logit_bias={str(eos): 100}, min_tokens=5)
    assert banned.choices[0].finish_reason == "stop"
    assert banned.usage.completion_tokens == 6  # 5 tokens, then the favoured EOS

    # A bias makes greedy repeat "cat"; each penalty, growing with the repeats, cuts that.
    def cats(**penalty):
        tokens = [t.token for t in _chat(
            client, max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True,
            logit_bias={str(cat): 20}, **penalty).choices[0].logprobs.content]
        return tokens.count("cat"), tokens[0]
    plain, _ = cats()
    assert plain >= 10
    for penalty in (dict(frequency_penalty=2.0), dict(frequency_penalty=1.0, presence_penalty=2.0),
                    dict(repetition_penalty=10.0)):
        count, first = cats(**penalty)
        assert first == "cat" and count < plain, penalty  # the first is not penalised yet

    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    requests = [dict(response_format=schema, temperature=0.8, seed=1, n=2),
                dict(response_format={"type": "json_object"}, presence_penalty=1.0),
                dict(n=3, frequency_penalty=0.5, repetition_penalty=1.2, stream=False),
                dict(logit_bias={str(cat): 5}, min_tokens=3, top_p=0.9),
                dict(temperature=0.0), dict(n=2, response_format=schema, temperature=0.0)]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda kw: _chat(client, max_tokens=40, **kw), requests))
    for kw, result in zip(requests, results):
        assert len(result.choices) == kw.get("n", 1)
        if kw.get("response_format") is schema:
            for c in result.choices:
                if c.finish_reason == "stop":
                    jsonschema.validate(json.loads(c.message.content), SCHEMA)
    stats = _stats()
    assert stats["decoder"]["compilations_after_warmup"] == 0


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("parallel_tool_calls", False), ("frobnicate", 1)])
def test_unsupported_fields_are_refused_by_name(client, field, value):
    with pytest.raises(BadRequestError) as refused:
        _chat(client, max_tokens=2, extra_body={field: value})
    assert field in refused.value.body["message"]


def test_informational_fields_are_accepted_and_bad_formats_refused(client):
    ok = _chat(client, max_tokens=2, user="u1", metadata={"k": "v"}, store=False,
               extra_body={"service_tier": "auto", "tool_choice": "none"})
    assert ok.choices[0].message.content is not None
    for kwargs, field in [
            (dict(response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}),
             "response_format"),
            (dict(response_format={"type": "json_schema"}), "response_format"),
            (dict(n=9), "n"), (dict(logit_bias={"cat": 1}), "logit_bias"),
            (dict(logit_bias={"10": 101}), "logit_bias"),
            (dict(logit_bias={"999999": 1}), "logit_bias"),
            (dict(extra_body={"min_tokens": 9}), "min_tokens"),
            (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty")]:
        with pytest.raises(BadRequestError) as refused:
            _chat(client, max_tokens=4, **kwargs)
        assert field in refused.value.body["message"], (kwargs, refused.value.body)


def test_a_streamed_schema_answer_about_a_photo_validates(client, photos):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(photos[2])}},
        {"type": "text", "text": "which animal is this, how many, indoors?"}]}]
    schema = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}}
    text, finish = "", None
    for chunk in _chat(client, messages=messages, max_tokens=60, temperature=0.0, stream=True,
                       response_format=schema):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
