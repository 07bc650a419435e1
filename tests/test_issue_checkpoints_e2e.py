"""The issue-12 checkpoints served end to end over HTTP, token-exact against transformers' own
LLaVA: a CLIP 224/16 tower with the "full" strategy (197 tokens per image) and one with the
default strategy (196), both stating `image_seq_length` 576. A deploy that cannot turn
healthy fails the test at once with the app's own reason (no 300 s wait)."""

import threading

import pytest

from deploy.app import build_app
from deploy.startup import health_probe, wait_until_ready
from tests.support import assert_answers_like_transformers
from tests.test_geometry import ISSUE_CHECKPOINTS, issue_checkpoints  # noqa: F401: the fixture


@pytest.mark.parametrize("name", ISSUE_CHECKPOINTS)
def test_issue_checkpoint_answers_like_transformers(ray_serve, serve_http_port, issue_checkpoints,
                                                   photos, name):
    path = issue_checkpoints[name]
    app = build_app({"model": str(path), "served_model_name": name, "strict_compile": True,
                     "decoder": {"max_model_len": 512, "max_num_seqs": 2},
                     "encoder": {"max_batch_items": 2}})
    ray_serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{serve_http_port}/{name}"
    try:
        outcome = wait_until_ready([health_probe(f"{url}/health")], threading.Event(), timeout_s=300)
        assert outcome.state == "ready", outcome.detail
        assert_answers_like_transformers(url, name, path, photos[2])
    finally:
        ray_serve.delete(name)
