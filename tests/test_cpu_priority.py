"""runtime.cpu_priority: an encoder replica's threads, old and new, under SCHED_IDLE; the relay
policy that `splitserve serve` hands down to a local Ray, and the compute replicas leaving it;
the config and the CLI refuse other names."""

import os
import subprocess
import sys

import pytest

from encoder_service.config import EncoderConfig

CHILD = """
import os, threading
from runtime.cpu_priority import policy_for_all_threads
started = threading.Event(); stop = threading.Event()
def wait():
    started.set(); stop.wait()
before = threading.Thread(target=wait, daemon=True); before.start(); started.wait()
count = policy_for_all_threads("idle")
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


RELAY_CHILD = """
import os, subprocess, sys, threading
from runtime.cpu_priority import policy_for_all_threads, restore_compute_policy
policy_for_all_threads("batch")  # as `splitserve serve` does before it starts Ray
child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                       capture_output=True, text=True, check=True).stdout.strip()
started = threading.Event(); stop = threading.Event()
def wait():
    started.set(); stop.wait()
before = threading.Thread(target=wait, daemon=True); before.start(); started.wait()
restored = restore_compute_policy()  # as a compute replica does first
seen = {}
def later():
    seen["later"] = os.sched_getscheduler(0)
after = threading.Thread(target=later); after.start(); after.join()
policies = sorted({os.sched_getscheduler(0), os.sched_getscheduler(before.native_id), seen["later"]})
again = restore_compute_policy()
stop.set(); before.join()
print(child, restored, policies, again, os.SCHED_BATCH, os.SCHED_OTHER)
"""


def test_ray_processes_inherit_the_relay_policy_and_a_compute_replica_returns_to_normal():
    out = subprocess.run([sys.executable, "-c", RELAY_CHILD], capture_output=True, text=True,
                         check=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    child, restored, policies, again, batch, other = out
    assert child == batch  # a process started under the relay policy runs under it
    assert restored == "True" and policies == f"[{other}]"  # every thread, and later ones
    assert again == "False"  # already normal: nothing to do


def test_a_policy_the_replica_did_not_inherit_from_the_cli_stays():
    idle_child = ("import os\nfrom runtime.cpu_priority import policy_for_all_threads, "
                  "restore_compute_policy\npolicy_for_all_threads('idle')\n"
                  "print(restore_compute_policy(), os.sched_getscheduler(0) == os.SCHED_IDLE)")
    out = subprocess.run([sys.executable, "-c", idle_child], capture_output=True, text=True,
                         check=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.parametrize(("argv", "environ", "policy"), [
    ([], {"PJRT_DEVICE": "CPU"}, "batch"),  # XLA on this host's CPU
    ([], {"PJRT_DEVICE": "TPU"}, "normal"),  # the cores only feed the chips
    (["--device", "cpu"], {}, "batch"),
    (["--device", "cuda"], {}, "normal"),
    (["--address", "auto"], {"PJRT_DEVICE": "CPU"}, "normal"),  # a cluster keeps its own
    (["--relay-cpu-policy", "normal"], {"PJRT_DEVICE": "CPU"}, "normal"),
    (["--relay-cpu-policy", "batch", "--device", "cuda"], {}, "batch"),
])
def test_the_cli_chooses_the_relay_policy(argv, environ, policy):
    from deploy.cli import build_parser, relay_cpu_policy

    assert relay_cpu_policy(build_parser().parse_args(["serve", *argv]), environ) == policy
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--relay-cpu-policy", "idle"])
