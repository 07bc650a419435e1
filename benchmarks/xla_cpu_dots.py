"""How fast XLA:CPU runs the decoder's dense layers at few rows, against eager torch.

    .venv/bin/python benchmarks/xla_cpu_dots.py [--rows 1,4,16,64,128] [--layout rows|columns|both]

A chain of 12 Llama MLP blocks of the small checkpoint's size (hidden 768, intermediate
2048, RMSNorm, SiLU gate), run with M rows at a time: eager torch on 2 threads, then one
XLA graph per M (PJRT on the CPU, the flags `runtime/device.py` sets). Two XLA layouts:

- `rows`: activations [M, hidden] times weights stored [in, out] (`x @ w`), as the decoder
  runs today (`decoder_service/llama.py`, Linear);
- `columns`: activations kept [hidden, M] through the chain and weights stored as torch
  stores them, [out, in] (`w @ x`), so the big operand is the dot's left-hand side.

Which is faster depends on the CPU's GEMM kernel and on M (docs/benchmarks.md, Issue 13,
the run of 2026-12-05 04:58). Outputs of both layouts are checked against eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import int_list, machine, machine_line  # noqa: E402
from runtime.device import xla_environment  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 768, 2048, 12


def rms(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + 1e-6)


def chain_rows(x, weights):
    """x [M, hidden]; weights [(gate, up, down)] stored [in, out]."""
    for g, u, d in weights:
        h = rms(x, -1)
        x = x + (F.silu(h @ g) * (h @ u)) @ d
    return x


def chain_columns(x, weights):
    """x [M, hidden]; weights stored [out, in]; the chain runs on x.T."""
    x = x.T
    for g, u, d in weights:
        h = rms(x, 0)
        x = x + d @ (F.silu(g @ h) * (u @ h))
    return x.T


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int_list, default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--layout", choices=("rows", "columns", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    os.environ.update(xla_environment(dict(os.environ)))
    import torch_xla  # noqa: PLC0415  (after XLA_FLAGS are set)

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    # torch's [out, in] convention; the row layout (and eager) stores the transpose.
    weights = [tuple(torch.randn(o, i) / 30 for o, i in
                     ((INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)))
               for _ in range(LAYERS)]
    eager_weights = [tuple(w.t().contiguous() for w in ws) for ws in weights]
    device = torch_xla.device()
    layouts = ("rows", "columns") if args.layout == "both" else (args.layout,)
    on_device = {
        "rows": (chain_rows, [tuple(w.to(device) for w in ws) for ws in eager_weights]),
        "columns": (chain_columns, [tuple(w.to(device) for w in ws) for ws in weights]),
    }

    host = machine()
    print(f"{host['cpu']}; {machine_line(host)}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print("| rows | eager ms | " + " | ".join(f"XLA {n} ms | {n} max abs diff" for n in layouts) + " |")
    print("|---" * (2 + 2 * len(layouts)) + "|")
    for rows in args.rows:
        x = torch.randn(rows, HIDDEN)
        with torch.no_grad():
            reference = chain_rows(x, eager_weights)
            eager = median_ms(lambda: chain_rows(x, eager_weights), args.repeats)
        cells = [f"{rows}", f"{eager:.1f}"]
        xd = x.to(device)
        for name in layouts:
            fn, ws = on_device[name]

            def run():
                y = fn(xd, ws)
                torch_xla.sync()
                return y.cpu()
            for _ in range(3):  # compile, then warm
                out = run()
            cells += [f"{median_ms(run, args.repeats):.1f}", f"{(out - reference).abs().max().item():.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
