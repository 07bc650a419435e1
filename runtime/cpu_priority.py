"""CPU scheduling policy of a replica on a host whose cores it shares with a decoder.

With XLA's CPU backend (or the `cpu` device) the encoder and decoder replicas compute on the
same cores. Measured on the 2-core development machine with every image new (docs/benchmarks.md,
Issue 13): while the encoder encoded, the decoder got ~0.9 of its usual ~1.4 cores and its steps
took twice as long, which made the longest gaps between tokens. A higher nice value for the
encoder did not help: under Linux's EEVDF scheduler a waking thread still waits for the
running one's slice, and a decode step wakes its XLA threads thousands of times.

`SCHED_IDLE` does help: a thread of a normal policy that wakes preempts an idle-policy thread at
once, so the encoder computes only on the cycles the decoder leaves. The price is the encoder's
speed while the decoder is busy: new images wait longer for their embeddings (TTFT) and fewer
sequences share each decode step. Hence a choice (`EncoderConfig.cpu_priority`), not a default.
Unprivileged: any thread may lower its own policy to `SCHED_IDLE`.
"""

from __future__ import annotations

import os

CPU_PRIORITIES = ("normal", "idle")


def idle_policy_for_all_threads() -> int:
    """Puts every thread of this process under `SCHED_IDLE`; threads started later inherit it
    from the thread that starts them. Returns how many threads it set."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        count += 1
    return count
