"""Issue 16's host-side pieces without a cluster: which request fields are refused, the
request body's new fields, per-choice seeds, and how `merge_choices` starts, merges and
cancels the choices of `n` > 1."""

import asyncio
from contextlib import aclosing

import pytest

from router.choices import choice_seed, merge_choices
from router.schemas import ChatCompletionRequest
from runtime.messages import RequestError, ResponseFormat, SamplingParams

HI = [{"role": "user", "content": "hi"}]


def _body(**fields):
    return ChatCompletionRequest.model_validate({"messages": HI, **fields})


def test_unsupported_and_unknown_fields_are_named_and_defaults_pass():
    assert _body(tools=[], tool_choice="none", parallel_tool_calls=True, modalities=["text"],
                 user="u", metadata={"a": "b"}, store=True, service_tier="auto").refused_fields() == []
    assert _body(tools=[{"type": "function"}], audio={"voice": "x"}, frobnicate=1,
                 user="u").refused_fields() == ["tools", "audio", "frobnicate"]


def test_request_fields_validate_and_name_themselves():
    body = _body(n=3, logit_bias={"17": -3.5}, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "b": 1, "a": 2}}})
    assert body.n == 3 and body.response_format.schema_text() == '{"a":2,"b":1,"type":"object"}'
    for fields, name in [({"logit_bias": {"x": 1}}, "logit_bias"),
                         ({"response_format": {"type": "json_schema"}}, "response_format"),
                         ({"presence_penalty": 3}, "presence_penalty"), ({"n": 0}, "n")]:
        with pytest.raises(ValueError, match=name):
            _body(**fields)
    for kwargs, name in [(dict(min_tokens=5, max_tokens=4), "min_tokens"),
                         (dict(logit_bias=((1, 100.5),)), "logit_bias"),
                         (dict(repetition_penalty=0.0), "repetition_penalty"),
                         (dict(frequency_penalty=-2.5), "frequency_penalty")]:
        with pytest.raises(RequestError, match=f"^{name}:"):
            SamplingParams(**kwargs)
    with pytest.raises(RequestError, match="^response_format"):
        ResponseFormat("json_schema")


def test_choice_seeds_are_derived_and_distinct():
    assert choice_seed(None, 2) is None and choice_seed(7, 0) == 7
    seeds = [choice_seed(7, i) for i in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [choice_seed(7, i) for i in range(8)]  # a pure function


def test_merge_starts_later_choices_after_the_first_item_and_cancels_on_failure():
    started, closed = [], []

    async def generate(index, fail_at=None):
        started.append(index)
        try:
            for k in range(3):
                await asyncio.sleep(0.001)
                if index == fail_at and k == 1:
                    raise RuntimeError("boom")
                yield f"{index}.{k}"
            await asyncio.sleep(0 if index else 10)  # choice 0 lingers: cancelled at the end?
        finally:
            closed.append(index)

    async def run(fail_at=None, take=None):
        got = []
        async with aclosing(merge_choices(3, lambda i: generate(i, fail_at))) as merged:
            async for index, item in merged:
                if not got:
                    assert started == [0]  # alone until its first item
                got.append((index, item))
                if take and len(got) == take:
                    break
        return got

    async def main():
        got = await asyncio.wait_for(run(take=9), 5)
        assert sorted(got) == [(i, f"{i}.{k}") for i in range(3) for k in range(3)]
        assert [item for i, item in got if i == 1] == ["1.0", "1.1", "1.2"]  # in order per choice
        assert sorted(closed) == [0, 1, 2]  # leaving early closed choice 0 too
        started.clear(), closed.clear()
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(run(fail_at=2), 5)
        assert sorted(closed) == [0, 1, 2]
    asyncio.run(main())
