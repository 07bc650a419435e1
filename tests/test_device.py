import pytest
import torch

from runtime.device import open_device


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
