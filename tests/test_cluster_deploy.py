"""deploy/serve_config.yaml, the one-machine config, deployed for real with `serve run` on a
Ray of its own (tests/cluster_scripts/one_node.py runs it in a subprocess: Ray initializes once
per process). deploy/serve_config_tpu.yaml is deployed by tests/test_cluster_multinode.py."""

import pytest

from tests.cluster_scripts import harness

SCRIPT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def one_node(tiny_checkpoint, tmp_path_factory):
    return harness.run_script("one_node", tiny_checkpoint, tmp_path_factory.mktemp("one-node"),
                              SCRIPT_TIMEOUT_S)


def test_one_machine_config_deploys_with_serve_run_and_answers(one_node):
    assert "error" not in one_node, f"{one_node['error']} (log: {one_node['log_path']})"
    health = one_node["health"]
    assert health["status"] == "ok"
    for half in ("encoder", "decoder"):
        assert health[half]["compilations_after_warmup"] == 0
        assert 1 <= health[half]["graphs_compiled"] <= health[half]["graphs_planned"]
    chat = one_node["chat"]
    assert chat["status"] == 200, chat
    assert chat["body"]["usage"]["completion_tokens"] == 4
    assert chat["body"]["usage"]["prompt_tokens"] > 16  # the image's 16 tokens and the text
    view = one_node["deployments"]
    assert set(view) == {"router", "encoder", "decoder"}
    assert all(len(d["replicas"]) == 1 and harness.running(view, name) == 1
               for name, d in view.items())
