"""Multi-node splitserve on one machine: deploy/serve_config_tpu.yaml deployed with `serve run`
on a local Ray cluster whose nodes stand for the encoder and decoder TPU hosts (custom resources
as in cluster/gcp_tpu.yaml), then placement, the object store across nodes and each half's
autoscaler. tests/cluster_scripts/multinode.py does the work in a subprocess (Ray initializes
once per process) and reports what it saw; these tests judge it."""

import pytest

from tests.cluster_scripts import harness

SCRIPT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cluster_run(tiny_checkpoint, tmp_path_factory):
    return harness.run_script("multinode", tiny_checkpoint, tmp_path_factory.mktemp("multinode"),
                              SCRIPT_TIMEOUT_S)


def _reached(result, step):
    assert step in result["steps"], (f"stopped before {step}: {result.get('error')} "
                                     f"(log: {result['log_path']})")


def _nodes(view, deployment):
    return {r["node_id"] for r in view[deployment]["replicas"]}


def test_replicas_run_on_their_own_hosts(cluster_run):
    _reached(cluster_run, "placement")
    nodes = cluster_run["nodes"]
    assert len(set(nodes.values())) == 3
    placement = cluster_run["placement"]
    assert _nodes(placement, "encoder") == {nodes["encoder_host"]}
    assert _nodes(placement, "decoder") == {nodes["decoder_host"]}
    assert all(harness.running(placement, name) == 1 for name in ("encoder", "decoder"))
    health = cluster_run["health"]
    assert health["status"] == "ok"
    assert health["encoder"]["compilations_after_warmup"] == health["decoder"]["compilations_after_warmup"] == 0


def test_embeddings_cross_nodes_through_the_object_store(cluster_run):
    _reached(cluster_run, "probe")
    nodes, probe = cluster_run["nodes"], cluster_run["probe"]
    # Made (ray.put) by the encoder replica: in its host's object store only.
    assert probe["nodes_before"] == [nodes["encoder_host"]]
    assert probe["status"] == 200, probe["reply"]
    assert probe["reply"]["usage"]["completion_tokens"] == 4
    # The decoder read the same reference on its host, which pulled a copy there.
    assert set(probe["nodes_after"]) == {nodes["encoder_host"], nodes["decoder_host"]}
    assert probe["object_size"] > 0


@pytest.mark.parametrize("phase, grows, stays", [("image_phase", "encoder", "decoder"),
                                                 ("token_phase", "decoder", "encoder")])
def test_each_half_scales_on_its_own_load(cluster_run, phase, grows, stays):
    _reached(cluster_run, phase)
    result, nodes = cluster_run[phase], cluster_run["nodes"]
    assert result["load"]["ok"] > 0 and result["load"]["num_errors"] == 0, result["load"]
    # The loaded half went to two replicas, both on its own host; the other never moved.
    assert result["peaks"][grows] == {"target": 2, "replicas": 2}
    assert result["peaks"][stays] == {"target": 1, "replicas": 1}
    scaled = result["nodes_when_scaled"]
    assert scaled[grows] == [nodes[f"{grows}_host"]] * 2
    assert scaled[stays] == [nodes[f"{stays}_host"]]
    # Decided within seconds of the load; back to one replica once it stopped.
    assert result["decided_s"] < 30
    assert result["scaled_in_s"] < 60
