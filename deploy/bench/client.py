"""One streamed chat completion against any OpenAI-compatible server, timed per chunk.

`stream_chat` sends `stream: true` with `stream_options.include_usage` and records when each
chunk carrying output text arrives. Server differences it absorbs:
- a first chunk with only `role` (splitserve, transformers serve): not a token, not the TTFT;
- usage in its own final chunk with no choices (splitserve, vLLM) or on the chunk that
  carries `finish_reason` (transformers serve, which ignores `stream_options`);
- errors as an HTTP status before the stream, or in-band as `data: {"error": ...}`.
Output tokens come from `usage.completion_tokens` when the server reports it, else they
are counted as text-bearing chunks (one token per chunk, the usual streaming granularity).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    index: int
    num_images: int = 0
    all_images_repeated: bool = False
    sent: bool = False
    error: str | None = None
    start_s: float | None = None  # when it was sent, from the start of the run
    ttft_s: float | None = None
    latency_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # text chunks, from the send
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.sent and self.error is None

    @property
    def itl_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, as `vllm bench serve` defines it."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def record(self) -> dict:
        itl = self.itl_s
        return {"index": self.index, "ok": self.ok, "error": self.error, "sent": self.sent,
                "num_images": self.num_images, "all_images_repeated": self.all_images_repeated,
                "start_s": _round(self.start_s), "ttft_s": _round(self.ttft_s),
                "latency_s": _round(self.latency_s), "tpot_s": _round(self.tpot_s),
                "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
                "usage_reported": self.usage_reported, "finish_reason": self.finish_reason,
                "itl_s": [round(x, 5) for x in itl]}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


class StreamError(Exception):
    """The server answered, but not with a usable stream."""


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, result: RequestResult,
                      run_start: float, timeout_s: float) -> None:
    """Sends `body` (streaming) to `url` and fills `result`. Never raises, except
    `asyncio.CancelledError`, after marking the result as cancelled."""
    start = time.perf_counter()
    result.sent, result.start_s = True, start - run_start
    try:
        await asyncio.wait_for(_consume(client, url, body, result, start), timeout_s)
        if not result.chunk_times_s:
            raise StreamError("the stream ended without any output text")
        result.ttft_s = result.chunk_times_s[0]
        if not result.usage_reported:
            result.output_tokens = len(result.chunk_times_s)
    except asyncio.CancelledError:
        result.error = "cancelled: the run's global timeout passed"
        raise
    except asyncio.TimeoutError:
        result.error = f"timeout: no complete answer within {timeout_s:g} s"
    except StreamError as exc:
        result.error = str(exc)
    except (httpx.HTTPError, OSError, ValueError, TypeError, AttributeError) as exc:
        # Transport failures and malformed events: this request failed, the run goes on.
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.latency_s = time.perf_counter() - start


async def _consume(client: httpx.AsyncClient, url: str, body: dict, result: RequestResult,
                   start: float) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise StreamError(f"HTTP {response.status_code}: {text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            arrived = time.perf_counter() - start
            event = json.loads(payload)
            if "error" in event:
                error = event["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                raise StreamError(f"error in stream: {str(message)[:300]}")
            usage = event.get("usage")
            if usage:
                result.usage_reported = True
                result.output_tokens = int(usage.get("completion_tokens") or 0)
                result.prompt_tokens = usage.get("prompt_tokens")
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    result.chunk_times_s.append(arrived)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
