"""OpenAI-compatible request and response bodies for `/v1/chat/completions`.

Requests are validated by pydantic; errors name the field (`messages.0.content`).
Nothing is silently ignored: fields splitserve does not implement, and fields it does
not know, are kept (`extra="allow"`) so that `refused_fields` can name them and the
router answers 400; only informational fields (`user`, `metadata`, ...) are accepted
and not used.
Every string the server reads must be valid Unicode: JSON can escape a lone UTF-16
surrogate (`"\ud800"`), which no tokenizer or UTF-8 encoder accepts, so it is
refused as a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# Fields of OpenAI's (or vLLM's) chat API that change what the model produces and that
# splitserve does not implement, with the values that leave the output unchanged.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "best_of": (None, 1),
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "prompt_logprobs": (None,), "echo": (None, False), "logits_processors": (None,),
}
# Accepted and not used: they do not change the output.
INFORMATIONAL_FIELDS = frozenset({"user", "metadata", "store", "service_tier",
                                  "safety_identifier", "prompt_cache_key"})


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        raise ValueError(f"contains a lone surrogate U+{code:04X} at character {error.start}, "
                         "which is not valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]  # a str that encodes to UTF-8


class ImageURL(BaseModel):
    url: Text
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # a JSON Schema
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormatBody(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema_text(self) -> str:
        """The schema as canonical JSON (the grammar cache's key)."""
        return json.dumps(self.json_schema.schema_, sort_keys=True, separators=(",", ":"))


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # extension; -1 or 0 = no limit
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=5)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)  # the router's max_choices bounds it
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormatBody | None = None
    ignore_eos: bool = False  # extension, as in vLLM: fixed output lengths for benchmarks
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # extension (vLLM)
    min_tokens: int | None = Field(default=None, ge=0)  # extension (vLLM)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value):
        if value is not None and any(not k.strip().isdigit() for k in value):
            raise ValueError("keys must be token ids (non-negative integers as strings)")
        return value

    @field_validator("response_format")
    @classmethod
    def _schema_given(cls, value):
        if value is not None and value.type == "json_schema" and value.json_schema is None:
            raise ValueError("json_schema: required when type is json_schema")
        return value

    def refused_fields(self) -> list[str]:
        """Fields set that splitserve would otherwise ignore: unsupported ones with a value
        that changes the output, and unknown ones."""
        refused = []
        for name, value in (self.model_extra or {}).items():
            if name in INFORMATIONAL_FIELDS:
                continue
            if name not in UNSUPPORTED_FIELDS or value not in UNSUPPORTED_FIELDS[name]:
                refused.append(name)
        return refused

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and (len(value) > 8 or any(not s for s in value)):
            raise ValueError("at most 8 non-empty stop strings")
        return value


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
