"""A replica imports torch_xla and transformers' models without the modules serving never calls
(runtime/lean_imports.py), and everything still works, those modules included, when called."""

import json
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import json, sys
from runtime.device import xla_environment
import os
os.environ.update(xla_environment(os.environ))
from runtime.lean_imports import defer_unused_imports
deferred = defer_unused_imports()
import torch, torch_xla
from torch_xla.experimental.scan import scan
import transformers.modeling_utils
from transformers.loss.loss_for_object_detection import linear_sum_assignment

kinds = lambda: {name: type(sys.modules[name]).__name__ for name in deferred}
before = kinds()
x = torch.arange(6.0, device=torch_xla.device())
doubled = (x * 2).cpu().tolist()
# scan traces through AOT autograd: the first call imports the real functorch.compile
final, ys = scan(lambda carry, v: (carry + v, carry * v), torch.zeros((), device=x.device), x)
rows, cols = linear_sum_assignment([[4, 1], [2, 3]])  # imports the real scipy.optimize
print(json.dumps({"deferred": deferred, "before": before, "after": kinds(), "doubled": doubled,
                  "final": final.cpu().item(), "ys": ys.cpu().tolist(),
                  "assignment": [rows.tolist(), cols.tolist()],
                  "again": defer_unused_imports()}))
"""


def test_torch_xla_imports_lean_and_the_deferred_parts_still_work():
    child = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                           timeout=300, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["deferred"] == ["torch_xla.stablehlo", "functorch.compile", "scipy.optimize"]
    assert set(out["before"].values()) == {"Deferred"}
    assert out["doubled"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert out["final"] == 15.0 and out["ys"] == [0.0, 0.0, 2.0, 9.0, 24.0, 50.0]
    assert out["assignment"] == [[0, 1], [1, 0]]
    assert out["after"] == {"torch_xla.stablehlo": "Deferred", "functorch.compile": "module",
                            "scipy.optimize": "module"}
    assert out["again"] == []  # each is in sys.modules now, stand-in or real
