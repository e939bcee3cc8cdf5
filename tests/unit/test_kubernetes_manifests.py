"""deploy/kubernetes/: every manifest validates (strictly: unknown fields fail) against the Kubernetes
JSON schemas that the pinned kubernetes-validate package ships, offline; and the resources agree
with each other, with the image (ports, health endpoints, user) and with the autoscaling rule."""

from __future__ import annotations

import json

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
CORE = sorted(MANIFESTS.glob("*.yaml"))  # what `kubectl apply -f deploy/kubernetes/` applies
# The oldest Kubernetes still commonly run by managed services, and the newest schemas shipped.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources() -> dict[str, dict]:
    found = {}
    for path in CORE:
        for doc in documents(path):
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path, version):
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"].update(replica=1),  # a misspelt field: strict mode rejects it
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="eighty"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
)
def test_the_validator_rejects_a_broken_deployment(break_it):
    deployment = copy.deepcopy(resources()["Deployment"])
    break_it(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_core_resources_are_all_there():
    assert set(resources()) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}


def pod_spec() -> dict:
    return resources()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict:
    (only,) = pod_spec()["containers"]
    return only


def test_deployment_asks_for_a_gpu_and_probes_triton_health():
    server = container()
    assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Liveness runs one inference: a dead stub leaves Triton's health endpoints at 200.
    liveness = server["livenessProbe"]["exec"]["command"]
    assert liveness[0] == "curl" and liveness[-1] == "http://127.0.0.1:8000/v2/models/embed/infer"
    assert json.loads(liveness[liveness.index("-d") + 1])["inputs"][0]["name"] == "TEXT"
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # the image's EXPOSE and entrypoint defaults
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["port"] in ports


def test_adapters_volume_is_the_adapter_root_and_shm_is_memory():
    server, spec = container(), pod_spec()
    env = {item["name"]: item.get("value") for item in server["env"]}
    mounts = {mount["name"]: mount for mount in server["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert mounts["adapters"]["mountPath"] == env["LORAEMBED_ADAPTER_ROOT"]
    assert mounts["adapters"]["readOnly"] is True
    claim = volumes["adapters"]["persistentVolumeClaim"]["claimName"]
    assert claim == resources()["PersistentVolumeClaim"]["metadata"]["name"]
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert set(mounts) <= set(volumes)


def test_pod_runs_as_the_image_user_without_root():
    context = pod_spec()["securityContext"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert context["runAsNonRoot"] is True
    assert f"USER {context['runAsUser']}:{context['runAsGroup']}" in dockerfile


def test_service_selects_the_pods_and_exposes_their_ports():
    service, deployment = resources()["Service"], resources()["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {(port["name"], port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 8001, "grpc"), ("metrics", 8002, "metrics")}


def test_autoscaler_targets_the_deployment_on_the_adapter_defined_metric():
    hpa, deployment = resources()["HorizontalPodAutoscaler"], resources()["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load((MANIFESTS / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [rule for rule in adapter["rules"]["custom"] if rule["name"]["as"] == name]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a Pods metric needs the pod label


def test_metrics_are_scraped():
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    (monitor,) = documents(MANIFESTS / "prometheus-operator" / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"  # a CRD: no schema ships for it, so check what it points at
    service = resources()["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"
