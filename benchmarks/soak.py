"""Bounded soak: a fixed number of mixed chat requests at a fixed concurrency against a
splitserve server on this machine, while the resident memory of its replicas is sampled.

    make serve                                     # or any splitserve app on 127.0.0.1
    .venv/bin/python -m benchmarks.soak --url http://127.0.0.1:8000 --app splitserve \\
        --requests 600 --concurrency 16 --out soak.json

or, self-contained (a local Ray, the app deployed under `--app`, torn down afterwards):

    .venv/bin/python -m benchmarks.soak --deploy '{"decoder": {"max_num_seqs": 8}}' \\
        --app soak --port 18000 --requests 2400 --out soak.json

The mix is seeded: text-only and image chats, whole and streamed, images drawn from a
small pool (so most repeat: cache hits) plus fresh ones, clients that leave mid-stream,
and hostile requests that must be refused with a 4xx. An *unexpected* outcome is anything
else: a 5xx, a wrong status, a transport error, a stream without `[DONE]` or with an
error event, a timeout. Every `ray::ServeReplica:<app>:<deployment>` process's RSS is
read from /proc every `--sample-s` seconds; the summary gives each deployment's RSS when
10%, 50%, 75% and 100% of the requests had finished, and the growth over the second half.

Threads: the asyncio loop runs the clients; one sampler thread reads /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

KINDS = {  # kind -> weight in the mix
    "text": 20, "image": 25, "image_stream": 15, "two_images": 10, "fresh_image": 8,
    "cancel_stream": 10, "hostile": 12,
}
CHECKPOINTS = (0.1, 0.5, 0.75, 1.0)


@dataclass
class Plan:
    index: int
    kind: str
    body: dict
    expect_status: int = 200


@dataclass
class Outcome:
    index: int
    kind: str
    ok: bool
    status: int | None
    seconds: float
    detail: str = ""


def _jpeg_url(image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_pool(size: int, seed: int) -> list[str]:
    """`size` distinct crops of scikit-image's photographs, as data URLs."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = random.Random(seed)
    urls = []
    for i in range(size):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.randint(min(w, h) // 3, min(w, h))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        urls.append(_jpeg_url(photo.crop((x, y, x + side, y + side)).resize((160, 160))))
    return urls


def _hostile(rng: random.Random, pool: list[str]) -> tuple[dict, int]:
    """A request the server must refuse, and the status it must refuse it with."""
    good = {"role": "user", "content": "hi"}
    truncated = "data:image/jpeg;base64," + pool[0].split(",", 1)[1][:400]
    choice = rng.randrange(5)
    if choice == 0:
        return {"messages": [_user(["data:image/png;base64,@@not-base64@@"], "x")]}, 400
    if choice == 1:
        return {"messages": [_user([truncated], "x")]}, 400
    if choice == 2:
        return {"messages": [good], "model": "no-such-model"}, 404
    if choice == 3:
        return {"messages": [good], "max_tokens": 10**9}, 400
    return {"messages": [good], "temperature": -1}, 400


def _user(images: list[str], text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def build_plan(num_requests: int, seed: int, pool: list[str]) -> list[Plan]:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    plans = []
    for index in range(num_requests):
        kind = rng.choices(kinds, weights)[0]
        max_tokens = rng.randint(4, 24)
        text = f"request {index}: describe this in a few words"
        body: dict = {"max_tokens": max_tokens, "temperature": rng.choice([0, 0.7])}
        status = 200
        if kind == "text":
            body["messages"] = [{"role": "user", "content": text}]
        elif kind in ("image", "image_stream"):
            body["messages"] = [_user([rng.choice(pool)], text)]
            body["stream"] = kind == "image_stream"
        elif kind == "two_images":
            body["messages"] = [_user(rng.sample(pool, 2), text)]
        elif kind == "fresh_image":  # bytes no server cache has seen
            from PIL import Image

            colour = tuple(rng.randrange(256) for _ in range(3))
            body["messages"] = [_user([_jpeg_url(Image.new("RGB", (96, 96), colour), 70 + index % 20)],
                                      text)]
        elif kind == "cancel_stream":
            body.update(messages=[_user([rng.choice(pool)], text)], stream=True, max_tokens=64,
                        ignore_eos=True)
        else:
            body, status = _hostile(rng, pool)
        plans.append(Plan(index, kind, body, status))
    return plans


async def run_one(client: httpx.AsyncClient, plan: Plan) -> Outcome:
    started = time.monotonic()

    def done(ok: bool, status: int | None, detail: str = "") -> Outcome:
        return Outcome(plan.index, plan.kind, ok, status, time.monotonic() - started, detail[:300])

    try:
        if not plan.body.get("stream"):
            response = await client.post("/v1/chat/completions", json=plan.body)
            if response.status_code != plan.expect_status:
                return done(False, response.status_code, response.text)
            reply = response.json()
            ok = ("choices" in reply) if plan.expect_status == 200 else ("error" in reply)
            return done(ok, response.status_code, "" if ok else response.text)
        events = 0
        async with client.stream("POST", "/v1/chat/completions", json=plan.body) as response:
            if response.status_code != 200:
                return done(False, response.status_code, (await response.aread()).decode())
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if '"error"' in line:
                    return done(False, 200, line)
                if line == "data: [DONE]":
                    return done(True, 200)
                if plan.kind == "cancel_stream" and events >= 3:
                    return done(True, 200, "left mid-stream")  # closing the response cancels
        return done(False, 200, f"stream ended without [DONE] after {events} events")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return done(False, None, f"{type(error).__name__}: {error}")


class RssSampler:
    """Samples the RSS of each Serve replica process of one app, from /proc, on a thread."""

    def __init__(self, app: str, interval_s: float) -> None:
        self.prefix = f"ray::ServeReplica:{app}:"
        self.interval_s = interval_s
        self.samples: list[dict] = []  # {"t": s, "done": requests finished, "rss": {pid: (deployment, bytes)}}
        self.finished = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._started = time.monotonic()

    def replicas(self) -> dict[int, tuple[str, int]]:
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                if not title.startswith(self.prefix):
                    continue
                deployment = title[len(self.prefix):].split(".", 1)[0].split(" ", 1)[0]
                status = (proc / "status").read_text()
            except OSError:  # the process ended while we looked
                continue
            rss_kib = next(int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:"))
            found[int(proc.name)] = (deployment, rss_kib * 1024)
        return found

    def sample(self) -> None:
        self.samples.append({"t": round(time.monotonic() - self._started, 2), "done": self.finished,
                             "rss": self.replicas()})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _by_deployment(sample: dict) -> dict[str, int]:
    totals: dict[str, int] = {}
    for deployment, rss in sample["rss"].values():
        totals[deployment] = totals.get(deployment, 0) + rss
    return totals


def rss_summary(samples: list[dict], num_requests: int) -> dict:
    """Each deployment's RSS (MiB) at the first sample taken once each checkpoint's share of
    the requests had finished, and its growth from the 50% mark to the end."""
    table = {}
    for share in CHECKPOINTS:
        sample = next(s for s in samples if s["done"] >= share * num_requests or s is samples[-1])
        table[f"{int(share * 100)}%"] = {d: round(b / 2**20, 1) for d, b in _by_deployment(sample).items()}
    half, end = table["50%"], table["100%"]
    growth = {d: round(end[d] - half.get(d, end[d]), 1) for d in end}
    pids = {pid for s in samples for pid in s["rss"]}
    return {"mib_at": table, "growth_second_half_mib": growth, "replica_processes_seen": len(pids),
            "samples": len(samples)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def soak(url: str, app: str, num_requests: int = 600, concurrency: int = 16, seed: int = 0,
               pool_size: int = 24, sample_s: float = 2.0, timeout_s: float = 1800.0,
               request_timeout_s: float = 120.0) -> dict:
    pool = image_pool(pool_size, seed)
    plans = build_plan(num_requests, seed, pool)
    queue: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with RssSampler(app, sample_s) as sampler:
        async with httpx.AsyncClient(base_url=url, timeout=request_timeout_s,
                                     limits=httpx.Limits(max_connections=concurrency)) as client:
            async def worker() -> None:
                while not queue.empty():
                    outcomes.append(await run_one(client, queue.get_nowait()))
                    sampler.finished = len(outcomes)

            workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
            try:
                await asyncio.wait_for(asyncio.gather(*workers), timeout_s)
            except asyncio.TimeoutError:
                for task in workers:
                    task.cancel()
    elapsed = time.monotonic() - started
    unexpected = [o for o in outcomes if not o.ok]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    latencies = [o.seconds for o in outcomes if o.ok and o.kind != "hostile"]
    return {
        "requests": num_requests, "finished": len(outcomes), "concurrency": concurrency,
        "seed": seed, "seconds": round(elapsed, 1),
        "requests_per_s": round(len(outcomes) / elapsed, 2) if elapsed else None,
        "by_kind": counts, "unexpected": len(unexpected) + (num_requests - len(outcomes)),
        "unexpected_examples": [o.__dict__ for o in unexpected[:10]],
        "latency_s": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                      "max": _percentile(latencies, 1.0)},
        "rss": rss_summary(sampler.samples, num_requests),
        "rss_series_mib": [{"t": s["t"], "done": s["done"],
                            **{d: round(b / 2**20, 1) for d, b in _by_deployment(s).items()}}
                           for s in sampler.samples],
    }


def deploy_and_soak(app_args: dict, app: str, port: int, **soak_args) -> dict:
    """Starts a local Ray, deploys `build_app(app_args)` as `app` on 127.0.0.1:`port`, runs
    the soak against it, and shuts everything down."""
    import ray
    from ray import serve

    from deploy.app import build_app
    from deploy.startup import wait_healthy

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name=app, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", timeout_s=900)  # serve.run returned: a busy machine waits
        return asyncio.run(soak(url, app, **soak_args))
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (this machine only)")
    parser.add_argument("--app", default="splitserve", help="the Serve app name (for its replicas' RSS)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="bound on the whole run")
    parser.add_argument("--out", type=Path, help="write the JSON summary here")
    parser.add_argument("--deploy", metavar="APP_ARGS_JSON",
                        help="start a local Ray and deploy the app (deploy.app.AppArgs) first")
    parser.add_argument("--port", type=int, default=8000, help="with --deploy: the HTTP port")
    args = parser.parse_args(argv)
    soak_args = {"num_requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                 "sample_s": args.sample_s, "timeout_s": args.timeout_s}
    if args.deploy is not None:
        result = deploy_and_soak(json.loads(args.deploy), args.app, args.port, **soak_args)
    else:
        if httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("the soak sends traffic to this machine only (127.0.0.1, localhost, ::1)")
        result = asyncio.run(soak(args.url, args.app, **soak_args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series_mib"}, indent=2))
    return 0 if result["unexpected"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
