"""torch_xla's import without the parts a server never calls.

`import torch_xla` imports two things unconditionally that serving never uses: its StableHLO
exporter (`torch_xla.stablehlo`, which brings in torch._dynamo and torch._inductor through the
dynamo bridge) and, for the scan-based GRU it patches into `torch.nn`, AOT autograd
(`functorch.compile`). Together ~2.8 s of CPU per replica process, paid while the other
replica compiles beside it on the same cores.

`defer_unused_torch_xla_imports()` puts a stand-in for those two modules into `sys.modules`
before torch_xla is imported. torch_xla's `from X import f` then receives a forwarding function
for each name it takes; the real module is imported the first time anything is called through
one, or when any other attribute is read (so a later `import functorch.compile` elsewhere still
gets the real thing, only later). Nothing changes in behaviour, only in when the import happens.

>>> import types
>>> modules = {}
>>> stand_in = Deferred("json", ("dumps",), modules)
>>> modules["json"] is stand_in, stand_in.dumps([1])  # the first call imports the real module
(True, '[1]')
>>> modules["json"] is stand_in, modules["json"].loads("2")
(False, 2)
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterable

# module -> the names torch_xla 2.9's own import takes from it
UNUSED_BY_SERVING = {
    "torch_xla.stablehlo": ("save_as_stablehlo", "save_torch_model_as_stablehlo"),
    "functorch.compile": ("aot_function", "make_boxed_func", "default_partition"),
}


class Deferred(types.ModuleType):
    """A stand-in in `modules` for the module `name`, until something uses it."""

    def __init__(self, name: str, forwarded: Iterable[str], modules: dict) -> None:
        super().__init__(name, f"stand-in for {name}, imported on first use")
        self.__dict__["_modules"] = modules
        self.__dict__["_forwarded"] = frozenset(forwarded)
        modules[name] = self

    def _real(self) -> types.ModuleType:
        modules = self.__dict__["_modules"]
        if modules.get(self.__name__) is self:
            del modules[self.__name__]
        if modules is sys.modules:
            return importlib.import_module(self.__name__)
        modules[self.__name__] = real = importlib.import_module(self.__name__)
        return real

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # `inspect` and friends probe every module in sys.modules
            raise AttributeError(attr)
        if attr not in self.__dict__["_forwarded"]:
            return getattr(self._real(), attr)
        return _forwarding(self, attr)


def _forwarding(stand_in: Deferred, attr: str) -> Callable:
    def forward(*args, **kwargs):
        return getattr(stand_in._real(), attr)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = attr
    return forward


def defer_unused_torch_xla_imports(modules: dict | None = None) -> list[str]:
    """Stand-ins for UNUSED_BY_SERVING, when torch_xla is not imported yet; returns which."""
    modules = sys.modules if modules is None else modules
    if "torch_xla" in modules:
        return []
    deferred = [name for name in UNUSED_BY_SERVING if name not in modules]
    for name in deferred:
        Deferred(name, UNUSED_BY_SERVING[name], modules)
    return deferred
