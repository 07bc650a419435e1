"""How busy the host's CPUs are, and how large their L2 cache: background compilation yields
to the replicas beside it, and a decoder computing on the CPUs sees when another process
competes for every core.

A replica that is ready compiles its remaining graphs when it is idle. On a host shared with
other replicas that are still warming up (compiling is CPU work, on a TPU host too), that
idle-time compilation would take the CPUs they need to become ready. `HostCpu.has_spare()`
says whether at least half of the host's CPUs were idle since the previous reading
(`/proc/stat`); where that file does not exist it always says yes.

`HostCpu.others_computing()` says whether, at this instant, at least as many threads besides
the caller are runnable as the host has CPUs (`/proc/loadavg`'s running count): then a graph
that computes on every core shares each of them. A decoder on XLA's CPU backend reads it right
before each step (decoder_service/graph_times.py); a count of this instant, not an average, is
what tells it that the encoder has just started a batch. Where the file does not exist it
says no.

`l2_cache_bytes()` reads a core's L2 size from sysfs: the decoder lays out its LM head in
blocks that fit it where XLA computes on the host (decoder_service/llama.py).

>>> cpu = HostCpu(read=iter([(0, 0), (150, 200), (160, 400)]).__next__)
>>> cpu.has_spare(), cpu.has_spare()
(True, False)
>>> busy = HostCpu(read=lambda: None, read_running=iter([2, 3, None]).__next__, cpus=2)
>>> busy.others_computing(), busy.others_computing(), busy.others_computing()
(False, True, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable

Reading = tuple[int, int]  # (idle jiffies, total jiffies) over all CPUs since boot


def read_proc_stat() -> Reading | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, everything


def read_running_threads() -> int | None:
    """Threads runnable on the host at this instant, the caller included."""
    try:
        with open("/proc/loadavg") as loadavg:
            return int(loadavg.read().split()[3].split("/")[0])  # "running/total"
    except (OSError, ValueError, IndexError):
        return None


class HostCpu:
    def __init__(self, read: Callable[[], Reading | None] = read_proc_stat,
                 min_idle_share: float = 0.5,
                 read_running: Callable[[], int | None] = read_running_threads,
                 cpus: int | None = None) -> None:
        self._read = read
        self.min_idle_share = min_idle_share
        self._read_running = read_running
        self.cpus = cpus or os.cpu_count() or 1
        self._last = read()

    def has_spare(self) -> bool:
        """At least `min_idle_share` of the CPUs were idle since the previous call."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return True
        return (now[0] - last[0]) / (now[1] - last[1]) >= self.min_idle_share

    def others_computing(self) -> bool:
        """At least `cpus` threads other than the caller are runnable right now."""
        running = self._read_running()
        return running is not None and running - 1 >= self.cpus


def l2_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of the first CPU's level-2 data (or unified) cache, from sysfs; None where
    sysfs does not say. Sizes there read like "1024K" or "2048K".

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> caches = (("index0", 1, "Data", "32K"), ("index2", 2, "Unified", "1024K"))
    >>> for name, level, kind, size in caches:
    ...     (root / name).mkdir()
    ...     for field, value in (("level", level), ("type", kind), ("size", size)):
    ...         _ = (root / name / field).write_text(f"{value}\\n")
    >>> l2_cache_bytes(str(root)), l2_cache_bytes(str(root / "none"))
    (1048576, None)
    """
    try:
        names = sorted(os.listdir(cache_dir))
    except OSError:
        return None
    for name in names:
        try:
            level, kind, size = (_read_text(os.path.join(cache_dir, name, field))
                                 for field in ("level", "type", "size"))
            if level == "2" and kind in ("Data", "Unified"):
                unit = _SIZE_UNITS.get(size[-1])
                return int(size[:-1]) * unit if unit else int(size)
        except (OSError, ValueError, IndexError):  # not a cache's folder, or an empty size
            continue
    return None


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _read_text(path: str) -> str:
    with open(path) as file:
        return file.read().strip()
