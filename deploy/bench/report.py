"""What a run measured, as `vllm bench serve` reports it: throughput, TTFT / TPOT / ITL / E2E
latency (mean, median, p99), errors; plus TTFT split by whether a request's images were all
repeats (cache hits on a server that caches embeddings). JSON, a text table, a PNG."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from deploy.bench.client import RequestResult

LATENCIES = (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token (excl. 1st)"),
             ("itl_ms", "Inter-token latency"), ("e2el_ms", "End-to-end latency"))


def stats_ms(values_s: list[float]) -> dict | None:
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p99": float(np.percentile(ms, 99)), "std": float(ms.std()), "count": int(ms.size)}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_known = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    prompt_tokens = sum(prompt_known) if len(prompt_known) == len(ok) else None
    errors = Counter(r.error.split(":")[0] for r in results if r.error)
    with_images = [r for r in ok if r.num_images]
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(errors),
        "error_examples": sorted({r.error for r in results if r.error})[:5],
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (None if prompt_tokens is None
                                   else (prompt_tokens + output_tokens) / duration_s),
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl_s]),
        "e2el_ms": stats_ms([r.latency_s for r in ok]),
        "ttft_ms_new_images": stats_ms([r.ttft_s for r in with_images if not r.all_images_repeated]),
        "ttft_ms_repeated_images": stats_ms([r.ttft_s for r in with_images if r.all_images_repeated]),
        "requests": [r.record() for r in results],
    }


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def format_table(report: dict) -> str:
    """The summary block `vllm bench serve` prints, with the same metric names."""
    def row(name, value, fmt="{:.2f}"):
        return f"{name:<40}{'n/a' if value is None else fmt.format(value):>12}"

    config = report["config"]
    lines = [f"{' Serving Benchmark Result ' + (report['label'] or ''):=^52}",
             row("Model:", report["model"], "{}"),
             row("Max concurrency:", config["max_concurrency"], "{}"),
             row("Request rate (req/s):", config["request_rate"], "{}"),
             row("Successful requests:", report["completed"], "{}"),
             row("Failed requests:", report["errors"], "{}"),
             row("Benchmark duration (s):", report["duration_s"]),
             row("Total input tokens:", report["total_prompt_tokens"], "{}"),
             row("Total generated tokens:", report["total_output_tokens"], "{}"),
             row("Request throughput (req/s):", report["request_throughput"]),
             row("Output token throughput (tok/s):", report["output_throughput"]),
             row("Total token throughput (tok/s):", report["total_token_throughput"])]
    for key, title in LATENCIES:
        lines.append(f"{' ' + title + ' ':-^52}")
        stats = report[key] or {}
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p99"):
            lines.append(row(f"{stat.capitalize()} {short} (ms):", stats.get(stat)))
    for key, name in (("ttft_ms_new_images", "new images"), ("ttft_ms_repeated_images", "repeated images")):
        stats = report[key]
        if stats:
            lines.append(row(f"Median TTFT, {name} (ms, n={stats['count']}):", stats["median"]))
    for error in report["error_examples"]:
        lines.append(f"error: {error}")
    lines.append("=" * 52)
    return "\n".join(lines)


def plot_png(report: dict, path: str | Path) -> Path:
    """Four panels: TTFT CDF (new vs repeated images), ITL histogram, a request timeline
    (send -> first token -> done), cumulative output tokens over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["requests"] if r["ok"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    title = report["label"] or report["model"]
    fig.suptitle(f"{title}: concurrency {report['config']['max_concurrency']}, "
                 f"rate {report['config']['request_rate']} req/s, "
                 f"{report['output_throughput']:.1f} output tok/s, {report['errors']} errors")

    ax = axes[0][0]
    for name, repeated in (("new images", False), ("repeated images", True), ("no images", None)):
        if repeated is None:
            ttfts = [r["ttft_s"] for r in ok if not r["num_images"]]
        else:
            ttfts = [r["ttft_s"] for r in ok if r["num_images"] and r["all_images_repeated"] == repeated]
        if ttfts:
            ttfts = np.sort(ttfts) * 1000
            ax.step(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), where="post",
                    label=f"{name} (n={len(ttfts)})")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="Time to first token (CDF)")
    ax.legend(loc="lower right")

    ax = axes[0][1]
    itl = [x * 1000 for r in ok for x in r["itl_s"]]
    if itl:
        ax.hist(itl, bins=40)
    ax.set(xlabel="ITL (ms)", ylabel="chunks", title="Inter-token latency")

    ax = axes[1][0]
    for row, r in enumerate(sorted(report["requests"], key=lambda r: r["start_s"] or 0.0)):
        if r["start_s"] is None:
            continue
        end = r["start_s"] + (r["latency_s"] or 0.0)
        ax.plot([r["start_s"], end], [row, row], color="tab:blue" if r["ok"] else "tab:red", lw=1.5)
        if r["ttft_s"] is not None:
            ax.plot(r["start_s"] + r["ttft_s"], row, "|", color="black", ms=5)
    ax.set(xlabel="time since start (s)", ylabel="request", title="Timeline (| = first token, red = error)")

    ax = axes[1][1]
    arrivals = sorted(r["start_s"] + r["ttft_s"] + sum(r["itl_s"][:i]) for r in ok
                      for i in range(len(r["itl_s"]) + 1))
    if arrivals:
        ax.plot(arrivals, np.arange(1, len(arrivals) + 1))
    ax.set(xlabel="time since start (s)", ylabel="text chunks received", title="Output over time")

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
