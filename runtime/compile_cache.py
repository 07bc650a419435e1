"""torch_xla's persistent compilation cache, turned on only where executables reload.

`enable_persistent_cache` is called once per replica process, first thing, before
anything in the process compiles (torch_xla reads the cache settings when its
computation cache starts, at the first compilation). It decides, then logs one line:

- Does this backend reload executables? torch_xla 2.9 writes executables on every
  backend but cannot read them back on the CPU client nor on TPU ("Failed to
  deserialize executable: UNIMPLEMENTED", pytorch/xla #9094). A smoke check answers
  it: one subprocess compiles a toy graph into an empty cache, a second one runs the
  same graph and reports torch_xla's counters (`PersistentCacheHit`,
  `PersistentCacheDeserializeFailure`, the `CompileTime` count). The answer is kept in
  `<root>/smoke-torch_xla-<version>-<PJRT device>.json`, so only the first start after
  an upgrade pays for it (two interpreter start-ups with torch_xla: 15-40 s on a busy
  2-core machine). With `defer_check=True` (what the replicas use) a start that finds
  no recorded answer does not wait for it: the cache stays off for this start and
  `record_smoke_check_in_background` measures it once the replica serves, for the next.
- Which directory? `<root>/<replica_name>-<slot>`: torch_xla wants one directory per
  process at a time, and a restarted replica should find its executables again. A
  process holds `<root>/<replica_name>-<slot>.lock` (flock) until it exits and takes the
  lowest free slot, so concurrent replicas of one deployment get different directories
  and a restart reuses one. A lock dies with its process: no stale locks.

The root is `directory` when given, else `$XDG_CACHE_HOME/splitserve/xla`, else
`~/.cache/splitserve/xla`. Nothing here is shared between calls except files; the only
thread is the deferred smoke check's.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from runtime.device import xla_environment

log = logging.getLogger(__name__)

SMOKE_TIMEOUT_S = 300.0  # per subprocess; a TPU host can take a while to open its chips
_CACHE_VARIABLES = ("XLA_PERSISTENT_CACHE_PATH", "XLA_PERSISTENT_CACHE_READ_ONLY")

# Runs in a fresh interpreter; prints one line "SMOKE {json}" with torch_xla's counters.
_SMOKE_SCRIPT = """
import json, sys
import torch, torch_xla, torch_xla.runtime as xr, torch_xla.debug.metrics as met
xr.initialize_cache(sys.argv[1], readonly=False)
x = torch.arange(8.0, device=torch_xla.device())
(x * 2 + 1).sum().cpu()
names = ("PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure")
counters = {name: met.counter_value(name) or 0 for name in names}
counters["compilations"] = (met.metric_data("CompileTime") or [0])[0]
print("SMOKE " + json.dumps(counters), flush=True)
"""


@dataclass(frozen=True)
class CacheDecision:
    enabled: bool
    reason: str  # the line that was logged
    directory: Path | None = None  # this process's cache directory, when enabled
    check_pending: bool = False  # no answer recorded yet and the check was deferred


@dataclass(frozen=True)
class SmokeResult:
    reloads: bool
    detail: str  # what was measured, for the log line


class SmokeCheckError(RuntimeError):
    """The smoke check could not run (a subprocess failed or timed out); nothing is recorded."""


def cache_root(directory: str | Path | None, environ: Mapping[str, str]) -> Path:
    """`directory`, else `$XDG_CACHE_HOME/splitserve/xla`, else `~/.cache/splitserve/xla`.
    A relative XDG_CACHE_HOME is ignored, as the XDG spec asks."""
    if directory is not None and str(directory) != "":
        return Path(directory).expanduser()
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "splitserve" / "xla"


def claim_replica_dir(root: Path, replica_name: str) -> Path:
    """Locks and returns the lowest free `<root>/<replica_name>-<slot>` (created if new).

    The lock is an flock on an fd left open on purpose: it is held until the process
    exits, whatever happens to Python objects. Two claims in one process also get
    different slots (flock locks belong to the open file, not to the process)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", replica_name) or "replica"
    root.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        fd = os.open(root / f"{name}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking; the flock decides
        directory = root / f"{name}-{slot}"
        directory.mkdir(exist_ok=True)
        return directory
    raise AssertionError("unreachable")


def run_smoke_check(env: Mapping[str, str], *, timeout_s: float = SMOKE_TIMEOUT_S) -> SmokeResult:
    """Two fresh interpreters (this Python, `env`) share an empty cache: the first compiles a
    toy graph into it, the second must load that graph without compiling."""
    child_env = {k: v for k, v in env.items() if k not in _CACHE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="splitserve-xla-smoke-") as scratch:
        first = _run_smoke_process(scratch, child_env, timeout_s)
        written = len(os.listdir(scratch))
        if first["compilations"] < 1 or written == 0:
            raise SmokeCheckError(f"the first smoke run wrote no executable ({first})")
        second = _run_smoke_process(scratch, child_env, timeout_s)
    reloads = (second["PersistentCacheHit"] >= 1 and second["compilations"] == 0
               and second["PersistentCacheDeserializeFailure"] == 0)
    detail = (f"second run: PersistentCacheHit={second['PersistentCacheHit']}, "
              f"PersistentCacheDeserializeFailure={second['PersistentCacheDeserializeFailure']}, "
              f"compilations={second['compilations']}")
    return SmokeResult(reloads=reloads, detail=detail)


def _run_smoke_process(cache_dir: str, env: Mapping[str, str], timeout_s: float) -> dict[str, int]:
    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE_SCRIPT, cache_dir], env=dict(env),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise SmokeCheckError(f"a smoke run took over {timeout_s:.0f} s") from error
    for line in done.stdout.splitlines():
        if line.startswith("SMOKE "):
            return {k: int(v) for k, v in json.loads(line[len("SMOKE "):]).items()}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise SmokeCheckError(f"a smoke run exited with {done.returncode}: {tail}")


def enable_persistent_cache(
    directory: str | Path | None,
    replica_name: str,
    *,
    device_kind: str,
    smoke_check: Callable[[Mapping[str, str]], SmokeResult] = run_smoke_check,
    defer_check: bool = False,
) -> CacheDecision:
    """Turns torch_xla's persistent compilation cache on for this process where the backend
    reloads executables, and logs one line saying what was decided and why.

    Call it once per replica process, before anything in the process compiles (before
    `open_device` and any model code; in the colocated layout, once for both services):
    torch_xla takes the setting at its first compilation, and a call after that raises
    `RuntimeError` when the cache would be turned on. `directory` is the cache root (None:
    the XDG default); `replica_name` names the replicas that may share executables (the
    deployment name, e.g. "decoder", not Serve's per-replica id); `device_kind` is the
    `--device` choice: anything but "xla" is a no-op. A user's own
    `XLA_PERSISTENT_CACHE_PATH` wins. `smoke_check` is injectable for tests.
    """
    if device_kind != "xla":
        return _decided(False, f"persistent XLA compilation cache off: device {device_kind!r} "
                               "does not compile through XLA")
    if os.environ.get("XLA_PERSISTENT_CACHE_PATH"):
        path = Path(os.environ["XLA_PERSISTENT_CACHE_PATH"])
        return _decided(True, f"persistent XLA compilation cache on at {path} "
                              "(XLA_PERSISTENT_CACHE_PATH was already set)", path)
    try:
        version = metadata.version("torch_xla")
    except metadata.PackageNotFoundError:
        return _decided(False, "persistent XLA compilation cache off: torch_xla is not installed")
    env = {**os.environ, **xla_environment(os.environ)}
    pjrt = env["PJRT_DEVICE"]
    root = cache_root(directory, os.environ)
    if defer_check and _recorded(_marker(root, version, pjrt)) is None:
        log.info("persistent XLA compilation cache off for this start: whether this backend (%s) "
                 "reloads executables is not known yet; measured once the replica serves", pjrt)
        return CacheDecision(False, "not known yet", check_pending=True)
    try:
        result, how = _backend_reloads(root, version, pjrt, env, smoke_check)
    except SmokeCheckError as error:
        return _decided(False, f"persistent XLA compilation cache off: the smoke check on this "
                               f"backend ({pjrt}) could not run: {error}")
    if not result.reloads:
        return _decided(False, f"persistent XLA compilation cache off: this backend ({pjrt}) cannot "
                               f"reload executables (torch_xla {version}, {how}: {result.detail})")
    import torch_xla
    import torch_xla.runtime as xr

    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        raise RuntimeError("enable_persistent_cache must run before anything in the process "
                           "compiles: torch_xla's computation cache has already started")
    path = claim_replica_dir(root, replica_name)
    xr.initialize_cache(str(path), readonly=False)
    return _decided(True, f"persistent XLA compilation cache on at {path} (this backend ({pjrt}) "
                          f"reloads executables: torch_xla {version}, {how})", path)


def _backend_reloads(root: Path, version: str, pjrt: str, env: Mapping[str, str],
                     smoke_check: Callable[[Mapping[str, str]], SmokeResult]) -> tuple[SmokeResult, str]:
    """The recorded answer for (torch_xla version, PJRT device), else a fresh smoke check
    (recorded). Returns the result and how it was obtained, for the log line."""
    marker = _marker(root, version, pjrt)
    recorded = _recorded(marker)
    if recorded is not None:
        return recorded
    started = time.perf_counter()
    result = smoke_check(env)
    smoke_s = time.perf_counter() - started
    root.mkdir(parents=True, exist_ok=True)
    record = {"torch_xla": version, "pjrt_device": pjrt, "reloads": result.reloads,
              "detail": result.detail, "smoke_s": round(smoke_s, 1),
              "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    partial = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, marker)  # replicas starting together each write a whole file
    return result, f"measured by a smoke check in {smoke_s:.1f} s"


def _marker(root: Path, version: str, pjrt: str) -> Path:
    return root / re.sub(r"[^A-Za-z0-9_.-]", "_", f"smoke-torch_xla-{version}-{pjrt}.json")


def _recorded(marker: Path) -> tuple[SmokeResult, str] | None:
    """The answer recorded in `marker`, or None when absent or unreadable (measure again)."""
    try:
        recorded = json.loads(marker.read_text())
        return (SmokeResult(bool(recorded["reloads"]), str(recorded["detail"])),
                f"smoke check of {recorded['checked_at']} recorded in {marker}")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_smoke_check_in_background(directory: str | Path | None) -> threading.Thread:
    """Runs the smoke check on a daemon thread and records its answer for the next start
    (after a deferred `enable_persistent_cache`, once the replica serves)."""
    version = metadata.version("torch_xla")
    env = {**os.environ, **xla_environment(os.environ)}
    root = cache_root(directory, os.environ)

    def measure() -> None:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "smoke.lock", "w") as lock:
            try:  # replicas starting together: one of them measures, the others need not
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            try:
                result, how = _backend_reloads(root, version, env["PJRT_DEVICE"], env, run_smoke_check)
                log.info("persistent XLA compilation cache: %s (%s); the next start uses that",
                         "this backend reloads executables" if result.reloads else
                         "this backend cannot reload executables", how)
            except SmokeCheckError as error:
                log.warning("persistent XLA compilation cache: the smoke check could not run: %s", error)

    thread = threading.Thread(target=measure, name="xla-cache-smoke-check", daemon=True)
    thread.start()
    return thread


def _decided(enabled: bool, reason: str, directory: Path | None = None) -> CacheDecision:
    log.info(reason)
    return CacheDecision(enabled=enabled, reason=reason, directory=directory)
