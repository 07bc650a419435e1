import os

import pytest
import torch

from runtime.device import Device, open_device, xla_environment


def test_xla_runs_on_pjrt_and_matches_eager():
    device = open_device("xla")
    assert device.torch_device.type == "xla"
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    y = (x.to(device.torch_device) @ x.T.to(device.torch_device)).cpu()
    torch.testing.assert_close(y, x @ x.T)


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of xla, cpu, cuda; got 'tpu'"):
        open_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        open_device("cuda")


def test_a_device_knows_whether_it_computes_on_the_hosts_cpus(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert Device("xla", torch.device("cpu")).computes_on_host
    assert Device("cpu", torch.device("cpu")).computes_on_host
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert not Device("xla", torch.device("cpu")).computes_on_host
    assert not Device("cuda", torch.device("cpu")).computes_on_host


def test_cpu_backend_turns_off_single_threaded_xnnpack_dots():
    env = xla_environment({"PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert env == {"PJRT_DEVICE": "CPU",
                   "XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_cpu_use_xnnpack=false"}
    assert xla_environment({"PJRT_DEVICE": "CPU"})["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=false"


def test_users_xla_flags_win_and_tpus_are_left_alone():
    assert xla_environment({"PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}) == {
        "PJRT_DEVICE": "CPU"}
    assert xla_environment({"PJRT_DEVICE": "TPU", "XLA_FLAGS": "--foo"}) == {"PJRT_DEVICE": "TPU"}


def test_this_process_runs_xla_with_the_cpu_flags():
    open_device("xla")
    assert "--xla_cpu_use_xnnpack=false" in os.environ["XLA_FLAGS"].split()
