"""Waiting for a deploy to turn healthy, and failing fast when it cannot.

`splitserve serve` deploys, then calls `wait_until_ready` with a few probes, each a
function that answers `Readiness` ("ready", "starting" or "failed", plus why):

- `Deploying.probe`: `serve.run` itself, run on a thread (it returns once every
  replica has finished its constructor, warm-up included, and raises when the
  deploy fails);
- `serve_status_probe`: Serve's own status; a deployment that failed, turned
  unhealthy, or whose replica raised in its constructor is a failure at once (Serve
  would retry it a few times first: a start-up that failed once is reported now);
- `health_probe`: the router's `/health`: 200 is ready; a JSON 503 of type
  `startup_failed` (the deployments disagree, the router cannot build) a failure.

The wait ends at the first failure, when every probe is ready, when `stop` is set,
or after `timeout_s`, which counts a replica stuck warming up as a failure.

`wait_healthy(url, ...)` is the same wait for anything with a `/health` (a splitserve
app, `transformers serve`, vLLM; optionally the process serving it): the one readiness
poller of the CLI, the tests, the cluster harness and the benchmarks.

Threads: the caller's thread polls; `Deploying` runs `serve.run` on its own daemon thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Readiness:
    state: Literal["ready", "starting", "failed", "stopped"]
    detail: str = ""  # why not ready, or what failed


READY = Readiness("ready")
Probe = Callable[[], Readiness]


def wait_until_ready(probes: list[Probe], stop: threading.Event, timeout_s: float, *,
                     poll_s: float = 0.5, on_progress: Callable[[str], None] = lambda line: None,
                     clock: Callable[[], float] = time.monotonic) -> Readiness:
    """Polls every probe each `poll_s` until all are ready or one fails; tells `on_progress`
    each new reason for waiting."""
    deadline = clock() + timeout_s
    told = ""
    while not stop.is_set():
        readings = [probe() for probe in probes]
        failed = [r.detail for r in readings if r.state == "failed"]
        if failed:
            return Readiness("failed", "; ".join(failed))
        if all(r.state == "ready" for r in readings):
            return READY
        # A ready probe may still say something (the warm-up progress probe always does).
        waiting = "; ".join(" ".join(r.detail.split()) for r in readings if r.detail)  # one line
        if clock() > deadline:
            return Readiness("failed", f"not ready after {timeout_s:.0f} s (the start-up bound): "
                                       f"{waiting or 'still starting'}")
        if waiting and waiting != told:
            on_progress(waiting)
            told = waiting
        stop.wait(poll_s)
    return Readiness("stopped")


class Deploying:
    """Runs `deploy` (a blocking `serve.run`) on a daemon thread; `probe` reports its outcome."""

    def __init__(self, deploy: Callable[[], object]) -> None:
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(deploy,), name="splitserve-deploy",
                                        daemon=True)
        self._thread.start()

    def _run(self, deploy: Callable[[], object]) -> None:
        try:
            deploy()
        except BaseException as error:  # noqa: BLE001: reported by probe()
            self._error = error
        finally:
            self._done.set()

    def probe(self) -> Readiness:
        if self._error is not None:
            return Readiness("failed", f"{type(self._error).__name__}: {self._error}")
        return READY if self._done.is_set() else Readiness("starting")


def health_probe(url: str, timeout_s: float = 5.0) -> Probe:
    import httpx

    # One client for every poll: a new one loads the CA certificates each time (~25 ms of
    # CPU, every half second, taken from the replicas warming up beside it).
    client = httpx.Client(timeout=timeout_s)

    def probe() -> Readiness:
        try:
            reply = client.get(url)
        except httpx.HTTPError as error:
            return Readiness("starting", f"{url}: {type(error).__name__}")
        if reply.status_code == 200:
            return READY
        try:
            error = reply.json()["error"]
        except (ValueError, KeyError, TypeError):
            return Readiness("starting")  # the proxy answers before the router exists
        state = "failed" if error.get("type") == "startup_failed" else "starting"
        return Readiness(state, str(error.get("message", "")))

    return probe


def process_probe(process, name: str = "the server") -> Probe:
    """Fails once `process` (a `subprocess.Popen`) has exited."""

    def probe() -> Readiness:
        code = process.poll()
        return READY if code is None else Readiness("failed", f"{name} exited with {code}")

    return probe


def wait_healthy(url: str, timeout_s: float, *, process=None, poll_s: float = 0.5,
                 request_timeout_s: float = 5.0) -> float:
    """Polls `url` (a `/health`) until it answers 200; returns the seconds waited. Raises
    TimeoutError after `timeout_s`, RuntimeError when `process` exits first or the app reports
    that it cannot start (`startup_failed`)."""
    probes = [health_probe(url, request_timeout_s)]
    if process is not None:
        probes.append(process_probe(process))
    started = time.monotonic()
    outcome = wait_until_ready(probes, threading.Event(), timeout_s, poll_s=poll_s)
    if outcome.state == "ready":
        return time.monotonic() - started
    if time.monotonic() - started >= timeout_s:
        raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s: {outcome.detail}")
    raise RuntimeError(f"{url} will not turn healthy: {outcome.detail}")


FAILED_STATUSES = ("DEPLOY_FAILED", "UNHEALTHY")


def serve_status_probe(app: str, status: Callable[[], object] | None = None) -> Probe:
    """`status`: `ray.serve.status` (a parameter so tests can hand in a fake)."""

    def probe() -> Readiness:
        from ray import serve

        application = (status or serve.status)().applications.get(app)
        if application is None:
            return Readiness("starting")
        for name, deployment in application.deployments.items():
            state = str(getattr(deployment.status, "value", deployment.status))
            # Serve says a replica "failed to start" (its constructor raised) and retries it;
            # at start-up the first such failure is the cause to report.
            if state in FAILED_STATUSES or "failed to start" in deployment.message:
                return Readiness("failed", f"deployment {name!r} {state}: {deployment.message}")
        state = str(getattr(application.status, "value", application.status))
        if state in FAILED_STATUSES:
            return Readiness("failed", f"application {app!r} {state}: {application.message}")
        slow = [f"{name}: {d.message}" for name, d in application.deployments.items() if d.message]
        return READY if state == "RUNNING" else Readiness("starting", "; ".join(slow))

    return probe
