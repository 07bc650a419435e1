"""Shared by the benchmark scripts: the cached demo checkpoint and machine facts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def demo_checkpoint(size: str, seed: int = 0) -> Path:
    """The demo checkpoint of `size`, written once under ~/.cache/splitserve."""
    from deploy.demo_checkpoint import write_demo_checkpoint

    root = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))
    path = root / f"demo-{size}-seed{seed}"
    if not (path / "splitserve_demo.json").exists():
        write_demo_checkpoint(path, size=size, seed=seed)
    return path


def copy_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth of a large copy: (bytes read + bytes written) / seconds, best of N."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def machine() -> str:
    import torch
    import torch_xla

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"torch_xla {torch_xla.__version__}, Python {platform.python_version()}")
