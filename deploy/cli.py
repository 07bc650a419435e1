"""The `splitserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from runtime.cpu_priority import CPU_PRIORITIES, RELAY_CPU_POLICIES, policy_for_all_threads

APP_NAME = "splitserve"
DEFAULT_STARTUP_TIMEOUT_S = 1800.0  # generous: the 7B model compiles every bucket on one chip


def _demo_checkpoint(args: argparse.Namespace) -> int:
    from deploy.demo_checkpoint import write_demo_checkpoint

    path = write_demo_checkpoint(args.directory, size=args.size, seed=args.seed,
                                 strategy=args.strategy, image_size=args.image_size,
                                 image_seq_length=args.image_seq_length, family=args.family)
    name = "LLaVA-NeXT" if args.family == "next" else "LLaVA-1.5"
    print(f"wrote a {args.size} random-weight {name} checkpoint (seed {args.seed}) to {path}")
    return 0


def relay_cpu_policy(args: argparse.Namespace, environ) -> str:
    """The scheduling policy of this process and of the local Ray it starts, whose compute
    replicas return to the normal one (runtime/cpu_priority.py). "batch" by default where the
    replicas compute on this host's CPU; a cluster joined with --address keeps its own."""
    from runtime.device import computes_on_host

    if args.relay_cpu_policy:
        return args.relay_cpu_policy
    return "batch" if computes_on_host(args.device, environ) and not args.address else "normal"


def _serve(args: argparse.Namespace) -> int:
    """Checks the deploy, starts (or joins) Ray, deploys router + encoder + decoder, waits
    until warm, serves until Ctrl-C, then shuts Serve down cleanly. A deploy that cannot
    become healthy exits non-zero with the cause (`deploy/startup.py`)."""
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    # This process calls ray.init itself. Without this (read when ray is first imported), a
    # Ctrl-C mid-deploy ends with serve.run's thread, cut off by ray.shutdown(), starting a new
    # Ray as the process exits, and saying so.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    from deploy.app import AppArgs, build_app, resolve_model

    model = resolve_model(args.model)
    decoder = {k: v for k, v in (("max_model_len", args.max_model_len),
                                 ("max_num_seqs", args.max_num_seqs),
                                 ("kv_cache_bytes", args.kv_cache_bytes),
                                 ("max_num_batched_tokens", args.max_num_batched_tokens),
                                 ("max_chunk_tokens_while_decoding",
                                  args.max_chunk_tokens_while_decoding))
               if v is not None}
    if args.no_prefix_caching:
        decoder["enable_prefix_caching"] = False
    if args.no_mixed_graphs:
        decoder["mixed_graphs"] = False
    if args.full_warmup:
        decoder["full_warmup"] = True
    encoder = {"cpu_priority": args.encoder_cpu_priority} if args.encoder_cpu_priority else {}
    app_args = AppArgs(model=model, device=args.device, layout=args.layout, decoder=decoder,
                       encoder=encoder,
                       encoder_replicas=args.encoder_replicas, decoder_replicas=args.decoder_replicas,
                       compile_cache=args.compile_cache)
    print(f"splitserve: model {model}, device {args.device}, layout {args.layout}", flush=True)
    # Checking the deploy against the model (its config and processor: seconds of imports) runs
    # beside Ray's and Serve's start-up, not before it; a deploy that fails the check stops
    # both before any replica is asked for.
    # This process never runs a model: the check reads the processor without torch (runtime/
    # no_torch.py), 8.9 -> ~2.5 s of CPU on the start-up's critical path (Serve is up before the
    # check ends). Ray's processes are separate and import torch as usual.
    from runtime.no_torch import without_torch

    without_torch()
    # Ray's local processes inherit this environment: the PJRT variables every local replica
    # would choose, set once here.
    from runtime.device import xla_environment

    os.environ.update(xla_environment(os.environ))
    relay_policy = relay_cpu_policy(args, os.environ)
    if relay_policy != "normal":
        policy_for_all_threads(relay_policy)  # the local Ray's processes inherit it
    checker = ThreadPoolExecutor(1, thread_name_prefix="check-deploy")
    checking = checker.submit(build_app, app_args)
    checker.shutdown(wait=False)  # the submitted check still runs; the thread ends after it

    import ray
    from ray import serve

    from deploy import warmup_progress
    from deploy.startup import Deploying, health_probe, serve_status_probe, wait_until_ready

    local = {} if args.address else {"num_cpus": max(4, os.cpu_count() or 1)}  # one per replica
    # No --address: always a new local Ray, never a cluster some other process left running.
    ray.init(address=args.address or "local", namespace="splitserve", include_dashboard=False,
             log_to_driver=args.verbose, **local)
    stop, drain, serving = threading.Event(), True, True
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            app = checking.result()
        except ValueError as exc:
            print(f"splitserve: cannot deploy {model}: {exc}", file=sys.stderr, flush=True)
            drain = False  # nothing deployed yet
            return 2
        print("splitserve: deploying; the encoder compiles its largest bucket and the decoder its "
              "covering prefill graph first (the rest compile once it serves) ...", flush=True)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        began = time.monotonic()
        deploying = Deploying(lambda: serve.run(app, name=APP_NAME, route_prefix="/"))
        outcome = wait_until_ready(
            [deploying.probe, serve_status_probe(APP_NAME), health_probe(f"{url}/health"),
             warmup_progress.probe(APP_NAME)], stop,
            args.startup_timeout_s,
            on_progress=lambda why: print(f"splitserve: waiting ({time.monotonic() - began:.0f} s): "
                                          f"{why}", flush=True))
        if outcome.state == "stopped":  # Ctrl-C before ready: nothing has been served
            serving = False
            return 130
        if outcome.state == "failed":
            print(f"splitserve: the deploy failed: {outcome.detail}", file=sys.stderr, flush=True)
            if not args.address:
                drain = False  # our own Ray: ray.shutdown() stops every replica at once
            return 1
        print(f"splitserve: ready at {url} after {time.monotonic() - began:.0f} s  (OpenAI API "
              f"under {url}/v1; Ctrl-C stops)", flush=True)
        print(f"splitserve: {_background_compilation(url)}", flush=True)
        stop.wait()
        print("splitserve: shutting down", flush=True)
    finally:
        if drain:  # deleting the app drains it: streams in flight finish first
            try:
                # Replicas still in their constructors have nothing to drain, and Serve would
                # wait for them (a minute, then fail): the controller deletes them on its own.
                serve.delete(APP_NAME, _blocking=serving)
            except Exception as exc:  # noqa: BLE001: shutting down regardless
                print(f"splitserve: draining failed: {exc}", file=sys.stderr, flush=True)
        # Our own local Ray goes with everything in it. (serve.shutdown() would end with the
        # controller killing itself mid-task, which Ray reports as a failed task: noise.) On a
        # cluster we joined, only our app goes; its Serve instance stays for the others.
        ray.shutdown()
    return 0


def _background_compilation(url: str) -> str:
    """What /health says of the graphs still compiling once the replicas serve."""
    import httpx

    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        parts = [f"{half} {health[half]['graphs_compiled']}/{health[half]['graphs_planned']}"
                 for half in ("encoder", "decoder")]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return f"could not read compilation progress from /health ({exc})"
    return ("serving; the remaining graphs compile in the background, between steps (graphs "
            f"compiled: {', '.join(parts)}; metric splitserve_graphs_compiled)")


def _bench(args: argparse.Namespace) -> int:
    """Drives an OpenAI-compatible endpoint; prints the summary, writes JSON (+ PNG)."""
    from pathlib import Path

    from deploy.bench import format_table, plot_png, run_bench, write_json

    try:
        config = _bench_config(args)
        report, _ = run_bench(config)
    except ValueError as exc:  # bad flags, or no model name to send
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2
    print(format_table(report), flush=True)
    stem = args.out.removesuffix(".json")
    print(f"wrote {write_json(report, Path(stem + '.json'))}")
    if not args.no_plot:
        print(f"wrote {plot_png(report, Path(stem + '.png'))}")
    return 0 if report["completed"] else 1


def _bench_config(args: argparse.Namespace):
    import json
    import math

    from deploy.bench import BenchConfig, WorkloadSpec

    workload = WorkloadSpec(num_requests=args.num_requests, images_per_request=args.images_per_request,
                            repeat_ratio=args.repeat_ratio, prompt_words=args.prompt_words,
                            output_tokens=args.output_tokens, image_max_side=args.image_max_side,
                            image_pool_size=args.image_pool_size,
                            questions_per_image=args.questions_per_image, seed=args.seed)
    return BenchConfig(
        base_url=args.base_url, workload=workload, model=args.model,
        max_concurrency=args.concurrency or None,
        request_rate=args.request_rate if args.request_rate is not None else math.inf,
        ignore_eos=args.ignore_eos, temperature=args.temperature,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
        warmup_requests=args.warmup_requests, timeout_s=args.timeout_s,
        request_timeout_s=args.request_timeout_s, label=args.label)


def _bytes(text: str) -> int:
    """'268435456', '256MiB', '16GiB', '1.5GB' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, scale in units.items():
        if lowered.endswith(suffix):
            try:
                return int(float(lowered.removesuffix(suffix)) * scale)
            except ValueError:
                break
    if lowered.isdigit():
        return int(lowered)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 268435456, 256MiB, 16GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Serve vision-language models with the encoder and decoder disaggregated.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo-checkpoint", help="write a deterministic random-weight LLaVA checkpoint")
    demo.add_argument("directory")
    demo.add_argument("--size", choices=("tiny", "small"), default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--family", choices=("llava", "next"), default="llava",
                      help="'llava': LLaVA-1.5, one view per image; 'next': LLaVA-NeXT, anyres "
                      "tiles from five grid pinpoints")
    demo.add_argument("--strategy", choices=("default", "full"), default="default",
                      help="vision_feature_select_strategy: 'full' keeps the CLS row (one more "
                      "token per image)")
    demo.add_argument("--image-size", type=int,
                      help="the vision tower's input size in pixels (patches are 16 px)")
    demo.add_argument("--image-seq-length", type=int,
                      help="what config.json states as image_seq_length (default: the true count)")
    demo.set_defaults(run=_demo_checkpoint)

    serve = commands.add_parser("serve", help="run router + encoder + decoder on Ray Serve")
    serve.add_argument("--model", help="checkpoint directory or hub id (default: the tiny demo "
                       "checkpoint, created once under ~/.cache/splitserve)")
    serve.add_argument("--device", choices=("xla", "cpu", "cuda"), default="xla")
    serve.add_argument("--layout", choices=("disaggregated", "colocated"), default="disaggregated")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--encoder-replicas", type=int)
    serve.add_argument("--decoder-replicas", type=int)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int, help="most sequences decoded together")
    serve.add_argument("--kv-cache-bytes", type=_bytes,
                       help="the decoder's paged KV pool, all layers (e.g. 512MiB, 16GiB; "
                       "default 256MiB)")
    serve.add_argument("--max-num-batched-tokens", type=int,
                       help="tokens per engine step: decodes plus prefill chunks (default 256)")
    serve.add_argument("--max-chunk-tokens-while-decoding", type=int,
                       help="prefill tokens a step may carry while anything decodes: the longest "
                            "a chunk stalls the running streams (default half the step's tokens)")
    serve.add_argument("--no-prefix-caching", action="store_true",
                       help="never reuse KV blocks across requests")
    serve.add_argument("--no-mixed-graphs", action="store_true",
                       help="run a step that decodes and prefills as two graphs (fewer graphs to "
                            "compile; by default half a batch or more and its chunks share one)")
    serve.add_argument("--encoder-cpu-priority", choices=CPU_PRIORITIES,
                       help="'idle': once warm, the encoder replicas compute only on CPU time the "
                       "decoder leaves (smoother streams, slower new images, where both share the "
                       "host's cores: the CPU backend); default 'normal'")
    serve.add_argument("--relay-cpu-policy", choices=RELAY_CPU_POLICIES,
                       help="scheduling policy of everything but the compute replicas (this "
                       "process, Ray's and Serve's processes, the router) in the local Ray it "
                       "starts: 'batch' never preempts a compute thread when it wakes. Default "
                       "'batch' where the model computes on this host's CPU, else 'normal'")
    serve.add_argument("--compile-cache", metavar="DIR",
                       help="torch_xla's persistent compilation cache root (default "
                       "$XDG_CACHE_HOME/splitserve/xla), used where the backend can reload "
                       "executables (a smoke check decides; not the CPU client of torch_xla 2.9)")
    serve.add_argument("--full-warmup", action="store_true",
                       help="compile every decoder graph before serving (slower start)")
    serve.add_argument("--address", help="join this Ray cluster ('auto' for the local one) "
                       "instead of starting a local Ray")
    serve.add_argument("--startup-timeout-s", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                       help="seconds the deploy may take to turn healthy (warm-up included) "
                       "before it counts as failed")
    serve.add_argument("--verbose", action="store_true", help="show replica logs")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint (splitserve, transformers serve, vLLM)",
        description="Streams chat requests with images from a pool of real photos to BASE_URL and "
        "reports throughput, TTFT, TPOT, ITL and errors, as `vllm bench serve` does.")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="the OpenAI base URL, ending in /v1")
    bench.add_argument("--model", help="model name to send (default: the first that /v1/models "
                       "lists; transformers serve wants the checkpoint path)")
    bench.add_argument("--num-requests", type=int, default=32)
    bench.add_argument("--concurrency", type=int, default=1,
                       help="most requests in flight (0: no cap, needs --request-rate)")
    bench.add_argument("--request-rate", type=float,
                       help="requests/s with Poisson arrivals (default: send as fast as "
                       "--concurrency allows)")
    bench.add_argument("--images-per-request", type=int, default=1)
    bench.add_argument("--repeat-ratio", type=float, default=0.0,
                       help="probability that an image repeats one an earlier request sent")
    bench.add_argument("--image-pool-size", type=int, default=0,
                       help="draw every image from this many fixed images (0: --repeat-ratio decides)")
    bench.add_argument("--questions-per-image", type=int, default=1,
                       help="consecutive requests asking about each new image, with new text")
    bench.add_argument("--prompt-words", type=int, default=32)
    bench.add_argument("--output-tokens", type=int, default=32, help="max_tokens of every request")
    bench.add_argument("--ignore-eos", action="store_true",
                       help="send ignore_eos: true (splitserve, vLLM) so every answer is "
                       "--output-tokens long")
    bench.add_argument("--extra-body", help="JSON object merged into every request body")
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--image-max-side", type=int, default=448)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--warmup-requests", type=int, default=0)
    bench.add_argument("--timeout-s", type=float, default=600.0, help="bound on the whole run")
    bench.add_argument("--request-timeout-s", type=float, default=300.0)
    bench.add_argument("--label", default="")
    bench.add_argument("--out", default="bench-result",
                       help="output path stem: writes STEM.json and STEM.png")
    bench.add_argument("--no-plot", action="store_true")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
