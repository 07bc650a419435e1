"""The `splitserve` command line."""

from __future__ import annotations

import argparse
import sys


def _demo_checkpoint(args: argparse.Namespace) -> int:
    from deploy.demo_checkpoint import write_demo_checkpoint

    path = write_demo_checkpoint(args.directory, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} random-weight LLaVA-1.5 checkpoint (seed {args.seed}) to {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    print("splitserve serve: the router, encoder and decoder deployments are not built yet "
          "(issues 3, 4 and 5); `splitserve demo-checkpoint DIR` works today.", file=sys.stderr)
    return 2


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
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
