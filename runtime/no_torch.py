"""Processes that only read a checkpoint's processor run without torch.

The router and the CLI read the checkpoint's processor (chat template, tokenizer, the image
processor's geometry) and never run a model. transformers imports torch whenever it is
installed, and with it torch._dynamo, and accelerate imports torch_xla: ~5.6 s of CPU and
hundreds of MB per router replica, paid while the encoder and decoder compile beside it. Without
torch, transformers' processors run on PIL and numpy (the same `...ImageProcessorPil` classes
it picks with torch present, for every LLaVA checkpoint tried here).

`without_torch()` makes `import torch` and `import torch_xla` fail in this process as if they
were not installed, so transformers takes its torch-free path. A module already imported stays
(a CLI that has just written the demo checkpoint keeps torch; torch_xla is still kept out).

>>> modules = {"numpy": object()}
>>> without_torch(modules), modules["torch"], modules["torch_xla"]
(True, None, None)
>>> without_torch({"torch": object()})
False
"""

from __future__ import annotations

import logging
import sys

BLOCKED = ("torch", "torch_xla")


def without_torch(modules: dict | None = None) -> bool:
    """Blocks the BLOCKED modules not imported yet in `modules` (default `sys.modules`); True if
    torch itself is now blocked. transformers' warning that it found no PyTorch is dropped:
    here that is the point."""
    modules = sys.modules if modules is None else modules
    for name in BLOCKED:
        modules.setdefault(name, None)  # None in sys.modules: the import raises ImportError
    if modules is sys.modules:
        logging.getLogger("transformers").addFilter(_NO_TORCH_WARNING)  # once: addFilter dedups
    return modules["torch"] is None


class _ExpectedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


_NO_TORCH_WARNING = _ExpectedWarning()
