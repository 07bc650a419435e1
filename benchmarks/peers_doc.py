"""The peers section of `docs/benchmarks.md` and its plot, from `compare_peers.py`'s results;
and what every section written from those results shares: the set-up paragraph, the start-up
and other-work table, the command lines, and how a section replaces its earlier version."""

from __future__ import annotations

import re
from pathlib import Path

SECTION = "## Peers: splitserve vs transformers serve"
NEXT_SECTION = "## Issue 17: LLaVA-NeXT, splitserve vs transformers serve and vLLM"
ANALYSIS = "### Analysis"
TITLES = {"transformers": "transformers serve", "transformers-cb": "transformers serve --continuous-batching",
          "vllm": "vLLM (CPU backend)", "splitserve": "splitserve"}
PEERS = ("transformers", "transformers-cb", "vllm")
RUN_ORDER = ("c1", "c4", "c16", "c16-long", "cache")
ROWS = (  # (label, key, stat, higher is better)
    ("output tok/s", "output_throughput", None, True),
    ("requests/s", "request_throughput", None, True),
    ("TTFT median (ms)", "ttft_ms", "median", False),
    ("TTFT p99 (ms)", "ttft_ms", "p99", False),
    ("TPOT median (ms)", "tpot_ms", "median", False),
    ("TPOT p99 (ms)", "tpot_ms", "p99", False),
    ("ITL median (ms)", "itl_ms", "median", False),
    ("ITL p99 (ms)", "itl_ms", "p99", False),
    ("E2E latency median (ms)", "e2el_ms", "median", False),
)


def metric(run: dict | None, key: str, stat: str | None) -> float | None:
    if not run:
        return None
    value = run.get(key)
    return value.get(stat) if stat and value else value


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def ratio_to_best_peer(results: dict, run_name: str, key: str, stat: str | None,
                       higher_is_better: bool) -> float | None:
    servers = results["servers"]
    ours = metric(servers.get("splitserve", {}).get("runs", {}).get(run_name), key, stat)
    peers = [v for p in PEERS if (v := metric(servers.get(p, {}).get("runs", {}).get(run_name), key, stat))]
    if ours is None or not peers:
        return None
    best = max(peers) if higher_is_better else min(peers)
    return ours / best if best else None


def _cache_ratio(run: dict | None) -> tuple[float | None, float | None, float | None]:
    new = metric(run, "ttft_ms_new_images", "median")
    repeated = metric(run, "ttft_ms_repeated_images", "median")
    return new, repeated, (repeated / new if new and repeated else None)


def setup_lines(results: dict) -> list[str]:
    """How it was measured: the command, machine, versions, checkpoint, and how the servers
    shared the machine; servers that did not start, and why."""
    servers, m = results["servers"], results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    out = [f"Measured {results['started_at']} (commit `{m['commit']}`), by:", "", "```",
           *results["script"].split("; then "), "```", "",
           f"Raw reports (JSON and PNG per run, server logs): `{results.get('out_dir', 'bench-results/peers')}/` "
           "(not committed).", "",
           f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, {m['os']}; "
           f"Python {m['python']}; {versions}. No accelerator: splitserve runs XLA on the CPU "
           "(`PJRT_DEVICE=CPU`), transformers serve runs eager torch (`--device cpu`), vLLM its CPU "
           "backend (`shared/peers/vllm-cpu/serve.sh`: float32, chunked prefill, prefix caching and "
           "torch.compile on, as it ships).",
           f"- **Checkpoint**: the `{checkpoint_name(results)}` demo checkpoint (`{results['checkpoint']}`), "
           "random weights, the same files for every server (for vLLM a copy with the vision tower's "
           "tensors renamed to the llava-hf layout its loader expects).",
           "- **Each server runs alone**: the previous one is stopped before the next starts. The "
           "machine is shared with other work; before each run the script waits (up to a bound) for "
           "the CPU to go quiet, and records how busy it was (below). The client and every server ran "
           f"at niceness {results['nice']}, process and session autogroup (so other sessions' work "
           "takes less of the CPU from them); splitserve's Ray workers at the same "
           "(`RAY_worker_niceness=0`; Ray's default would put them at +15 against the peers' 0)."]
    out += [f"- **{TITLES[n]} failed**: {s['error']}" for n, s in servers.items() if s.get("error")]
    return out + [""]


def load_lines(results: dict, runs: list[str]) -> list[str]:
    """Start-up time per server, and other work on the machine around each run."""
    out = ["Other work: the share of both cores used by processes other than the server under test "
           "and the client, in the 5 s before each run (server idle) / during the run "
           "(`-`: not measured).", "",
           "| server | start-up to healthy /health (s) | " + " | ".join(runs) + " |",
           "|---|---|" + "---|" * len(runs)]
    for n in [n for n in TITLES if n in results["servers"]]:
        s, cells = results["servers"][n], []
        for k in runs:
            r = s["runs"].get(k)
            during = r.get("cpu_other_during") if r else None
            cells.append("n/a" if not r else f"{r['cpu_busy_before']:.0%} / "
                         f"{'-' if during is None else f'{during:.0%}'}")
        startup = "n/a" if s["startup_s"] is None else f"{s['startup_s']:.0f}"
        out.append(f"| {TITLES[n]} | {startup} | " + " | ".join(cells) + " |")
    return out + [""]


def command_lines(results: dict, runs: list[str]) -> list[str]:
    out = ["```"]
    for n in [n for n in TITLES if n in results["servers"]]:
        server = results["servers"][n]
        out += [f"# {TITLES[n]}", server["argv"]]
        out += [server["commands"][k] for k in runs if k in server["commands"]]
    return out + ["```", ""]


def section_title(results: dict) -> str:
    """The LLaVA-1.5 peers section, or issue 17's for a LLaVA-NeXT checkpoint (`--family next`)."""
    return NEXT_SECTION if results.get("family") == "next" else SECTION


def checkpoint_name(results: dict) -> str:
    """`small`, `next-small`: the demo checkpoint's name in `splitserve demo-checkpoint` terms."""
    family = results.get("family", "llava")
    return results["size"] if family == "llava" else f"{family}-{results['size']}"


def render_section(results: dict, plot_path: Path) -> str:
    servers = results["servers"]
    names = [n for n in TITLES if n in servers]
    runs = [r for r in RUN_ORDER[:-1] if any(r in s["runs"] for s in servers.values())]
    measured = [s["runs"] for s in servers.values() if set(s["runs"]) & set(RUN_ORDER)]
    w = (measured[0].get("c1") or next(v for k, v in measured[0].items() if k in RUN_ORDER))["workload"]
    out = [section_title(results), "", *setup_lines(results),
           f"Workload (`splitserve bench`): {w['images_per_request']} image per request, each a "
           f"new crop of a real photo (JPEG, longer side <= {w['image_max_side']} px, "
           f"~{w['mean_image_bytes'] / 1024:.0f} KiB), a {w['prompt_words']}-word prompt, exactly "
           f"{w['output_tokens']} output tokens (greedy), streamed; one warm-up request before each run.", "",
           f"![output tok/s and TTFT per concurrency]({plot_path.as_posix()})", "",
           "### Throughput and latency", "",
           "Ratio: splitserve / the best peer mode (for latencies the lowest; below 1 is better there).", "",
           "| concurrency (requests) | metric | " + " | ".join(TITLES[n] for n in names) +
           " | splitserve / best peer |",
           "|---|---|" + "---|" * len(names) + "---|"]
    for run_name in runs:
        run = next(s["runs"][run_name] for s in servers.values() if run_name in s["runs"])
        level = f"{run['config']['max_concurrency']} ({run['workload']['num_requests']})"
        if run["workload"]["output_tokens"] != w["output_tokens"]:
            level += f", {run['workload']['output_tokens']} output tokens"
        for label, key, stat, higher in ROWS:
            cells = [fmt(metric(servers[n]["runs"].get(run_name), key, stat)) for n in names]
            ratio = ratio_to_best_peer(results, run_name, key, stat, higher)
            out.append(f"| {level} | {label} | " + " | ".join(cells) +
                       f" | {'n/a' if ratio is None else f'{ratio:.2f}x'} |")
        errors = [str(servers[n]["runs"].get(run_name, {}).get("errors", "n/a")) for n in names]
        out.append(f"| {level} | errors | " + " | ".join(errors) + " | |")

    out += ["", "### Cached vs uncached image", "",
            "Concurrency 1; half the image slots repeat an image an earlier request sent (on splitserve "
            "a cache hit: the router reuses the embedding and skips the encoder). TTFT medians:", "",
            "| server | requests (repeated) | new image (ms) | repeated image (ms) | repeated / new |",
            "|---|---|---|---|---|"]
    for n in names:
        run = servers[n]["runs"].get("cache")
        new, repeated, ratio = _cache_ratio(run)
        count = (metric(run, "ttft_ms_repeated_images", "count") or 0) if run else 0
        requests = run["workload"]["num_requests"] if run else "n/a"
        out.append(f"| {TITLES[n]} | {requests} ({count}) | {fmt(new)} | {fmt(repeated)} | "
                   f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")

    throughput = ratio_to_best_peer(results, "c16", "output_throughput", None, True)
    long = ratio_to_best_peer(results, "c16-long", "output_throughput", None, True)
    cache = _cache_ratio(servers.get("splitserve", {}).get("runs", {}).get("cache"))[2]
    targets = [] if results.get("family") == "next" else [  # issue 12's, on LLaVA-1.5
        "", "### Targets", "",
        target("splitserve output tok/s at concurrency 16 >= 2x the best peer mode",
               throughput, lambda r: r >= 2.0, "x"),
        target("the same with longer answers (the `c16-long` rows; not the target's workload)",
               long, lambda r: r >= 2.0, "x"),
        target("splitserve TTFT of a cached image <= 0.5x an uncached one", cache,
               lambda r: r <= 0.5, "")]
    out += [*targets, "", "### Start-up and other work on the machine", "",
            *load_lines(results, list(RUN_ORDER)), "### Command lines", "",
            *command_lines(results, list(RUN_ORDER))]
    return "\n".join(out)


def target(name: str, value: float | None, met, unit: str) -> str:
    if value is None:
        return f"- {name}: not measured."
    return f"- {name}: **{value:.2f}{unit}, {'met' if met(value) else 'missed'}**."


def update_doc(path: Path, section: str) -> None:
    """Replaces the section headed by `section`'s first line (up to the next `## ` heading) in
    `path`, keeping its `### Analysis` subsection; appends the section when absent; leaves every
    other section alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = section.split("\n", 1)[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    if found:
        old = found.group(0)
        kept = old[old.index(ANALYSIS):].rstrip() + "\n\n" if ANALYSIS in old else ""
        text = text[:found.start()] + section.rstrip() + "\n\n" + kept + text[found.end():]
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def plot_peers(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, server in results["servers"].items():
        levels = [(r["config"]["max_concurrency"], r) for k, r in server["runs"].items()
                  if k in ("c1", "c4", "c16")]
        levels.sort(key=lambda x: x[0])
        xs = [c for c, _ in levels]
        left.plot(xs, [r["output_throughput"] for _, r in levels], "o-", label=TITLES[name])
        right.plot(xs, [metric(r, "ttft_ms", "median") for _, r in levels], "o-", label=TITLES[name])
    for ax, ylabel in ((left, "output tok/s"), (right, "TTFT median (ms)")):
        ax.set(xscale="log", xlabel="concurrency", ylabel=ylabel)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"{checkpoint_name(results)} checkpoint, {results['machine']['cores']}-core CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
