"""CPU scheduling policies of the processes that share a host's cores with the model's compute.

With XLA's CPU backend (or the `cpu` device) every process of a local deployment computes or
relays on the same cores. Two policies follow from what was measured on the 2-core development
machine (docs/benchmarks.md, Issue 13):

**Relays yield to compute** (`RELAY_CPU_POLICIES`, default "batch" there). The router, Serve's
proxy and controller and Ray's own processes move requests and tokens; they took ~0.23 of the 2
cores while serving, and each of their wake-ups could preempt a compute thread of the decoder,
whose served steps ran 15-20 % slower than the same graphs alone. Under `SCHED_BATCH` a waking
thread does not preempt the running one; it runs when a compute thread sleeps or its slice
ends, and it still gets its share. (`SCHED_IDLE` for them starved the router: first tokens
came 1 s later and the image pool ran slower.) `splitserve serve` puts itself under the relay
policy before it starts a local Ray, whose processes inherit it; the compute replicas
(`restore_compute_policy`) return to the normal policy before they start threads of their own.

**The encoder may go idle** (`CPU_PRIORITIES`, `EncoderConfig.cpu_priority`). While the encoder
encoded, the decoder got ~0.9 of its usual ~1.4 cores and its steps took twice as long, which
made the longest gaps between tokens. A higher nice value for the encoder did not help: under
Linux's EEVDF scheduler a waking thread still waits for the running one's slice, and a decode
step wakes its XLA threads thousands of times. `SCHED_IDLE` does help: a thread of a normal
policy that wakes preempts an idle-policy thread at once, so the encoder computes only on the
cycles the decoder leaves. The price is the encoder's speed while the decoder is busy: new
images wait longer for their embeddings (TTFT) and fewer sequences share each decode step.
Hence a choice, not a default.

All of it is unprivileged: any thread may move itself between the normal and batch policies,
or to the idle one. Threads started later inherit the policy of the thread that starts them.
"""

from __future__ import annotations

import os

CPU_PRIORITIES = ("normal", "idle")  # an encoder replica's, once warm
RELAY_CPU_POLICIES = ("batch", "normal")  # `splitserve serve --relay-cpu-policy`
_POLICIES = {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def policy_for_all_threads(name: str) -> int:
    """Puts every thread of this process under the policy `name` ("normal", "batch" or
    "idle"). Returns how many threads it set."""
    policy = _POLICIES[name]
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        count += 1
    return count


def restore_compute_policy() -> bool:
    """A compute replica's first step: a process that inherited the relay policy ("batch")
    from `splitserve serve` returns to the normal one. Any other policy was chosen by whoever
    started the process and stays. True if it changed anything."""
    if os.sched_getscheduler(0) != os.SCHED_BATCH:
        return False
    policy_for_all_threads("normal")
    return True
