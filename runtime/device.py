"""Device selection: `xla` (default), `cpu` or `cuda`, behind one small handle.

`xla` means torch_xla through PJRT: TPU chips when the host has them, otherwise
the CPU backend (`PJRT_DEVICE=CPU`), which runs the same lazy-tensor/compile path
as a TPU and is how the test suite runs. `cpu` and `cuda` run the same model code
eagerly. PJRT reads `PJRT_DEVICE` once, when torch_xla starts, so `open_device`
must run before anything else touches torch_xla in the process.

On the CPU backend, XLA hands mid-sized matmuls (tens to hundreds of rows, the
prefill and vision-tower shapes) to XNNPACK, which runs them on one thread:
~33 GFLOP/s on the 2-core development machine against ~130 through XLA's own
multi-threaded Eigen path. `xla_environment` turns XNNPACK off unless the user's
`XLA_FLAGS` already decide it. TPUs are unaffected.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_KINDS = ("xla", "cpu", "cuda")
CPU_XLA_FLAGS = ("--xla_cpu_use_xnnpack=false",)  # see the module docstring


def detect_pjrt_device() -> str:
    """PJRT backend for this host: TPU when TPU chips are visible, else CPU."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "TPU"
    return "CPU"


def xla_environment(environ: dict[str, str]) -> dict[str, str]:
    """The PJRT/XLA variables a process needs before torch_xla starts.

    Reads `environ` (and, when it names no PJRT device, looks for TPU chips) and
    returns the variables to set; values the user already chose win. Used by
    `open_device`, and by the test suite before anything starts torch_xla.
    """
    pjrt = environ.get("PJRT_DEVICE") or detect_pjrt_device()
    out = {"PJRT_DEVICE": pjrt}
    if pjrt == "CPU":
        flags = environ.get("XLA_FLAGS", "")
        extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
        if extra:
            out["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return out


def computes_on_host(kind: str, environ) -> bool:
    """A device of `kind` runs its graphs on the host's CPUs (eager `cpu`, or XLA's CPU
    backend as `environ` names it), which the replicas beside it share."""
    return kind == "cpu" or (kind == "xla" and environ.get("PJRT_DEVICE") == "CPU")


@dataclass(frozen=True)
class Device:
    kind: str
    torch_device: torch.device

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    @property
    def computes_on_host(self) -> bool:
        """Its graphs run on the host's CPUs (`computes_on_host`)."""
        return computes_on_host(self.kind, os.environ)

    def sync(self) -> None:
        """Cuts the lazy graph and runs it (xla); waits for queued kernels (cuda)."""
        if self.kind == "xla":
            import torch_xla

            torch_xla.sync()
        elif self.kind == "cuda":
            import torch

            torch.cuda.synchronize(self.torch_device)

    def compile_only(self, outputs: list[torch.Tensor]) -> None:
        """xla: compiles the pending graph that computes `outputs` without running it; its
        executable is the one `read_stateless` then finds. Eager devices have computed them."""
        if self.kind == "xla":
            import torch_xla

            torch_xla._XLAC._xla_warm_up_cache(outputs, [])

    def read_stateless(self, output: torch.Tensor) -> torch.Tensor:
        """Runs the graph that computes `output` and copies the result to the host.

        For graphs that change no device state (the vision encoder's): nothing else pending
        is run. torch_xla keys an executable by whether its run is a step barrier: `sync()`
        and `.cpu()` are (and may donate buffers), a warm-up compile is not. This read is not
        either, so a graph compiled by `compile_only` runs here without compiling again, and
        warm-up need not execute it (a full batch of images through the vision tower)."""
        if self.kind == "xla":
            import torch_xla

            return torch_xla._XLAC._xla_get_cpu_tensors([output])[0]
        return output.cpu()

    def describe(self) -> str:
        if self.kind == "xla":
            return f"xla ({os.environ.get('PJRT_DEVICE', '?')} through PJRT)"
        return self.kind


def open_device(kind: str = "xla") -> Device:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device must be one of {', '.join(DEVICE_KINDS)}; got {kind!r}")
    import torch  # here, not at import: the driver reads this module's environment helpers

    if kind == "cpu":
        return Device("cpu", torch.device("cpu"))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
        return Device("cuda", torch.device("cuda"))
    os.environ.update(xla_environment(os.environ))
    import torch_xla

    return Device("xla", torch_xla.device())
