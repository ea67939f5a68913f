"""deploy/kubernetes: every manifest passes `kubernetes-validate --strict` for a current Kubernetes,
the overlays' patches apply, and the probes, ports, paths and image are the project's own constants
(serve/endpoints.py), the same ones the launcher and the container use."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

from serve.endpoints import (
    CONTAINER_REPOSITORY,
    EXIT_TIMEOUT_S,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE,
    LIVE_PATH,
    METRICS_PORT,
    READY_PATH,
)

KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def build(folder: Path) -> list[dict]:
    """A small kustomize: the resources (recursively), then the overlay's patches (JSON 6902 ops
    and `$patch: delete`), which is all deploy/kubernetes uses."""
    spec = kustomization(folder)
    resources: list[dict] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        resources += build(target) if target.is_dir() else documents(target)
    for patch in spec.get("patches", []):
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, dict) and body.get("$patch") == "delete":
            resources = [r for r in resources if (r["kind"], r["metadata"]["name"]) !=
                         (body["kind"], body["metadata"]["name"])]  # fmt: skip
            continue
        target = patch["target"]
        for resource in resources:
            if resource["kind"] == target["kind"] and resource["metadata"]["name"] == target["name"]:
                for op in body:
                    json_patch(resource, op)
    return resources


def json_patch(document: dict, op: dict) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
    node = document
    for key in parents:
        node = node[key]
    if op["op"] == "remove":
        del node[last]
    elif op["op"] in ("add", "replace"):
        if op["op"] == "replace":
            node[last]
        node[last] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported op {op}")


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_passes_strict_validation(manifest):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "ERROR" not in result.stdout


@pytest.mark.parametrize("folder", [KUBE, KUBE / "object-storage", KUBE / "training"], ids=lambda p: p.name)
def test_each_kustomization_builds_into_valid_resources(folder):
    resources = build(folder)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)  # raises on any error


def container(resources: list[dict]) -> dict:
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_fleet_uses_the_projects_ports_probes_paths_and_image():
    resources = build(KUBE)
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    c = container(resources)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    args = c["args"]
    assert args[args.index("--model-repository") + 1] == CONTAINER_REPOSITORY
    assert int(args[args.index("--exit-timeout") + 1]) == EXIT_TIMEOUT_S
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}[CONTAINER_REPOSITORY] is True
    assert c["image"] == IMAGE and kustomization(KUBE)["images"][0]["name"] == IMAGE
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Rollouts lose no capacity; stopping gives Triton its whole drain time.
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + EXIT_TIMEOUT_S
    # The Service, the HPA and the PDB point at these pods and ports.
    labels = pod["metadata"]["labels"]
    service = next(r for r in resources if r["kind"] == "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    hpa = next(r for r in resources if r["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"Pods", "Resource"}  # a Triton metric, with CPU as the fallback
    (adapter,) = documents(KUBE / "prometheus-adapter-rules.yaml")  # merged into the adapter's own config
    rule = yaml.safe_load(adapter["data"]["config.yaml"])["rules"][0]
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")["pods"]["metric"]["name"]
    assert rule["name"]["as"] == pods_metric and "nv_inference_queue_duration_us" in rule["metricsQuery"]
    pdb = next(r for r in resources if r["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_container_image_runs_the_launcher_on_the_same_constants():
    dockerfile = (ROOT / "serve" / "Dockerfile").read_text()
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["python3", "serve/launch.py"]
    assert entrypoint[entrypoint.index("--model-repository") + 1] == CONTAINER_REPOSITORY
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()
    assert [int(p) for p in exposed] == [HTTP_PORT, GRPC_PORT, METRICS_PORT]
    # The launcher's own defaults are the same constants.
    from serve.launch import parse_args

    defaults = parse_args(["--model-repository", "x"])
    assert (defaults.http_port, defaults.grpc_port, defaults.metrics_port) == (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    assert defaults.exit_timeout == EXIT_TIMEOUT_S


def test_the_object_storage_overlay_reads_the_repository_with_triton_and_a_secret():
    resources = build(KUBE / "object-storage")
    assert not [r for r in resources if r["kind"] == "PersistentVolumeClaim"]
    c = container(resources)
    assert re.match(r"^(s3|gs|as)://", c["args"][c["args"].index("--model-repository") + 1])
    assert c["envFrom"] == [{"secretRef": {"name": "threegnet-model-store"}}]
    assert all(m["mountPath"] != CONTAINER_REPOSITORY for m in c.get("volumeMounts", []))


def test_the_training_job_resumes_from_the_shared_checkpoint_volume():
    resources = build(KUBE / "training")
    job = next(r for r in resources if r["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    command = " ".join(pod["containers"][0]["args"])
    assert "torchrun" in command and "training/train.py" in command and "--resume" in command
    assert f"--nnodes={spec['completions']}" in command and "JOB_COMPLETION_INDEX" in command
    output = re.search(r"--output-dir (\S+)", command).group(1)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    checkpoints = next(path for path in mounts if output.startswith(path))
    claim = next(v for v in pod["volumes"] if v["name"] == mounts[checkpoints])["persistentVolumeClaim"]["claimName"]
    pvc = next(r for r in resources if r["kind"] == "PersistentVolumeClaim" and r["metadata"]["name"] == claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node writes and reads the same checkpoints
    service = next(r for r in resources if r["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert f"{job['metadata']['name']}-0.{service['metadata']['name']}:" in command  # the rendezvous host
