"""The issue-13 section of `docs/benchmarks.md`, from `compare_peers.py`'s results: one table
per workload (image pool, new images' inter-token latency, a seen image's TTFT), each server's
figures and splitserve's ratio to each peer, then the issue's targets, met or missed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.peers_doc import (PEERS, TITLES, command_lines, fmt, load_lines, metric, setup_lines,
                                  target)

SECTION = "## Issue 13: prefix caching and chunked prefill, splitserve vs transformers serve and vLLM"
RUNS = ("image-pool", "new-images-itl", "seen-image-ttft")


@dataclass(frozen=True)
class Column:
    label: str
    value: Callable[[dict], float | None]  # from one run's report
    compare: bool = True  # a "splitserve / peer" ratio row shows it


def _stat(key: str, stat: str | None = None) -> Callable[[dict], float | None]:
    return lambda run: metric(run, key, stat)


def _quotient(top: Callable, bottom: Callable) -> Callable[[dict], float | None]:
    def value(run: dict) -> float | None:
        a, b = top(run), bottom(run)
        return a / b if a is not None and b else None
    return value


def _prefix_hits(run: dict) -> str:
    cache = run.get("prefix_cache")
    if not cache or cache["hit_rate"] is None:
        return "n/a"
    return f"{cache['hit_rate']:.0%} ({cache['hit_tokens']:.0f} / {cache['queried_tokens']:.0f})"


ITL_SPREAD = _quotient(_stat("itl_ms", "p99"), _stat("itl_ms", "median"))
SEEN_OVER_FIRST = _quotient(_stat("ttft_ms_repeated_images", "median"), _stat("ttft_ms_new_images", "median"))
COLUMNS = {
    "image-pool": (Column("output tok/s", _stat("output_throughput")),
                   Column("TTFT p50 (ms)", _stat("ttft_ms", "median")),
                   Column("TTFT p99 (ms)", _stat("ttft_ms", "p99")),
                   Column("ITL median (ms)", _stat("itl_ms", "median"))),
    "new-images-itl": (Column("ITL median (ms)", _stat("itl_ms", "median")),
                       Column("ITL p99 (ms)", _stat("itl_ms", "p99")),
                       Column("ITL p99 / median", ITL_SPREAD, compare=False),
                       Column("output tok/s", _stat("output_throughput")),
                       Column("TTFT p50 (ms)", _stat("ttft_ms", "median"))),
    "seen-image-ttft": (Column("TTFT first sight, median (ms)", _stat("ttft_ms_new_images", "median")),
                        Column("TTFT seen image, median (ms)", _stat("ttft_ms_repeated_images", "median")),
                        Column("seen / first sight", SEEN_OVER_FIRST, compare=False)),
}


def _describe(name: str, run: dict) -> str:
    w, concurrency = run["workload"], run["config"]["max_concurrency"]
    images = (f"one image per request (JPEG, longer side <= {w['image_max_side']} px, "
              f"~{w['mean_image_bytes'] / 1024:.0f} KiB)")
    words = f"a {w['prompt_words']}-word question, a different one each request"
    if name == "image-pool":
        what = (f"{w['num_requests']} requests; {images}, drawn from a pool of {w['image_pool_size']} "
                "(in shuffled rounds: each image once per round, the same bytes every time); "
                f"{words}")
    elif name == "new-images-itl":
        what = f"{w['num_requests']} requests; {images}, every image new; {words}"
    else:
        what = (f"{w['num_requests'] // w['questions_per_image']} images, each sent by "
                f"{w['questions_per_image']} consecutive requests (first sight, then seen) with "
                f"{words}; TTFT medians over first sights and over the rest")
    return (f"Concurrency {concurrency}, {what}; exactly {w['output_tokens']} output tokens (greedy), "
            "streamed; one warm-up request with an image of its own before the run.")


def _heading(name: str, run: dict | None) -> str:
    if name == "image-pool":
        pool = f"{run['workload']['image_pool_size']} images" if run else "a pool of images"
        return f"### Image pool: {pool}, varied questions"
    if name == "new-images-itl":
        return "### Every image new: inter-token latency"
    return "### A seen image with a new question: TTFT"


def _table(results: dict, name: str) -> list[str]:
    servers = results["servers"]
    names = [n for n in TITLES if name in servers.get(n, {}).get("runs", {})]
    if not names:
        return [_heading(name, None), "", "Not measured.", ""]
    runs = {n: servers[n]["runs"][name] for n in names}
    columns = COLUMNS[name]
    out = [_heading(name, runs[names[0]]), "", _describe(name, runs[names[0]]), "",
           "| server | " + " | ".join(c.label for c in columns) + " | prefix-cache hits (tokens) | errors |",
           "|---|" + "---|" * (len(columns) + 2)]
    for n in names:
        cells = [fmt(c.value(runs[n])) for c in columns]
        out.append(f"| {TITLES[n]} | " + " | ".join(cells) + f" | {_prefix_hits(runs[n])} | "
                   f"{runs[n]['errors']} |")
    for peer in [p for p in PEERS if p in runs and "splitserve" in runs]:
        cells = [_ratio(c.value(runs["splitserve"]), c.value(runs[peer])) if c.compare else ""
                 for c in columns]
        out.append(f"| splitserve / {TITLES[peer]} | " + " | ".join(cells) + " | | |")
    return out + [""]


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "n/a" if ours is None or not theirs else f"{ours / theirs:.2f}x"


def _run(results: dict, server: str, name: str) -> dict | None:
    return results["servers"].get(server, {}).get("runs", {}).get(name)


def _over(results: dict, name: str, value: Callable, peer: str) -> float | None:
    ours, theirs = _run(results, "splitserve", name), _run(results, peer, name)
    if not ours or not theirs:
        return None
    a, b = value(ours), value(theirs)
    return a / b if a is not None and b else None


def render_section(results: dict) -> str:
    runs = [r for r in RUNS if any(r in s["runs"] for s in results["servers"].values())]
    throughput, ttft = _stat("output_throughput"), _stat("ttft_ms", "median")
    spread = _run(results, "splitserve", "new-images-itl")
    seen = _run(results, "splitserve", "seen-image-ttft")
    out = [SECTION, "",
           "The benchmarks of issue 13 (the decoder's paged KV cache, prefix caching keyed by image "
           "hash, chunked prefill mixed with decode). Ratios are splitserve / the peer: above 1 is "
           "better for tok/s, below 1 for latencies. Prefix-cache hits: prompt tokens found in the "
           "server's prefix cache over those looked up during the run, from its Prometheus counters "
           "(`n/a`: the server exports none). The issue's fourth figure, decode tokens/s at batch 16, "
           "is `benchmarks/decoder_bench.py`'s (Decoder, above).", "",
           *setup_lines(results),
           *_table(results, "image-pool"), *_table(results, "new-images-itl"),
           *_table(results, "seen-image-ttft"),
           "### Targets", "",
           target("image pool: splitserve output tok/s >= 4x transformers serve",
                   _over(results, "image-pool", throughput, "transformers"), lambda r: r >= 4.0, "x"),
           target("image pool: splitserve output tok/s >= vLLM's",
                   _over(results, "image-pool", throughput, "vllm"), lambda r: r >= 1.0, "x"),
           target("image pool: splitserve TTFT p50 no worse than vLLM's",
                   _over(results, "image-pool", ttft, "vllm"), lambda r: r <= 1.0, "x"),
           target("every image new: splitserve ITL p99 <= 4x its ITL median",
                   ITL_SPREAD(spread) if spread else None, lambda r: r <= 4.0, "x"),
           target("splitserve TTFT of a seen image (new question) <= 0.3x first sight",
                   SEEN_OVER_FIRST(seen) if seen else None, lambda r: r <= 0.3, "x"),
           "", "### Start-up and other work on the machine", "", *load_lines(results, runs),
           "### Command lines", "", *command_lines(results, runs)]
    return "\n".join(out)
