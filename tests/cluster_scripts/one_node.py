"""deploy/serve_config.yaml (one machine) deployed with `serve run` on a one-node Ray, then asked
one chat with an image.

    python -m tests.cluster_scripts.one_node --checkpoint DIR --workdir DIR [--timeout-s 300]

Changed from the file: the tiny checkpoint and small shapes, and a free loopback port.
"""

from __future__ import annotations

import argparse

import httpx

from deploy.startup import wait_healthy
from tests.cluster_scripts import harness
from tests.support import free_port

CONFIG = harness.REPO / "deploy" / "serve_config.yaml"


def run(args: argparse.Namespace, result: dict) -> None:
    # Serve gives each replica 1 logical CPU unless its config says otherwise: encoder + decoder.
    with harness.local_cluster({"num_cpus": 2}, []) as (cluster, _):
        port = free_port()
        config = harness.derive_config(CONFIG, args.checkpoint, port)
        result["serve_run_s"] = harness.serve_run(config, args.workdir / "serve_config.yaml",
                                                  cluster.address, args.workdir / "serve-run.log")
        base = f"http://127.0.0.1:{port}"
        result["healthy_after_s"] = wait_healthy(f"{base}/health", timeout_s=240)
        result["health"] = httpx.get(f"{base}/health", timeout=10).json()
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=120, json=harness.chat_body(
            "What is this?", harness.image_jpeg(128, seed=3), max_tokens=4))
        result["chat"] = {"status": reply.status_code, "body": reply.json()}
        result["deployments"] = harness.deployments_view(harness.serve_details())


if __name__ == "__main__":
    harness.script_main(run, default_timeout_s=300)
