"""The persistent-compilation-cache decision: the real smoke check on this backend (CPU
PJRT, which cannot reload executables), its recorded answer, directory resolution and
the per-replica directory locks."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from runtime.compile_cache import (
    SmokeCheckError,
    SmokeResult,
    cache_root,
    claim_replica_dir,
    enable_persistent_cache,
)


class FakeSmoke:
    def __init__(self, result: SmokeResult | Exception) -> None:
        self.result = result
        self.calls = 0

    def __call__(self, env):
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_cpu_backend_is_off_by_a_real_smoke_check_then_by_its_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("XLA_PERSISTENT_CACHE_PATH", raising=False)
    decision = enable_persistent_cache(tmp_path, "decoder", device_kind="xla")
    assert not decision.enabled and decision.directory is None
    assert "this backend (CPU) cannot reload executables" in decision.reason
    assert "measured by a smoke check" in decision.reason
    assert "PersistentCacheDeserializeFailure=1" in decision.reason  # what torch_xla 2.9 reports

    [marker] = tmp_path.glob("smoke-torch_xla-*-CPU.json")
    record = json.loads(marker.read_text())
    assert record["reloads"] is False and record["pjrt_device"] == "CPU"
    mtime = marker.stat().st_mtime_ns

    # A later start reads the record: no subprocess, same answer, file untouched.
    never = FakeSmoke(AssertionError("the recorded answer should have been used"))
    again = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=never)
    assert never.calls == 0 and not again.enabled
    assert "this backend (CPU) cannot reload executables" in again.reason
    assert str(marker) in again.reason
    assert marker.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [marker.name]  # no replica directory when off


def test_record_is_keyed_by_pjrt_device(tmp_path, monkeypatch):
    smoke = FakeSmoke(SmokeResult(reloads=False, detail="fake"))
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=smoke)
    enable_persistent_cache(tmp_path, "encoder", device_kind="xla", smoke_check=smoke)
    assert smoke.calls == 1
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    decision = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=smoke)
    assert smoke.calls == 2 and "this backend (TPU)" in decision.reason
    assert len(list(tmp_path.glob("smoke-*.json"))) == 2


def test_failed_smoke_check_is_off_and_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    failing = FakeSmoke(SmokeCheckError("a smoke run exited with 1: boom"))
    decision = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=failing)
    assert not decision.enabled and "could not run" in decision.reason and "boom" in decision.reason
    assert not list(tmp_path.glob("smoke-*.json"))
    working = FakeSmoke(SmokeResult(reloads=False, detail="fake"))
    enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=working)
    assert working.calls == 1  # the next start measures again


def fake_torch_xla(monkeypatch, *, compiled: bool) -> list:
    """Stands in for torch_xla (importing the real one costs seconds): records initialize_cache."""
    calls = []
    package, runtime = types.ModuleType("torch_xla"), types.ModuleType("torch_xla.runtime")
    package._XLAC = types.SimpleNamespace(_xla_computation_cache_is_initialized=lambda: compiled)
    package.runtime = runtime
    runtime.initialize_cache = lambda path, readonly: calls.append((path, readonly))
    monkeypatch.setitem(sys.modules, "torch_xla", package)
    monkeypatch.setitem(sys.modules, "torch_xla.runtime", runtime)
    return calls


def test_reloading_backend_turns_the_cache_on_in_a_replica_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("XLA_PERSISTENT_CACHE_PATH", raising=False)
    calls = fake_torch_xla(monkeypatch, compiled=False)
    smoke = FakeSmoke(SmokeResult(reloads=True, detail="fake hit"))

    decision = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=smoke)
    assert decision.enabled and decision.directory == tmp_path / "decoder-0"
    assert decision.directory.is_dir() and "reloads executables" in decision.reason
    assert calls == [(str(tmp_path / "decoder-0"), False)]


def test_turning_the_cache_on_after_a_compilation_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("XLA_PERSISTENT_CACHE_PATH", raising=False)
    calls = fake_torch_xla(monkeypatch, compiled=True)
    smoke = FakeSmoke(SmokeResult(reloads=True, detail="fake hit"))
    with pytest.raises(RuntimeError, match="before anything in the process compiles"):
        enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=smoke)
    assert calls == []


def test_non_xla_device_is_a_no_op(tmp_path):
    smoke = FakeSmoke(SmokeResult(reloads=True, detail="fake"))
    decision = enable_persistent_cache(tmp_path / "root", "decoder", device_kind="cpu", smoke_check=smoke)
    assert not decision.enabled and "'cpu'" in decision.reason
    assert smoke.calls == 0 and not (tmp_path / "root").exists()


def test_users_own_cache_path_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_PERSISTENT_CACHE_PATH", str(tmp_path / "mine"))
    smoke = FakeSmoke(SmokeResult(reloads=False, detail="fake"))
    decision = enable_persistent_cache(None, "decoder", device_kind="xla", smoke_check=smoke)
    assert decision.enabled and decision.directory == tmp_path / "mine" and smoke.calls == 0


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(tmp_path / "explicit", {"XDG_CACHE_HOME": "/xdg"}) == tmp_path / "explicit"
    assert cache_root("~/mine", {}) == tmp_path / "home" / "mine"
    assert cache_root(None, {"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/splitserve/xla")
    default = tmp_path / "home" / ".cache" / "splitserve" / "xla"
    assert cache_root(None, {}) == default
    assert cache_root(None, {"XDG_CACHE_HOME": "relative"}) == default  # the XDG spec: ignore it


def test_concurrent_claims_get_different_directories(tmp_path):
    first = claim_replica_dir(tmp_path, "decoder")
    second = claim_replica_dir(tmp_path, "decoder")
    other = claim_replica_dir(tmp_path, "SERVE_REPLICA::app#encoder")
    assert (first.name, second.name) == ("decoder-0", "decoder-1")
    assert other.name == "SERVE_REPLICA__app_encoder-0" and other.parent == tmp_path


def test_slot_held_by_a_live_process_is_skipped_then_reused_after_it_exits(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path / "decoder-0.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert claim_replica_dir(tmp_path, "decoder").name == "decoder-1"
    finally:
        holder.communicate("", timeout=30)
    # The holder is gone (a restart): its directory is free again, executables and all.
    assert claim_replica_dir(tmp_path, "decoder").name == "decoder-0"


def test_a_deferred_check_does_not_hold_up_the_start_then_a_recorded_answer_is_used(
        tmp_path, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("XLA_PERSISTENT_CACHE_PATH", raising=False)
    never = FakeSmoke(AssertionError("a deferred start must not run the smoke check"))
    decision = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=never,
                                       defer_check=True)
    assert not decision.enabled and decision.check_pending and never.calls == 0
    assert not list(tmp_path.glob("smoke-*.json"))
    # Once an answer is recorded (here: by a check that says it reloads), deferring changes nothing.
    enable_persistent_cache(tmp_path, "decoder", device_kind="xla",
                            smoke_check=FakeSmoke(SmokeResult(False, "measured")))
    later = enable_persistent_cache(tmp_path, "decoder", device_kind="xla", smoke_check=never,
                                    defer_check=True)
    assert not later.check_pending and "cannot reload" in later.reason and never.calls == 0
