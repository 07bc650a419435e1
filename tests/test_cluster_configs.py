"""The cluster and deployment files, checked with Ray's own validators and against each other:
the `ray up` configs (cluster/), the Serve configs (deploy/serve_config*.yaml) and the KubeRay
RayService (deploy/k8s/). No cluster starts here; tests/test_cluster_deploy.py and
tests/test_cluster_multinode.py deploy the Serve configs for real."""

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.accelerators import TPUAcceleratorManager, tpu
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from decoder_service.config import DecoderConfig
from deploy.app import AppArgs
from deploy.autoscaling import IMAGES_IN_FLIGHT, TOKENS_IN_FLIGHT, LoadPerReplica
from encoder_service.config import EncoderConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "deploy").glob("serve_config*.yaml"))
TPU_CONFIG = REPO / "deploy" / "serve_config_tpu.yaml"
RAYSERVICE = REPO / "deploy" / "k8s" / "rayservice_tpu.yaml"
ROLES = {"encoder": "encoder_host", "decoder": "decoder_host"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments(serve_config: dict) -> dict:
    (app,) = serve_config["applications"]
    return {d["name"]: d for d in app.get("deployments", [])}


def requested(serve_config: dict, name: str) -> dict:
    return deployments(serve_config)[name]["ray_actor_options"]["resources"]


def kuberay_groups() -> dict:
    """{groupName: (ray resources declared, TPU chips the pod gets, node selector)}."""
    groups = {}
    for group in load(RAYSERVICE)["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        # KubeRay passes rayStartParams.resources to `ray start --resources`: a quoted JSON string.
        declared = json.loads(json.loads(group["rayStartParams"]["resources"]))
        (container,) = group["template"]["spec"]["containers"]
        chips = int(container["resources"]["limits"]["google.com/tpu"])
        assert int(container["resources"]["requests"]["google.com/tpu"]) == chips
        groups[group["groupName"]] = (declared, chips, group["template"]["spec"]["nodeSelector"], group)
    return groups


def onprem_resources(hostname: str, chips: int) -> dict:
    """Runs cluster/onprem.yaml's worker start command in bash as host `hostname` with `chips`
    TPU devices (ray, hostname and ls stubbed); returns what it passes to `ray start --resources`."""
    config = prepare_config(load(REPO / "cluster" / "onprem.yaml"))
    devices = " ".join(f"/dev/accel{i}" for i in range(chips))
    stubs = (f'hostname() {{ echo {hostname}; }}; ls() {{ for d in {devices}; do echo "$d"; done; }}; '
             'ray() { for a in "$@"; do echo "$a"; done; }; ulimit() { :; }; ')
    script = stubs + "; ".join(config["worker_start_ray_commands"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAY_HEAD_IP": "head"}).stdout.splitlines()
    assert "--address=head:6379" in out
    (flag,) = [line for line in out if line.startswith("--resources=")]
    return json.loads(flag[len("--resources="):])


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validator(path):
    config = load(path)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching
    broken = copy.deepcopy(config)
    broken["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yamls_are_the_expected_providers():
    assert {p.name: load(p)["provider"]["type"] for p in CLUSTER_YAMLS} == {
        "gcp_tpu.yaml": "gcp", "onprem.yaml": "local"}
    assert set(load(REPO / "cluster" / "onprem.yaml")["provider"]) >= {"head_ip", "worker_ips"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_setup_installs_splitserve_with_its_tpu_extra(path):
    config = prepare_config(load(path))
    assert "." in config["file_mounts"].values()  # the checkout `ray up` runs from
    (mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    mount = mount.replace("~", "$HOME")
    installs = [c for c in config["setup_commands"] if "pip install" in c and "[tpu]" in c]
    assert installs and all(f"{mount}[tpu]" in c and "constraints.txt" in c for c in installs)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def test_gcp_node_types_are_a_cpu_head_and_tpu_vm_pools():
    config = prepare_config(load(REPO / "cluster" / "gcp_tpu.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "machineType" in head["node_config"] and "TPU" not in head["resources"]
    pools = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert {name.split("_")[1] for name in pools} == {"v5e", "v6e"}
    for name, node in pools.items():
        accelerator = node["node_config"]["acceleratorType"]
        # Ray's GCP provider treats a node_config without machineType as a TPU VM.
        assert "machineType" not in node["node_config"] and node["node_config"]["runtimeVersion"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accelerator)
        chips = int(accelerator.split("-")[1]) // tpu.get_tpu_cores_per_chip(accelerator)
        assert chips <= tpu.get_num_tpu_visible_chips_per_host(accelerator)  # one host, no pod
        assert node["resources"]["TPU"] == chips
        (role,) = set(node["resources"]) & set(ROLES.values())
        assert node["resources"][role] == chips, f"{name}: one {role} unit per chip"
        assert node["min_workers"] >= 1  # min_replicas: 1 of each half needs a host from the start


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates(path, tmp_path):
    raw = load(path)
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == "deploy.app:build_app"
    args = AppArgs.model_validate(app.args)  # extra="forbid": a mistyped arg fails here
    common = {"model": str(tmp_path), "device": args.device}
    EncoderConfig(**{**args.encoder, **common})
    DecoderConfig(**{**args.decoder, **common})
    for entry in deployments(raw).values():
        assert entry["name"] in {"router", "encoder", "decoder", "colocated"}
        if "autoscaling_config" in entry:
            AutoscalingConfig(**entry["autoscaling_config"])  # imports and pickles the policy


def test_tpu_config_gives_each_half_its_chips_limits_and_own_scaling():
    config = load(TPU_CONFIG)
    policies = {}
    for name, role in ROLES.items():
        entry = deployments(config)[name]
        assert entry["max_ongoing_requests"] >= 1
        assert requested(config, name) == {"TPU": 1, role: 1}
        scaling = AutoscalingConfig(**entry["autoscaling_config"])
        assert scaling.min_replicas >= 1 and scaling.max_replicas > scaling.min_replicas
        policy = scaling.policy
        assert policy.policy_function == "deploy.autoscaling:LoadPerReplica"
        policies[name] = policy.policy_kwargs["metric"]
        LoadPerReplica(**policy.policy_kwargs)
    assert policies == {"encoder": IMAGES_IN_FLIGHT, "decoder": TOKENS_IN_FLIGHT}


def test_tpu_config_resources_exist_on_gcp_node_types():
    config = load(TPU_CONFIG)
    cluster = prepare_config(load(REPO / "cluster" / "gcp_tpu.yaml"))
    for name, role in ROLES.items():
        asks = requested(config, name)
        hosts = {t: n for t, n in cluster["available_node_types"].items() if role in n["resources"]}
        assert len(hosts) == 1, f"{role} on exactly one node type"
        (host,) = hosts.values()
        assert all(host["resources"].get(k, 0) >= v for k, v in asks.items())
        others = set(ROLES.values()) - {role}
        assert not others & set(host["resources"]), "a host serves one half"
        most = AutoscalingConfig(**deployments(config)[name]["autoscaling_config"]).max_replicas
        assert most * asks[role] <= host["resources"][role] * host["max_workers"]


def test_tpu_config_resources_exist_on_onprem_hosts():
    config = load(TPU_CONFIG)
    hosts = prepare_config(load(REPO / "cluster" / "onprem.yaml"))["provider"]["worker_ips"]
    assert {h.split("-")[0] for h in hosts} == {"encoder", "decoder"}
    for name, role in ROLES.items():
        declared = onprem_resources(f"{name}-0", chips=4)
        assert declared == {role: 4}
        assert declared[role] >= requested(config, name)[role]
    assert onprem_resources("login-node", chips=0) == {}


def test_kuberay_rayservice_embeds_the_tpu_serve_config():
    manifest = load(RAYSERVICE)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == load(TPU_CONFIG)["applications"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True


def test_kuberay_worker_groups_are_gke_tpu_pools_with_the_role_resources():
    config = load(TPU_CONFIG)
    groups = kuberay_groups()
    accelerators = {"tpu-v5-lite-podslice", "tpu-v6e-slice"}
    assert {sel["cloud.google.com/gke-tpu-accelerator"] for _, _, sel, _ in groups.values()} == accelerators
    for name, role in ROLES.items():
        (declared, chips, selector, group), = [g for g in groups.values() if role in g[0]]
        rows, cols = map(int, selector["cloud.google.com/gke-tpu-topology"].split("x"))
        assert rows * cols == chips and group["numOfHosts"] == 1
        assert declared == {role: chips}  # one role unit per chip, as in cluster/gcp_tpu.yaml
        assert chips >= requested(config, name)["TPU"]
        most = AutoscalingConfig(**deployments(config)[name]["autoscaling_config"]).max_replicas
        assert most <= declared[role] * group["maxReplicas"]
