"""A replica's imports without the parts serving never calls.

Importing torch_xla and transformers' model classes pulls in modules a server never uses:
- `torch_xla.stablehlo`, the StableHLO exporter, which brings in torch._inductor through the
  dynamo bridge, and `functorch.compile` (AOT autograd) for the scan-based GRU torch_xla
  patches into `torch.nn`: both imported by `torch_xla/__init__`;
- `scipy.optimize`, which transformers' object-detection losses import with `modeling_utils`.
Together ~3 s of CPU per replica process, paid while the other replica compiles
beside it on the same cores.

`defer_unused_imports()` puts a stand-in (`Deferred`) for each into `sys.modules` first. A
`from X import f` of a listed name receives a forwarding function. The real module is imported
the first time anything is called through a forwarder or any other attribute is read, so code
that does use it still gets it, only later: behaviour is unchanged, only when the import
happens moves. (torch._dynamo, which torch_xla also imports, is not deferred: transformers'
generation code imports it at class definition, `torch.compiler.disable`.)

>>> modules = {}
>>> stand_in = Deferred("json", modules, forwarded=("dumps",))
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

# module -> the names its importers take from it with `from ... import`
UNUSED_BY_SERVING: dict[str, tuple[str, ...]] = {
    "torch_xla.stablehlo": ("save_as_stablehlo", "save_torch_model_as_stablehlo"),
    "functorch.compile": ("aot_function", "make_boxed_func", "default_partition"),
    "scipy.optimize": ("linear_sum_assignment",),
}


class Deferred(types.ModuleType):
    """A stand-in in `modules` for the module `name`, until something uses it."""

    def __init__(self, name: str, modules: dict, forwarded: Iterable[str] = ()) -> None:
        super().__init__(name, f"stand-in for {name}, imported on first use")
        self.__dict__.update(_modules=modules, _forwarded=frozenset(forwarded))
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
        if attr in self.__dict__["_forwarded"]:
            return _forwarding(self, attr)
        return getattr(self._real(), attr)


def _forwarding(stand_in: Deferred, attr: str) -> Callable:
    def forward(*args, **kwargs):
        return getattr(stand_in._real(), attr)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = attr
    return forward


def defer_unused_imports(modules: dict | None = None) -> list[str]:
    """Stand-ins for the UNUSED_BY_SERVING modules not imported yet; returns their names."""
    modules = sys.modules if modules is None else modules
    deferred = [name for name in UNUSED_BY_SERVING if name not in modules]
    for name in deferred:
        Deferred(name, modules, UNUSED_BY_SERVING[name])
    return deferred
