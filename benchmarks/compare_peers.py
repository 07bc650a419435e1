"""Side by side in one run: splitserve vs `transformers serve` (default and --continuous-batching)
and vLLM's CPU backend.

    .venv/bin/python benchmarks/compare_peers.py [--size small] [--workloads peers|issue13|all|NAME,...]
        [--servers transformers,transformers-cb,vllm,splitserve] [--smoke]

Each server runs alone (started, measured, stopped before the next starts), so none shares
the CPU with another. All get the same workloads from `splitserve bench`, fixed output lengths
(splitserve and vLLM: `ignore_eos`; transformers serve rejects that field, so it gets a
`generation_config` with `min_new_tokens` = `max_new_tokens`). The workloads (`WORKLOADS`):

- `peers`: concurrency 1, 4 and 16 with 8, 16 and 32 requests, one new photo crop per request;
  a cache run at concurrency 1 where half the images repeat earlier ones (cached-vs-uncached
  TTFT); concurrency 16 with longer answers (`--long-output-tokens`);
- `issue13` (issue 13's benchmarks): `image-pool`, concurrency 16, 64 requests whose images come
  from a pool of 8 (the same bytes each time) with a new question each; `new-images-itl`,
  concurrency 16, every image new, 64 output tokens (inter-token latency); `seen-image-ttft`,
  concurrency 1, 8 images each asked twice in a row with different questions (TTFT of the
  second sight over the first).

vLLM runs through `../shared/peers/vllm-cpu/serve.sh` on a llava-hf-layout copy of the
checkpoint, with splitserve's `--max-model-len` and `--max-num-seqs`. Where a server exports
prefix-cache counters (vLLM's /metrics; splitserve's through Ray's metrics port) each run
records the prompt tokens queried and hit.

On a shared machine: before each run the script waits (bounded) for other work to leave the
CPU and records how busy it was; it runs itself and every server at `--nice` (process and
session autogroup, which needs root for negative values). `--merge` re-runs some servers and
keeps the others' results. `--smoke` checks the harness in minutes (at most concurrency 2,
4 requests, 8 output tokens, a pool of 2 images per run). vLLM's CPU attention has no kernel
for the `tiny` checkpoint's head size (16): its engine fails on the first request, so smoke
vLLM on `small`. A server that turns unhealthy keeps the runs it finished; the rest are skipped.

`--family next` runs the same on the LLaVA-NeXT demo checkpoint (issue 17; `peers` runs only).

Raw reports (JSON + PNG per run, server logs) go to `bench-results/peers/` (`peers-next/`); the tables,
machine, versions and command lines go into `docs/benchmarks.md`, `peers` runs under
`peers_doc.SECTION` and `issue13` runs under `issue13_doc.SECTION` (other sections of that
file are left as they are; an `### Analysis` subsection is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import issue13_doc, peers_doc  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.peer_servers import (OtherWork, Server, healthy, metrics_url, prefix_cache_delta,  # noqa: E402
                                     prefix_counters, prepare_vllm, prioritize, servers, start,
                                     stop, vllm_versions, wait_quiet)
from deploy.bench import BenchConfig, WorkloadSpec, plot_png, run_bench, write_json  # noqa: E402
from deploy.demo_checkpoint import cached_demo_checkpoint  # noqa: E402

GROUPS = {"peers": ("c1", "c4", "c16", "cache", "c16-long"),
          "issue13": ("image-pool", "new-images-itl", "seen-image-ttft")}
GROUPS["all"] = GROUPS["peers"] + GROUPS["issue13"]


def workloads(args) -> dict[str, tuple[int, WorkloadSpec]]:
    """Every named run: (concurrency, workload). Seeds are fixed, so every server gets the
    same requests, byte for byte."""
    base = WorkloadSpec(prompt_words=args.prompt_words, output_tokens=args.output_tokens)
    runs = {
        "c1": (1, replace(base, num_requests=8, seed=101)),
        "c4": (4, replace(base, num_requests=16, seed=104)),
        "c16": (16, replace(base, num_requests=32, seed=116)),
        "cache": (1, replace(base, num_requests=args.cache_requests, repeat_ratio=0.5, seed=7)),
        # where decoding, not prefill, dominates the work
        "c16-long": (16, replace(base, num_requests=32, output_tokens=args.long_output_tokens, seed=216)),
        "image-pool": (16, replace(base, num_requests=64, image_pool_size=8, seed=300)),
        "new-images-itl": (16, replace(base, num_requests=32, output_tokens=64, seed=301)),
        "seen-image-ttft": (1, replace(base, num_requests=16, questions_per_image=2, seed=302)),
    }
    if args.smoke:  # the same shapes, a few requests each
        runs = {name: (min(c, 2), replace(w, num_requests=min(w.num_requests, 4),
                                          output_tokens=min(w.output_tokens, 8),
                                          image_pool_size=min(w.image_pool_size, 2)))
                for name, (c, w) in runs.items()}
    return runs


def selected_workloads(text: str) -> list[str]:
    """`--workloads`: run and group names, comma-separated, in `GROUPS["all"]` order."""
    names = set()
    for name in text.split(","):
        if name not in GROUPS and name not in GROUPS["all"]:
            raise argparse.ArgumentTypeError(
                f"unknown workload {name!r}; choose from {', '.join([*GROUPS, *GROUPS['all']])}")
        names.update(GROUPS.get(name, (name,)))
    return [n for n in GROUPS["all"] if n in names]


def configs(server: Server, args) -> dict[str, BenchConfig]:
    def fixed_length(tokens: int) -> dict:
        if server.ignore_eos:
            return {}
        return {"generation_config": json.dumps(
            {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False})}

    runs = workloads(args)
    return {name: BenchConfig(base_url=f"{server.url}/v1", model=server.model, workload=spec,
                              max_concurrency=concurrency, ignore_eos=server.ignore_eos,
                              extra_body=fixed_length(spec.output_tokens), warmup_requests=1,
                              timeout_s=args.run_timeout_s, request_timeout_s=args.run_timeout_s,
                              label=f"{server.name} {name}")
            for name in args.workloads for concurrency, spec in [runs[name]]}


def bench_command(config: BenchConfig) -> str:
    """The `splitserve bench` command line that reproduces one run."""
    w = config.workload
    argv = ["splitserve", "bench", "--base-url", config.base_url, "--model", config.model,
            "--num-requests", w.num_requests, "--concurrency", config.max_concurrency,
            "--images-per-request", w.images_per_request, "--repeat-ratio", w.repeat_ratio,
            "--prompt-words", w.prompt_words, "--output-tokens", w.output_tokens, "--seed", w.seed,
            "--warmup-requests", config.warmup_requests]
    argv += ["--image-pool-size", w.image_pool_size] if w.image_pool_size else []
    argv += ["--questions-per-image", w.questions_per_image] if w.questions_per_image > 1 else []
    argv += ["--ignore-eos"] if config.ignore_eos else []
    argv += ["--extra-body", json.dumps(config.extra_body)] if config.extra_body else []
    return shlex.join(str(a) for a in argv)


def run_server(server: Server, args, out_dir: Path) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {server.name}: starting", flush=True)
    process, startup_s = start(server, out_dir / f"{server.name}.log", args.nice)
    print(f"[{time.strftime('%H:%M:%S')}] {server.name}: healthy after {startup_s:.0f} s", flush=True)
    result = {"argv": server.command_line, "startup_s": startup_s, "runs": {}, "commands": {},
              "started_at": time.strftime("%H:%M")}
    try:
        metrics = metrics_url(server, process)
        if server.prefix_metrics and not metrics:
            print(f"[{time.strftime('%H:%M:%S')}] {server.name}: no Prometheus endpoint found; "
                  "prefix-cache hits not recorded", flush=True)
        for name, config in configs(server, args).items():
            busy_before = wait_quiet(args.wait_quiet_s)
            counters = []  # prefix-cache counters after the warm-up request, and after the run

            def read_counters():
                if metrics:
                    time.sleep(server.metrics_lag_s)
                counters.append(prefix_counters(metrics, server.prefix_metrics))

            with OtherWork(process.pid) as other:
                report, _ = run_bench(config, after_warmup=read_counters)
            read_counters()
            prefix_cache = prefix_cache_delta(*counters)
            report["cpu_busy_before"], report["cpu_other_during"] = busy_before, other.share
            report["prefix_cache"] = prefix_cache
            stem = out_dir / f"{server.name}-{name}"
            write_json(report, stem.with_suffix(".json"))
            plot_png(report, stem.with_suffix(".png"))
            result["runs"][name] = {k: v for k, v in report.items() if k != "requests"}
            result["commands"][name] = bench_command(config)
            hits = (f", prefix-cache hits {prefix_cache['hit_rate']:.0%}"
                    if prefix_cache and prefix_cache["hit_rate"] is not None else "")
            print(f"[{time.strftime('%H:%M:%S')}] {server.name} {name}: "
                  f"{report['output_throughput']:.1f} output tok/s, TTFT median "
                  f"{(report['ttft_ms'] or {}).get('median', float('nan')):.0f} ms{hits}, "
                  f"{report['errors']} errors (CPU {busy_before:.0%} busy before, other work "
                  f"{other.share:.0%} during)", flush=True)
            if not healthy(server, process):  # keep what it measured; the rest would be errors
                result["error"] = (f"unhealthy after the {name} run (exit code {process.poll()}); "
                                   f"see {server.name}.log")
                print(f"[{time.strftime('%H:%M:%S')}] {server.name}: {result['error']}", flush=True)
                break
    finally:
        stop(process, server.stop_signal)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--family", default="llava", choices=("llava", "next"),
                        help="the demo checkpoint's family: LLaVA-1.5 or LLaVA-NeXT (anyres; its "
                        "`peers` runs go under peers_doc.NEXT_SECTION)")
    parser.add_argument("--servers", default="transformers,transformers-cb,vllm,splitserve")
    parser.add_argument("--workloads", type=selected_workloads, default="peers",
                        help="runs or groups of runs, comma-separated: peers (c1,c4,c16,cache,"
                        "c16-long), issue13 (image-pool,new-images-itl,seen-image-ttft), all")
    parser.add_argument("--smoke", action="store_true",
                        help="a few requests per run, to check the harness (writes its doc "
                        "section under --out-dir, not docs/)")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--cache-requests", type=int, default=16)
    parser.add_argument("--long-output-tokens", type=int, default=128,
                        help="output tokens of the c16-long run")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--splitserve-args", default="",
                        help="more `splitserve serve` flags, as one string")
    parser.add_argument("--vllm-args", default="", help="more vLLM server flags, as one string")
    parser.add_argument("--run-timeout-s", type=float, default=900.0, help="bound on each bench run")
    parser.add_argument("--wait-quiet-s", type=float, default=120.0,
                        help="wait up to this long for other work to leave the CPU before each run")
    parser.add_argument("--nice", type=int, default=-5,
                        help="niceness of this script, hence of the servers and the client (a "
                        "negative value needs root): on a shared machine, other work then takes "
                        "less of the CPU from what is measured")
    parser.add_argument("--merge", action="store_true",
                        help="keep earlier results from OUT_DIR/summary.json, replacing only the "
                        "runs made now (e.g. one that other work on the machine disturbed)")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--doc", type=Path)
    args = parser.parse_args(argv)
    if args.family == "next" and set(args.workloads) & set(GROUPS["issue13"]):
        parser.error("--family next: the issue13 runs are LLaVA-1.5's; choose from the peers group")
    stem = "peers" if args.family == "llava" else f"peers-{args.family}"
    args.out_dir = args.out_dir or ROOT / "bench-results" / (f"{stem}-smoke" if args.smoke else stem)
    args.doc = args.doc or (args.out_dir / "benchmarks.md" if args.smoke else ROOT / "docs" / "benchmarks.md")
    server_names = args.servers.split(",")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.nice:
        prioritize(os.getpid(), args.nice)

    checkpoint = cached_demo_checkpoint(args.size, family=args.family)
    known = servers(checkpoint, args)
    unknown = [n for n in server_names if n not in known]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {', '.join(known)}")
    results = {"machine": machine(), "size": args.size, "family": args.family, "checkpoint": str(checkpoint),
               "script": shlex.join([Path(sys.executable).relative_to(ROOT).as_posix()
                                     if Path(sys.executable).is_relative_to(ROOT) else sys.executable,
                                     "benchmarks/compare_peers.py", *(argv or sys.argv[1:])]),
               "started_at": time.strftime("%Y-%m-%d %H:%M %Z"),
               "nice": os.getpriority(os.PRIO_PROCESS, 0), "servers": {},
               "out_dir": (args.out_dir.resolve().relative_to(ROOT).as_posix()
                           if args.out_dir.resolve().is_relative_to(ROOT) else str(args.out_dir))}
    if "vllm" in server_names:  # before any server starts: a missing peer fails fast
        prepare_vllm(checkpoint)
        results["machine"]["versions"].update(vllm_versions())
    summary = args.out_dir / "summary.json"
    if args.merge and summary.exists():
        previous = json.loads(summary.read_text())
        results["servers"] = previous["servers"]
        results["script"] = f"{previous['script']}; then {results['script']}"
        results["started_at"] = (f"{previous['started_at']}; re-run of {','.join(args.workloads)} "
                                 f"on {args.servers}: {results['started_at']}")
    failed = []
    for name in server_names:
        try:
            result = run_server(known[name], args, args.out_dir)
        except (RuntimeError, TimeoutError) as exc:  # it did not start: measure the others
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {exc}", flush=True)
            failed.append(name)
            if name not in results["servers"]:
                results["servers"][name] = {"argv": known[name].command_line, "startup_s": None,
                                            "error": str(exc), "runs": {}, "commands": {}}
            continue
        if result.get("error"):
            failed.append(name)
        if name in results["servers"]:  # --merge: the runs made now replace their earlier ones
            earlier = results["servers"][name]
            result["runs"] = {**earlier["runs"], **result["runs"]}
            result["commands"] = {**earlier["commands"], **result["commands"]}
            result["started_at"] = f"{earlier.get('started_at', '')}, {result['started_at']}"
        results["servers"][name] = result
        write_json(results, summary)  # what finished, if a later one fails
    write_json(results, summary)
    measured = {run for server in results["servers"].values() for run in server["runs"]}
    if measured & set(GROUPS["peers"]):
        plot = peers_doc.plot_peers(results, args.doc.parent / f"benchmarks-{stem}.png")
        peers_doc.update_doc(args.doc, peers_doc.render_section(results, plot.relative_to(args.doc.parent)))
        print(f"wrote {plot} and the {peers_doc.section_title(results)!r} section of {args.doc}")
    if measured & set(GROUPS["issue13"]):
        peers_doc.update_doc(args.doc, issue13_doc.render_section(results))
        print(f"wrote the {issue13_doc.SECTION!r} section of {args.doc}")
    print(f"wrote {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
