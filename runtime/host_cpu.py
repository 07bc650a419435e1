"""How busy the host's CPUs are: background compilation yields to the replicas beside it.

A replica that is ready compiles its remaining graphs when it is idle. On a host shared with
other replicas that are still warming up (compiling is CPU work, on a TPU host too), that
idle-time compilation would take the CPUs they need to become ready. `HostCpu.has_spare()`
says whether at least half of the host's CPUs were idle since the previous reading
(`/proc/stat`); where that file does not exist it always says yes.

>>> cpu = HostCpu(read=iter([(0, 0), (150, 200), (160, 400)]).__next__)
>>> cpu.has_spare(), cpu.has_spare()
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable

Reading = tuple[int, int]  # (idle jiffies, total jiffies) over all CPUs since boot


def read_proc_stat() -> Reading | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, everything


class HostCpu:
    def __init__(self, read: Callable[[], Reading | None] = read_proc_stat,
                 min_idle_share: float = 0.5) -> None:
        self._read = read
        self.min_idle_share = min_idle_share
        self._last = read()

    def has_spare(self) -> bool:
        """At least `min_idle_share` of the CPUs were idle since the previous call."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return True
        return (now[0] - last[0]) / (now[1] - last[1]) >= self.min_idle_share
