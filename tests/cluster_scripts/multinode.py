"""Multi-node splitserve on one machine: deploy/serve_config_tpu.yaml on a local Ray cluster whose
nodes stand for the TPU pools, then load that moves each half's autoscaler on its own.

    python -m tests.cluster_scripts.multinode --checkpoint DIR --workdir DIR [--timeout-s 600]

Nodes: a head ({CPU: 1}), an encoder host ({CPU: 2, TPU: 2, encoder_host: 2}) and a decoder host
({CPU: 2, TPU: 2, decoder_host: 2}): the resources cluster/gcp_tpu.yaml declares, two chips each.
The config is deployed with `serve run` after changing only what one CPU machine needs: the tiny
checkpoint and small shapes, a loopback port with one proxy, at most two replicas per half and
autoscaling that reacts in seconds. Resources, policies and metrics are the file's.

Steps, all recorded in the RESULT line:
1. placement: where each replica runs, after warm-up;
2. the object store across nodes: an embedding made by the encoder lives on the encoder host;
   a chat request with the same image makes the decoder read it, which copies it to the
   decoder host;
3. image load (many distinct large images, one output token each): the encoder scales out,
   the decoder does not; then back in when the load stops;
4. token load (text only, long outputs): the decoder scales out, the encoder does not; then in.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import httpx

from deploy.startup import wait_healthy
from tests.cluster_scripts import harness
from tests.support import free_port

CONFIG = harness.REPO / "deploy" / "serve_config_tpu.yaml"
FAST_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "metrics_interval_s": 0.5,
                    "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 4}
ENCODER_TARGET_IMAGES = 1
DECODER_TARGET_TOKENS = 24


def overrides() -> dict:
    """The only deployment keys the test changes (targets sized for the tiny model)."""
    def policy(metric, target):
        return {"policy_function": "deploy.autoscaling:LoadPerReplica",
                "policy_kwargs": {"metric": metric, "target_per_replica": target}}

    return {"encoder": {"autoscaling_config": {**FAST_AUTOSCALING,
                                               "policy": policy("images_in_flight", ENCODER_TARGET_IMAGES)}},
            "decoder": {"autoscaling_config": {**FAST_AUTOSCALING,
                                               "policy": policy("tokens_in_flight", DECODER_TARGET_TOKENS)},
                        "graceful_shutdown_timeout_s": 10}}


class Watcher:
    """Polls the controller every `period_s` on a thread; keeps the latest view and, per phase,
    the highest target and replica count each deployment reached."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.latest: dict = {}
        self.phase: dict = {}
        self._period_s = period_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                view = harness.deployments_view(harness.serve_details())
            except Exception:  # noqa: BLE001: a slow controller poll is retried
                view = None
            if view:
                with self._lock:
                    self.latest = view
                    for name, d in view.items():
                        peak = self.phase.setdefault(name, {"target": 0, "replicas": 0})
                        peak["target"] = max(peak["target"], d["target"] or 0)
                        peak["replicas"] = max(peak["replicas"], len(d["replicas"]))
            self._stop.wait(self._period_s)

    def start_phase(self) -> None:
        with self._lock:
            self.phase = {}

    def peaks(self) -> dict:
        with self._lock:
            return {k: dict(v) for k, v in self.phase.items()}

    def wait_for(self, predicate, timeout_s: float) -> float:
        """Seconds until predicate(latest view) holds; raises TimeoutError past timeout_s."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with self._lock:
                view = self.latest
            if view and predicate(view):
                return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"condition not met within {timeout_s} s; last view: {self.latest}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Load:
    """`concurrency` clients posting `make_body(n)` in a loop on a background event loop."""

    def __init__(self, url: str, make_body, concurrency: int) -> None:
        self.ok = 0
        self.errors: list[str] = []
        self._url, self._make_body, self._concurrency = url, make_body, concurrency
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        counter = iter(range(10**9))
        async with httpx.AsyncClient(timeout=120) as client:
            async def worker():
                while not self._stop.is_set():
                    try:
                        reply = await client.post(self._url, json=self._make_body(next(counter)))
                        if reply.status_code == 200:
                            self.ok += 1
                        else:
                            self.errors.append(f"{reply.status_code}: {reply.text[:200]}")
                    except httpx.HTTPError as error:
                        self.errors.append(repr(error))
            await asyncio.gather(*(worker() for _ in range(self._concurrency)))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=180)
        return {"ok": self.ok, "errors": self.errors[:5], "num_errors": len(self.errors)}


def scale_phase(watcher: Watcher, url: str, make_body, concurrency: int, grows: str) -> dict:
    """Drives load until `grows` has two running replicas, then stops it and waits for one."""
    watcher.start_phase()
    started = time.monotonic()
    load = Load(url, make_body, concurrency)
    result: dict = {}
    try:
        result["decided_s"] = watcher.wait_for(lambda v: v[grows]["target"] >= 2, timeout_s=90)
        result["running_s"] = watcher.wait_for(lambda v: harness.running(v, grows) >= 2,
                                               timeout_s=240) + result["decided_s"]
        result["nodes_when_scaled"] = {name: [r["node_id"] for r in d["replicas"]]
                                       for name, d in watcher.latest.items()}
    finally:
        result["load"] = load.stop()
    stopped = time.monotonic()
    result["scaled_in_s"] = watcher.wait_for(
        lambda v: v[grows]["target"] == 1 and len(v[grows]["replicas"]) == 1, timeout_s=90)
    result["peaks"] = watcher.peaks()
    result["phase_s"] = time.monotonic() - started
    result["load_s"] = stopped - started
    return result


def probe_object_store(url: str, jpeg: bytes) -> dict:
    """Encodes `jpeg` through the encoder's handle, then asks for a chat with the same image:
    the encoder's cache hands the router that same reference, and the decoder reads it."""
    import ray
    from ray import serve

    encoder = serve.get_deployment_handle("encoder", app_name=harness.APP)
    (ref,) = encoder.encode.remote([jpeg], "probe").result(timeout_s=120)
    before = ray.experimental.get_object_locations([ref.object_ref])[ref.object_ref]
    reply = httpx.post(url, json=harness.chat_body("What is this?", jpeg, max_tokens=4), timeout=120)
    deadline = time.monotonic() + 10  # the location table is updated asynchronously
    while True:
        after = ray.experimental.get_object_locations([ref.object_ref])[ref.object_ref]
        if len(after["node_ids"]) > len(before["node_ids"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"status": reply.status_code, "reply": reply.json(), "object_size": before["object_size"],
            "nodes_before": before["node_ids"], "nodes_after": after["node_ids"]}


def run(args: argparse.Namespace, result: dict) -> None:
    head = {"num_cpus": 1}
    workers = [{"num_cpus": 2, "resources": {"TPU": 2, "encoder_host": 2}},
               {"num_cpus": 2, "resources": {"TPU": 2, "decoder_host": 2}}]
    with harness.local_cluster(head, workers) as (cluster, (encoder_host, decoder_host)):
        result["nodes"] = {"head": cluster.head_node.node_id, "encoder_host": encoder_host.node_id,
                           "decoder_host": decoder_host.node_id}
        port = free_port()
        config = harness.derive_config(CONFIG, args.checkpoint, port, deployments=overrides(),
                                       proxy_location="HeadOnly")
        result["deployments_config"] = config["applications"][0]["deployments"]
        result["serve_run_s"] = harness.serve_run(config, args.workdir / "serve_config.yaml",
                                                  cluster.address, args.workdir / "serve-run.log")
        base = f"http://127.0.0.1:{port}"
        result["healthy_after_s"] = wait_healthy(f"{base}/health", timeout_s=300)
        result["health"] = httpx.get(f"{base}/health", timeout=10).json()
        result["placement"] = harness.deployments_view(harness.serve_details())
        result["steps"].append("placement")

        chat = f"{base}/v1/chat/completions"
        result["probe"] = probe_object_store(chat, harness.image_jpeg(256, seed=1))
        result["steps"].append("probe")

        watcher = Watcher()
        try:
            big = harness.image_jpeg(1024, seed=2)
            result["image_phase"] = scale_phase(
                watcher, chat, lambda n: harness.chat_body("Describe it.", harness.unique_jpeg(big, n),
                                                           max_tokens=1),
                concurrency=6, grows="encoder")
            result["steps"].append("image_phase")
            result["token_phase"] = scale_phase(
                watcher, chat, lambda n: harness.chat_body(f"Count to {n}.", ignore_eos=True),
                concurrency=4, grows="decoder")
            result["steps"].append("token_phase")
            result["final"] = harness.deployments_view(harness.serve_details())
        finally:
            watcher.stop()


if __name__ == "__main__":
    harness.script_main(run, default_timeout_s=600)
