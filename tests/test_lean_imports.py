"""A replica imports torch_xla without its StableHLO exporter and AOT autograd
(runtime/lean_imports.py), and torch_xla still works, those parts included, when called."""

import json
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import json, sys
from runtime.device import xla_environment
import os
os.environ.update(xla_environment(os.environ))
from runtime.lean_imports import defer_unused_torch_xla_imports
deferred = defer_unused_torch_xla_imports()
import torch, torch_xla
from torch_xla.experimental.scan import scan

kinds = lambda: {name: type(sys.modules[name]).__name__ for name in deferred}
before = kinds()
x = torch.arange(6.0, device=torch_xla.device())
doubled = (x * 2).cpu().tolist()
# scan traces through AOT autograd: the first call imports the real functorch.compile
final, ys = scan(lambda carry, v: (carry + v, carry * v), torch.zeros((), device=x.device), x)
print(json.dumps({"deferred": deferred, "before": before, "after": kinds(), "doubled": doubled,
                  "final": final.cpu().item(), "ys": ys.cpu().tolist(),
                  "again": defer_unused_torch_xla_imports()}))
"""


def test_torch_xla_imports_lean_and_the_deferred_parts_still_work():
    child = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                           timeout=300, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["deferred"] == ["torch_xla.stablehlo", "functorch.compile"]
    assert out["before"] == {"torch_xla.stablehlo": "Deferred", "functorch.compile": "Deferred"}
    assert out["doubled"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert out["final"] == 15.0 and out["ys"] == [0.0, 0.0, 2.0, 9.0, 24.0, 50.0]
    assert out["after"] == {"torch_xla.stablehlo": "Deferred", "functorch.compile": "module"}
    assert out["again"] == []  # torch_xla is imported: nothing to defer any more
