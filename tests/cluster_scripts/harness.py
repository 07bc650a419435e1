"""What the cluster scripts share: a local Ray cluster that always shuts down, a Serve config
derived from one in deploy/, `serve run` through Ray's own CLI, and where replicas run.

The scripts run in their own process (Ray initializes once per process, and the test session
already has one), print one `RESULT {json}` line for the test to assert on, and stop within
their `--timeout-s`: an alarm raises in the main thread, and `local_cluster` shuts the cluster
down on the way out whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
APP = "splitserve"

# The smallest shapes that still serve an image prompt: few graphs, so replicas warm up fast.
SMALL_ENCODER = {"max_batch_items": 2}
SMALL_DECODER = {"max_model_len": 64, "max_num_seqs": 2, "max_prefill_seqs": 2, "max_num_batched_tokens": 64,
                 "max_images_per_request": 1, "min_chunk_tokens": 64, "min_attention_len": 64}

# Inherited by the raylets this process starts, so by every replica.
REPLICA_ENV = {"PJRT_DEVICE": "CPU", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def script_main(run, default_timeout_s: float) -> None:
    """Parses `--checkpoint DIR --workdir DIR [--timeout-s N]`, calls run(args, result) under the
    deadline and prints `result` as the RESULT line, with `error` set if run raised."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--timeout-s", type=float, default=default_timeout_s)
    args = parser.parse_args()
    arm_deadline(args.timeout_s)
    started = time.monotonic()
    result: dict = {"steps": []}
    try:
        run(args, result)
    except BaseException as error:  # reported, with the steps reached, for the test to show
        result["error"] = f"{type(error).__name__}: {error}"
    result["total_s"] = time.monotonic() - started
    emit(result)


def arm_deadline(timeout_s: float) -> None:
    """Raises TimeoutError in the main thread after `timeout_s`, so `finally` blocks still run."""
    def expire(*_):
        raise TimeoutError(f"cluster script ran past its {timeout_s:.0f} s budget")

    signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, expire)
    signal.alarm(int(timeout_s))


def _retry_start(start, attempts: int = 3):
    """Ray gives a new raylet a fixed 30 s to register with the GCS; on an overloaded machine
    that can pass. Such a start is tried again rather than failing the run."""
    for attempt in range(attempts):
        try:
            return start()
        except Exception as error:  # noqa: BLE001: Ray raises a bare Exception here
            if "timed out during startup" not in str(error) or attempt == attempts - 1:
                raise
            print(f"cluster: a node timed out during startup; trying again ({error})",
                  file=sys.stderr, flush=True)
            time.sleep(5)


@contextlib.contextmanager
def local_cluster(head: dict, workers: list[dict]):
    """A head and worker nodes (raylets on this machine); yields (cluster, [worker nodes]).

    The cluster keeps its files in a temp dir of its own, so it never becomes the machine's
    "current" Ray cluster (`ray.init("auto")`) for other processes; the dir is removed when
    all went well, and kept (its Ray logs) when not."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(REPLICA_ENV)
    temp_dir = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    small = {"object_store_memory": 100 * 2**20, "include_dashboard": False, "temp_dir": temp_dir}
    cluster = _retry_start(lambda: Cluster(initialize_head=True, head_node_args={**small, **head}))
    failed = True
    try:
        nodes = [_retry_start(lambda spec=spec: cluster.add_node(**{**small, **spec})) for spec in workers]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, nodes
        failed = False
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
        if failed:
            print(f"cluster: Ray logs kept in {temp_dir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def derive_config(source: Path, model: str, http_port: int, *, deployments: dict | None = None,
                  proxy_location: str | None = None) -> dict:
    """`source` with the test's checkpoint, small shapes and a loopback port. `deployments` maps
    a deployment name to keys replaced in its entry (`autoscaling_config` is merged)."""
    config = yaml.safe_load(source.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    if proxy_location:
        config["proxy_location"] = proxy_location
    (app,) = config["applications"]
    app["args"] = {**app.get("args", {}), "model": model, "encoder": SMALL_ENCODER,
                   "decoder": SMALL_DECODER}
    for entry in app.get("deployments", []):
        for key, value in (deployments or {}).get(entry["name"], {}).items():
            if key == "autoscaling_config":
                entry[key] = {**entry.get(key, {}), **value}
            else:
                entry[key] = value
    return config


def serve_run(config: dict, path: Path, address: str, log_path: Path) -> float:
    """Validates `config`, writes it to `path` and deploys it with `serve run CONFIG --address
    ADDRESS --non-blocking` (Ray's CLI; it returns once the controller has the config).
    Returns the seconds the CLI took."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = Path(sys.executable).parent / "serve"
    started = time.monotonic()
    with open(log_path, "w") as log:
        subprocess.run([str(cli), "run", str(path), "--address", address, "--non-blocking"],
                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=180, check=True)
    return time.monotonic() - started


def serve_details() -> dict:
    """What `serve status` and the dashboard read: the controller's view of every deployment."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_serve_instance_details.remote(), timeout=30)


def deployments_view(details: dict) -> dict:
    """{deployment: {"target": n, "replicas": [{"node_id", "state"}]}}."""
    view = {}
    for name, d in details["applications"][APP]["deployments"].items():
        view[name] = {"target": d.get("target_num_replicas"),
                      "replicas": [{"node_id": r.get("node_id"), "state": str(r.get("state"))}
                                   for r in d.get("replicas", [])]}
    return view


def running(view: dict, deployment: str) -> int:
    return sum(r["state"].endswith("RUNNING") for r in view[deployment]["replicas"])


def image_jpeg(side_px: int, seed: int) -> bytes:
    """A noise JPEG: expensive to decode and resize, the way real photos are."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def unique_jpeg(base: bytes, n: int) -> bytes:
    """`base` with a JPEG comment segment naming `n`: the same picture, different bytes, so
    neither the router's nor the encoder's cache has seen it."""
    comment = f"splitserve load {n}".encode()
    return base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]


def data_url(jpeg: bytes) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def chat_body(text: str, image: bytes | None = None, **sampling) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **sampling}


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def run_script(name: str, checkpoint: Path, workdir: Path, timeout_s: float) -> dict:
    """Test side: runs `python -m tests.cluster_scripts.NAME` in a session of its own and returns
    its RESULT. Past `timeout_s` (the script's own deadline plus a margin) the whole process
    group gets SIGTERM, then SIGKILL, so no raylet outlives the test."""
    log_path = workdir / f"{name}.log"
    command = [sys.executable, "-m", f"tests.cluster_scripts.{name}", "--checkpoint", str(checkpoint),
               "--workdir", str(workdir), "--timeout-s", str(timeout_s)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout_s + 90)
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=wait_s)
                    break
    output = log_path.read_text()
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise AssertionError(f"{name} printed no RESULT (exit {process.returncode}); its output "
                             f"ends with:\n{output[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["log_path"] = str(log_path)
    return result
