"""Fail-fast start-up (issue 12): the wait loop `splitserve serve` runs, its probes, and the CLI
itself in a subprocess, for a deploy refused at build time and one whose replica cannot start."""

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.startup import Deploying, Readiness, health_probe, serve_status_probe, wait_until_ready
from tests.support import free_port

CAUSE = "encoder and decoder disagree on tokens_per_image: 197 vs 576"


def test_the_wait_ends_at_the_first_failure_with_its_cause():
    said = []
    outcome = wait_until_ready([lambda: Readiness("starting", "warming up"),
                                lambda: Readiness("failed", CAUSE)], threading.Event(), timeout_s=60,
                               poll_s=0.01, on_progress=said.append)
    assert outcome == Readiness("failed", CAUSE) and said == []


def test_a_deploy_stuck_warming_up_fails_after_the_bound():
    now = [0.0]

    def slow():
        now[0] += 10
        return Readiness("starting", "decoder: 1 replica has taken more than 30s to initialize")

    said = []
    outcome = wait_until_ready([slow], threading.Event(), timeout_s=60, poll_s=0,
                               on_progress=said.append, clock=lambda: now[0])
    assert outcome.state == "failed"
    assert outcome.detail.startswith("not ready after 60 s") and "to initialize" in outcome.detail
    assert len(said) == 1  # the same reason is told once


def test_ready_when_every_probe_is_ready_and_stopped_on_request():
    probes = [lambda: Readiness("ready"), lambda: Readiness("ready")]
    assert wait_until_ready(probes, threading.Event(), timeout_s=1).state == "ready"
    stop = threading.Event()
    stop.set()
    assert wait_until_ready([lambda: Readiness("starting")], stop, timeout_s=1).state == "stopped"


def test_deploying_reports_what_serve_run_raised():
    failing = Deploying(lambda: (_ for _ in ()).throw(RuntimeError("Deploying app 'x' failed")))
    ok = Deploying(lambda: None)
    deadline = time.monotonic() + 5
    while failing.probe().state == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failing.probe() == Readiness("failed", "RuntimeError: Deploying app 'x' failed")
    while ok.probe().state == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ok.probe().state == "ready"


@pytest.fixture(scope="module")
def health_server():
    """/ready: 200; /failed: the router's startup_failed 503; /starting: its unavailable 503;
    /proxy: Serve's proxy before the app exists (text)."""
    def error(kind, message):
        return {"error": {"message": message, "type": kind, "param": None, "code": 503}}

    routes = {"/ready": (200, {"status": "ok"}), "/failed": (503, error("startup_failed", CAUSE)),
              "/starting": (503, error("unavailable", "not ready: TimeoutError: "))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = routes.get(self.path, (404, None))
            data = json.dumps(body).encode() if body else b"Path '/health' not found."
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_health_probe_reads_the_routers_json(health_server):
    assert health_probe(f"{health_server}/ready")().state == "ready"
    assert health_probe(f"{health_server}/failed")() == Readiness("failed", CAUSE)
    assert health_probe(f"{health_server}/starting")().state == "starting"
    assert health_probe(f"{health_server}/proxy")().state == "starting"
    assert health_probe(f"http://127.0.0.1:{free_port()}/health")().state == "starting"


def _status(app_status, **deployments):
    return lambda: SimpleNamespace(applications={"splitserve": SimpleNamespace(
        status=app_status, message="", deployments={
            name: SimpleNamespace(status=status, message=message)
            for name, (status, message) in deployments.items()})})


def test_the_serve_status_probe_fails_at_the_first_replica_exception():
    first_failure = ("UPDATING", "A replica failed to start with exception. Retrying 2 more time(s). "
                                 "Error:\nValueError: size mismatch for linear_2.weight")
    probe = serve_status_probe("splitserve", _status("DEPLOYING", encoder=first_failure,
                                                     decoder=("UPDATING", "")))
    outcome = probe()
    assert outcome.state == "failed" and "'encoder'" in outcome.detail and "size mismatch" in outcome.detail
    slow = ("UPDATING", "Deployment 'decoder' has 1 replicas that have taken more than 30s to initialize.")
    assert serve_status_probe("splitserve", _status("DEPLOYING", decoder=slow))() == Readiness(
        "starting", f"decoder: {slow[1]}")
    assert serve_status_probe("splitserve", _status("RUNNING", decoder=("HEALTHY", "")))().state == "ready"
    assert serve_status_probe("splitserve", _status("DEPLOY_FAILED", decoder=("DEPLOY_FAILED", "boom")))(
        ).state == "failed"
    assert serve_status_probe("other", _status("RUNNING"))().state == "starting"


# --- the CLI, in a subprocess ---------------------------------------------------------------------

def _serve(model: Path, tmp_path: Path, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    import os

    cli = Path(sys.executable).parent / "splitserve"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    result = subprocess.run([str(cli), "serve", "--model", str(model), "--port", str(free_port()),
                             "--max-model-len", "256", "--max-num-seqs", "2"], env=env,
                            capture_output=True, text=True, timeout=timeout_s)
    return result, time.monotonic() - started


def test_serve_exits_at_once_when_the_processor_and_the_tower_disagree(tiny_checkpoint, tmp_path):
    model = tmp_path / "disagrees"
    shutil.copytree(tiny_checkpoint, model)
    settings = json.loads((model / "processor_config.json").read_text())
    settings["num_additional_image_tokens"] = 0  # 15 placeholders for a tower that yields 16
    (model / "processor_config.json").write_text(json.dumps(settings))
    result, seconds = _serve(model, tmp_path, timeout_s=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "expands <image> to 15 tokens but its vision tower yields 16" in result.stderr
    assert seconds < 30


def test_serve_exits_with_the_replica_exception_when_a_replica_cannot_start(tiny_checkpoint, tmp_path):
    """The encoder's weights do not fit its config: its constructor raises; the CLI exits with
    that exception instead of waiting (Serve alone would retry it first)."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "bad-projector"
    shutil.copytree(tiny_checkpoint, model)
    tensors = load_file(model / "model.safetensors")
    tensors["multi_modal_projector.linear_2.weight"] = torch.zeros(3, 3)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    result, seconds = _serve(model, tmp_path, timeout_s=240)
    print(f"splitserve serve exited {result.returncode} after {seconds:.1f} s")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the deploy failed" in result.stderr, result.stdout[-2000:] + result.stderr[-4000:]
    assert "size mismatch" in result.stderr, result.stderr[-4000:]
    assert seconds < 120  # Ray's start (~15 s) and one replica start, not Serve's retries


def test_warmup_progress_of_replicas_in_their_constructors():
    """Replicas publish (compiled, before serving, planned) under their app; the CLI's probe
    sums them per service, never gates readiness, and shows nothing once they are done."""
    from deploy.warmup_progress import Publisher, Store, probe

    kv: dict[str, bytes] = {}
    store = Store(put=kv.__setitem__, delete=lambda key: kv.pop(key, None),
                  list=lambda prefix: [key.encode() for key in kv if key.startswith(prefix)],
                  get=kv.get)
    encoders = [Publisher("app", "encoder", f"actor{i}", store) for i in range(2)]
    decoder = Publisher("app", "decoder", "actor9", store)
    Publisher("other-app", "decoder", "actor7", store)(0, 54, 54)  # another app's: not shown
    encoders[0](1, 1, 4)
    encoders[1](0, 1, 4)
    decoder(12, 54, 54)
    reading = probe("app", store)()
    assert reading == Readiness("ready", "compiling: decoder 12/54 graphs before serving (54 planned), "
                                         "encoder 1/2 graphs before serving (8 planned, 2 replicas)")
    said = []
    stop = threading.Event()
    starting = iter([Readiness("starting", "warming up: decoder"), Readiness("ready")])
    outcome = wait_until_ready([lambda: next(starting), probe("app", store)], stop, timeout_s=60,
                               poll_s=0.01, on_progress=said.append)
    assert outcome.state == "ready"
    assert said == [f"warming up: decoder; {reading.detail}"]
    for publisher in (*encoders, decoder):
        publisher.done()
    assert probe("app", store)() == Readiness("ready") and list(kv) == ["splitserve-warmup/other-app/decoder/actor7"]
