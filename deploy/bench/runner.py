"""Drives a workload against an endpoint: fixed concurrency, or Poisson arrivals at a rate.

One asyncio task per request; a semaphore caps requests in flight (`max_concurrency`),
and with a finite `request_rate` the sender waits exponential gaps (seeded) between
sends, as `vllm bench serve --request-rate R --max-concurrency N` does. The whole run is
bounded by `timeout_s`: at that deadline requests still in flight are cancelled (the
client disconnects) and counted as errors, so the tool always stops by itself.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from deploy.bench.client import RequestResult, stream_chat
from deploy.bench.report import summarize
from deploy.bench.workload import BenchRequest, WorkloadSpec, build_workload


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # the OpenAI base URL, ending in /v1
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    model: str | None = None  # None: the first id that GET {base_url}/models lists
    max_concurrency: int | None = 1  # None: unbounded (only with a finite request_rate)
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf: all at once
    ignore_eos: bool = False  # send `ignore_eos: true` (splitserve, vLLM), for fixed lengths
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    warmup_requests: int = 0  # sent one by one before timing, with images of their own
    timeout_s: float = 600.0  # the whole run
    request_timeout_s: float = 300.0
    label: str = ""

    def __post_init__(self):
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1; got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0; got {self.request_rate}")
        if self.max_concurrency is None and math.isinf(self.request_rate):
            raise ValueError("set max_concurrency, a finite request_rate, or both")
        if self.timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeout_s and request_timeout_s must be > 0")
        if not isinstance(self.extra_body, dict):
            raise ValueError(f"extra_body must be a JSON object; got {self.extra_body!r}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0; got {self.warmup_requests}")

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def body(self, model: str, request: BenchRequest) -> dict:
        body = {"model": model, "messages": request.messages(), "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": self.workload.output_tokens, "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra_body}

    def describe(self) -> dict:
        described = asdict(self)
        described["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return described


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    url = base_url.rstrip("/") + "/models"
    try:
        response = await client.get(url)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"could not list models at {url} ({exc}); pass the model name") from exc
    if not models:
        raise ValueError(f"{url} lists no model; pass the model name (transformers serve takes "
                         "the checkpoint path)")
    return models[0]["id"]


async def arun_bench(config: BenchConfig, after_warmup: Callable[[], None] | None = None
                     ) -> tuple[dict, list[RequestResult]]:
    """Runs the benchmark; returns the report (see `report.summarize`) and per-request results.
    `after_warmup` is called (blocking, nothing in flight) after the warm-up requests, before
    timing starts: e.g. to read the server's counters."""
    workload = build_workload(config.workload)
    warmup = (build_workload(WorkloadSpec(**{**asdict(config.workload),
                                             "num_requests": config.warmup_requests}), salt=1)
              if config.warmup_requests else None)
    connections = config.max_concurrency or config.workload.num_requests
    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=connections + 2)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await resolve_model(client, config.base_url)
        warmup_errors = []
        for request in warmup.requests if warmup else ():
            result = RequestResult(request.index)
            await stream_chat(client, config.chat_url, config.body(model, request), result,
                              time.perf_counter(), config.request_timeout_s)
            if result.error:
                warmup_errors.append(result.error)
        if after_warmup:
            after_warmup()
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = [RequestResult(r.index, len(r.image_urls), r.all_images_repeated)
                   for r in workload.requests]
        run_start = time.perf_counter()
        try:
            await asyncio.wait_for(_drive(client, config, model, workload.requests, results,
                                          run_start), config.timeout_s)
        except asyncio.TimeoutError:
            pass
        duration_s = time.perf_counter() - run_start
    for result in results:
        if not result.sent:
            result.error = "not sent: the run's global timeout passed first"
    report = summarize(results, duration_s)
    report = {"label": config.label, "started_at": started_at, "model": model,
              "config": config.describe(), "workload": workload.summary(),
              "warmup_errors": warmup_errors, **report}
    return report, results


async def _drive(client: httpx.AsyncClient, config: BenchConfig, model: str,
                 requests: list[BenchRequest], results: list[RequestResult], run_start: float):
    semaphore = asyncio.Semaphore(config.max_concurrency or len(requests))
    gaps = np.random.default_rng([config.workload.seed, 2]).exponential(
        1.0 / config.request_rate, size=len(requests))

    async def send(request: BenchRequest, result: RequestResult):
        async with semaphore:
            await stream_chat(client, config.chat_url, config.body(model, request), result,
                              run_start, config.request_timeout_s)

    tasks = []
    try:
        for request, result, gap in zip(requests, results, gaps):
            tasks.append(asyncio.create_task(send(request, result)))
            if not math.isinf(config.request_rate):
                await asyncio.sleep(gap)
        await asyncio.gather(*tasks)
    finally:  # the global timeout: disconnect whatever is still in flight
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_bench(config: BenchConfig, after_warmup: Callable[[], None] | None = None
              ) -> tuple[dict, list[RequestResult]]:
    return asyncio.run(arun_bench(config, after_warmup))
