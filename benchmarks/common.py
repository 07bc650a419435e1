"""Shared by the benchmark scripts: machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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


def int_list(text: str) -> list[int]:
    """An argparse `type`: comma-separated integers ("1,4,16")."""
    return [int(part) for part in text.split(",")]


def machine() -> dict:
    """The machine and the versions a result depends on (every benchmark records these)."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    versions = {}
    for package in ("torch", "torch_xla", "transformers", "ray", "httpx"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(memory_gb, 1), "os": platform.platform(),
            "python": platform.python_version(), "commit": commit, "versions": versions}


def machine_line(m: dict) -> str:
    """One line of `machine()` for a report header."""
    return (f"{m['arch']}, {m['cores']} cores, torch {m['versions']['torch']}, torch_xla "
            f"{m['versions']['torch_xla']}, Python {m['python']}, commit {m['commit']}")
