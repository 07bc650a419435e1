"""Shared by the benchmark scripts: machine facts."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


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
