"""runtime.cpu_priority: an encoder replica's threads, old and new, under SCHED_IDLE; the config
and the CLI refuse other names."""

import os
import subprocess
import sys

import pytest

from encoder_service.config import EncoderConfig

CHILD = """
import os, threading
from runtime.cpu_priority import idle_policy_for_all_threads
started = threading.Event(); stop = threading.Event()
def wait():
    started.set(); stop.wait()
before = threading.Thread(target=wait, daemon=True); before.start(); started.wait()
count = idle_policy_for_all_threads()
seen = {}
def later():
    seen["later"] = os.sched_getscheduler(0)
after = threading.Thread(target=later); after.start(); after.join()
policies = {os.sched_getscheduler(0), os.sched_getscheduler(before.native_id)}
stop.set(); before.join()
print(count, sorted(policies), seen["later"], os.SCHED_IDLE)
"""


def test_every_thread_and_every_later_one_runs_under_sched_idle():
    # In a child process: the suite's own threads keep their policy.
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    count, policies, later, idle = int(out[0]), out[1], int(out[2]), int(out[3])
    assert count >= 2  # the main thread and the one started before
    assert policies == f"[{idle}]" and later == idle  # both, and the one started after
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


def test_the_config_names_its_choices():
    assert EncoderConfig(model="m").cpu_priority == "normal"
    assert EncoderConfig(model="m", cpu_priority="idle").cpu_priority == "idle"
    with pytest.raises(ValueError, match="cpu_priority must be one of normal, idle; got 'low'"):
        EncoderConfig(model="m", cpu_priority="low")
