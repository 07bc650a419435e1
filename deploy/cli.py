"""The `splitserve` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _demo_checkpoint(args: argparse.Namespace) -> int:
    from deploy.demo_checkpoint import write_demo_checkpoint

    path = write_demo_checkpoint(args.directory, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} random-weight LLaVA-1.5 checkpoint (seed {args.seed}) to {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Starts (or joins) Ray, deploys router + encoder + decoder, waits until warm, serves
    until Ctrl-C, then shuts Serve down cleanly."""
    import signal
    import threading

    import ray
    from ray import serve

    from deploy.app import AppArgs, build_app, resolve_model

    model = resolve_model(args.model)
    decoder = {k: v for k, v in (("max_model_len", args.max_model_len),
                                 ("max_num_seqs", args.max_num_seqs)) if v is not None}
    app_args = AppArgs(model=model, device=args.device, layout=args.layout, decoder=decoder,
                       encoder_replicas=args.encoder_replicas, decoder_replicas=args.decoder_replicas)
    print(f"splitserve: model {model}, device {args.device}, layout {args.layout}", flush=True)
    local = {} if args.address else {"num_cpus": max(4, os.cpu_count() or 1)}  # one per replica
    ray.init(address=args.address, namespace="splitserve", include_dashboard=False,
             log_to_driver=args.verbose, **local)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print("splitserve: deploying; the encoder and decoder compile every bucket first "
              "(a minute or two on a CPU) ...", flush=True)
        serve.run(build_app(app_args), name="splitserve", route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        if not _wait_healthy(f"{url}/health", stop):
            return 130
        print(f"splitserve: ready at {url}  (OpenAI API under {url}/v1; Ctrl-C stops)", flush=True)
        stop.wait()
        print("splitserve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _wait_healthy(url: str, stop, poll_s: float = 1.0) -> bool:
    import httpx

    while not stop.is_set():
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(poll_s)
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Serve vision-language models with the encoder and decoder disaggregated.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo-checkpoint", help="write a deterministic random-weight LLaVA-1.5 checkpoint")
    demo.add_argument("directory")
    demo.add_argument("--size", choices=("tiny", "small"), default="tiny")
    demo.add_argument("--seed", type=int, default=0)
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
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("--address", help="join this Ray cluster ('auto' for the local one) "
                       "instead of starting a local Ray")
    serve.add_argument("--verbose", action="store_true", help="show replica logs")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
