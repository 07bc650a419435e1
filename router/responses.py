"""Decoder chunks to OpenAI response objects (whole completions and stream chunks).

With `n` > 1 each choice is one decoder sequence; its chunks carry the choice's `index`,
and usage counts the shared prompt once and every choice's completion tokens."""

from __future__ import annotations

from router.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprobOut,
    TopLogprob,
    Usage,
    now,
)
from runtime.messages import GenerateChunk, TokenLogprob


class ResponseBuilder:
    def __init__(self, tokenizer, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name

    def _token(self, token_id: int) -> TopLogprob:
        text = self.tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=0.0, bytes=list(text.encode()))

    def _logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        content = []
        for e in entries:
            token = self._token(e.token_id)
            top = [self._token(i).model_copy(update={"logprob": lp}) for i, lp in e.top]
            content.append(TokenLogprobOut(token=token.token, bytes=token.bytes, logprob=e.logprob,
                                           top_logprobs=top))
        return ChoiceLogprobs(content=content)

    @staticmethod
    def usage(lasts: list[GenerateChunk]) -> Usage:
        """From each choice's last chunk."""
        completion = sum(last.completion_tokens for last in lasts)
        return Usage(prompt_tokens=lasts[0].prompt_tokens, completion_tokens=completion,
                     total_tokens=lasts[0].prompt_tokens + completion)

    def completion(self, request_id: str, choices: list[list[GenerateChunk]],
                   logprobs: bool) -> ChatCompletion:
        """choices: each choice's chunks, by index."""
        out = []
        for index, chunks in enumerate(choices):
            entries = [e for c in chunks for e in (c.logprobs or ())]
            out.append(Choice(index=index, message=AssistantMessage(content="".join(c.text for c in chunks)),
                              finish_reason=chunks[-1].finish_reason,
                              logprobs=self._logprobs(entries) if logprobs else None))
        return ChatCompletion(id=request_id, created=now(), model=self.model_name, choices=out,
                              usage=self.usage([chunks[-1] for chunks in choices]))

    def _chunk(self, request_id: str, created: int, choices: list[ChunkChoice],
               usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                   choices=choices, usage=usage)

    def first_chunk(self, request_id: str, created: int, n: int) -> ChatCompletionChunk:
        return self._chunk(request_id, created, [ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                                                 for i in range(n)])

    def delta_chunk(self, request_id: str, created: int, index: int, chunk: GenerateChunk,
                    logprobs: bool) -> ChatCompletionChunk:
        choice = ChunkChoice(index=index, delta=Delta(content=chunk.text), finish_reason=chunk.finish_reason,
                             logprobs=self._logprobs(list(chunk.logprobs or ())) if logprobs else None)
        return self._chunk(request_id, created, [choice])

    def usage_chunk(self, request_id: str, created: int, lasts: list[GenerateChunk]) -> ChatCompletionChunk:
        return self._chunk(request_id, created, [], usage=self.usage(lasts))
