"""deploy/kubernetes: every manifest passes `kubernetes-validate --strict` for a current Kubernetes,
the overlays' patches apply, and the probes, ports, paths, image, operators' key and the Ingress's
data-plane routes are the project's own constants (serve/endpoints.py), the same ones the launcher
and the container use."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import CONTROL_PLANE_PATHS, DATA_PLANE_PATHS, K8S_VERSION, KUBE, ROOT, build, documents, kustomization

from serve.endpoints import (
    CONTAINER_REPOSITORY,
    CONTROL_KEY_FILE_ENV,
    CONTROL_KEY_MOUNT,
    CONTROL_KEY_SECRET,
    CONTROL_KEY_SECRET_KEY,
    DATA_PLANE_GRPC_METHODS,
    DATA_PLANE_HTTP_PATHS,
    EXIT_TIMEOUT_S,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE,
    LIVE_PATH,
    LIVENESS_FAILURES,
    LIVENESS_PERIOD_S,
    LIVENESS_TIMEOUT_S,
    MAX_REQUEST_MB,
    METRICS_PORT,
    READY_PATH,
    SUPERVISOR_METRICS_PORT,
    UPSTREAM_ATTEMPTS,
    UPSTREAM_BUDGET_S,
    UPSTREAM_TIMEOUT_S,
)

OVERLAYS = [KUBE, KUBE / "object-storage", KUBE / "grpc-tls", KUBE / "training"]
# The Prometheus operator's kinds: kubernetes-validate has no schema for them (it warns and checks nothing);
# tests/test_monitoring.py validates them against the operator's CRD schemas instead.
MANIFESTS = sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml" and p.parent.name != "monitoring")


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_passes_strict_validation(manifest):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "ERROR" not in result.stdout


@pytest.mark.parametrize("folder", OVERLAYS, ids=lambda p: p.name)
def test_each_kustomization_builds_into_valid_resources(folder):
    resources = build(folder)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)  # raises on any error
    # Everything lives in the kustomization's own namespace, written in each manifest too (so
    # `kubectl apply -f` and checkov, which read the files as they are, see it).
    namespace = kustomization(KUBE / "training" if folder.name == "training" else KUBE / "base")["namespace"]
    assert namespace != "default"
    for resource in resources:
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == namespace
            assert resource["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert resource["metadata"]["namespace"] == namespace, resource["metadata"]["name"]
    assert [r for r in resources if r["kind"] == "Namespace"]
    assert [r for r in resources if r["kind"] == "NetworkPolicy"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
@pytest.mark.parametrize("folder", OVERLAYS, ids=lambda p: p.name)
def test_kubectls_own_kustomize_builds_the_same_resources(folder):
    """The real kustomize (which, unlike build() above, refuses a base that contains its overlay)."""
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = {(r["kind"], r["metadata"]["name"]) for r in yaml.safe_load_all(result.stdout) if r}
    assert rendered == {(r["kind"], r["metadata"]["name"]) for r in build(folder)}


def container(resources: list[dict]) -> dict:
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_fleet_uses_the_projects_ports_probes_paths_and_image():
    resources = build(KUBE)
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    c = container(resources)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "http": HTTP_PORT,
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
        "supervisor": SUPERVISOR_METRICS_PORT,
    }
    assert c["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "supervisor"}  # serve/readiness.py
    assert c["startupProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    args = c["args"]
    assert args[args.index("--model-repository") + 1] == CONTAINER_REPOSITORY
    assert int(args[args.index("--exit-timeout") + 1]) == EXIT_TIMEOUT_S
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}[CONTAINER_REPOSITORY] is True
    assert c["image"] == IMAGE and kustomization(KUBE / "base")["images"][0]["name"] == IMAGE
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
    assert [int(p) for p in exposed] == [HTTP_PORT, GRPC_PORT, METRICS_PORT, SUPERVISOR_METRICS_PORT]
    # The launcher's own defaults are the same constants.
    from serve.launch import parse_args

    defaults = parse_args(["--model-repository", "x"])
    assert (defaults.http_port, defaults.grpc_port, defaults.metrics_port) == (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    assert defaults.supervisor_metrics_port == SUPERVISOR_METRICS_PORT
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


def test_the_fleet_reads_the_operators_key_from_its_secret():
    pod = next(r for r in build(KUBE) if r["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env[CONTROL_KEY_FILE_ENV] == f"{CONTROL_KEY_MOUNT}/{CONTROL_KEY_SECRET_KEY}"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CONTROL_KEY_MOUNT)
    assert mount["readOnly"] is True
    secret = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == CONTROL_KEY_SECRET and not secret.get("optional")  # no key: the pod waits
    assert secret["items"] == [{"key": CONTROL_KEY_SECRET_KEY, "path": CONTROL_KEY_SECRET_KEY}]
    assert secret["defaultMode"] & 0o007 == 0  # not world-readable: the server reads it through fsGroup
    # The launcher takes every argument the Deployment and the overlays give it.
    from serve.launch import parse_args

    for folder in (KUBE, KUBE / "object-storage", KUBE / "grpc-tls"):
        args = parse_args(container(build(folder))["args"])
        assert args.model_repository and not args.triton_args


def ingress_paths(name: str) -> list[dict]:
    ingress = next(r for r in build(KUBE) if r["kind"] == "Ingress" and r["metadata"]["name"] == name)
    assert ingress["spec"]["tls"][0]["secretName"] and ingress["spec"]["tls"][0]["hosts"] == [
        ingress["spec"]["rules"][0]["host"]
    ]  # TLS for the very host served
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/use-regex"] == "true"
    return [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]


def nginx_matches(paths: list[dict], url_path: str) -> bool:
    """ingress-nginx with use-regex: `location ~* ^PATH` (case-insensitive, anchored at the start), matched
    against the decoded path, as nginx decodes it before choosing a location."""
    decoded = urllib.parse.unquote(url_path)
    return any(re.match("^" + p["path"], decoded, re.IGNORECASE) for p in paths)


def test_the_http_ingress_forwards_only_the_data_plane():
    paths = ingress_paths("threegnet-http")
    service_ports = {
        p["name"]: p["port"] for p in next(r for r in build(KUBE) if r["kind"] == "Service")["spec"]["ports"]
    }
    for p in paths:
        assert p["pathType"] == "ImplementationSpecific" and p["path"].endswith("$")  # anchored: no prefix leaks
        assert p["path"] == "/v2$" or p["path"].startswith(DATA_PLANE_HTTP_PATHS)
        assert service_ports[p["backend"]["service"]["port"]["name"]] == HTTP_PORT
    assert [p for p in DATA_PLANE_PATHS if not nginx_matches(paths, p)] == []
    assert [p for p in CONTROL_PLANE_PATHS if nginx_matches(paths, p)] == []


def test_the_grpc_ingress_forwards_exactly_the_data_plane_methods():
    paths = ingress_paths("threegnet-grpc")
    methods = []
    for p in paths:
        match = re.fullmatch(r"/inference\\\.GRPCInferenceService/(\w+)\$", p["path"])
        assert match, p["path"]
        methods.append(match.group(1))
        assert p["backend"]["service"]["port"]["name"] == "grpc"
    assert sorted(methods) == sorted(DATA_PLANE_GRPC_METHODS)
    ingress = next(r for r in build(KUBE) if r["metadata"]["name"] == "threegnet-grpc")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    for control in ("RepositoryIndex", "RepositoryModelLoad", "ModelConfig", "ModelStatistics", "TraceSetting",
                    "LogSettings", "SystemSharedMemoryRegister", "CudaSharedMemoryStatus"):  # fmt: skip
        assert not nginx_matches(paths, f"/inference.GRPCInferenceService/{control}")
    assert not nginx_matches(paths, "/inference.GRPCInferenceService/ModelInferX")


def test_only_the_ingress_controller_and_prometheus_reach_the_replicas():
    resources = build(KUBE)
    policy = next(r for r in resources if r["kind"] == "NetworkPolicy")
    labels = next(r for r in resources if r["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    allowed = {}
    for rule in policy["spec"]["ingress"]:
        (peer,) = rule["from"]  # namespace AND pod selector in one peer, not two peers (which would be OR)
        source = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        assert peer["podSelector"]["matchLabels"]
        allowed[source] = sorted(p["port"] for p in rule["ports"])
    assert allowed == {"ingress-nginx": [HTTP_PORT, GRPC_PORT], "monitoring": [METRICS_PORT, SUPERVISOR_METRICS_PORT]}
    # The object-storage overlay opens DNS and HTTPS, nothing more.
    egress = next(r for r in build(KUBE / "object-storage") if r["kind"] == "NetworkPolicy")["spec"]["egress"]
    assert sorted(p["port"] for rule in egress for p in rule["ports"]) == [53, 53, 443]


def test_the_grpc_tls_overlay_serves_mutual_tls_from_its_secret():
    resources = build(KUBE / "grpc-tls")
    pod = next(r for r in resources if r["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    from serve.launch import parse_args

    args = parse_args(c["args"])
    secret = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "threegnet-grpc-tls")
    mount = next(m for m in c["volumeMounts"] if m["name"] == secret["name"])
    assert mount["readOnly"] is True
    assert (args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca) == tuple(
        f"{mount['mountPath']}/{name}" for name in ("tls.crt", "tls.key", "ca.crt")
    )  # the keys of a kubernetes.io/tls Secret, plus the client CA
    ingress = next(r for r in resources if r["metadata"]["name"] == "threegnet-grpc")["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert ingress["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on"
    grpc = next(
        p for p in next(r for r in resources if r["kind"] == "Service")["spec"]["ports"] if p["port"] == GRPC_PORT
    )
    assert "appProtocol" not in grpc  # no longer cleartext h2c


def test_a_hung_pod_is_handled_with_the_timeouts_the_rehearsal_uses():
    """The liveness probe and the Ingress's timeouts and retries are serve/endpoints.py's constants, which
    deploy/local_fleet.py's HAProxy uses too (docs/deploy.md "When a pod hangs")."""
    from deploy.local_fleet import CHECK_TIMEOUT_MS, Fleet

    for folder in OVERLAYS[:3]:  # every overlay that serves
        resources = build(folder)
        live = container(resources)["livenessProbe"]
        assert (live["periodSeconds"], live["timeoutSeconds"], live["failureThreshold"]) == (
            LIVENESS_PERIOD_S, LIVENESS_TIMEOUT_S, LIVENESS_FAILURES
        )  # fmt: skip
        assert container(resources)["readinessProbe"]["timeoutSeconds"] * 1000 == CHECK_TIMEOUT_MS
        ingresses = {r["metadata"]["name"]: r["metadata"]["annotations"] for r in resources if r["kind"] == "Ingress"}
        prefix = "nginx.ingress.kubernetes.io/"
        for ingress in ingresses.values():
            assert ingress[prefix + "proxy-read-timeout"] == str(UPSTREAM_TIMEOUT_S)
        http = ingresses["threegnet-http"]
        retried = ["error", "timeout", "http_502", "http_503", "non_idempotent"]  # 502: a pod's front lost Triton
        assert http[prefix + "proxy-next-upstream"].split() == retried
        assert http[prefix + "proxy-next-upstream-tries"] == str(UPSTREAM_ATTEMPTS)
        assert http[prefix + "proxy-next-upstream-timeout"] == str(UPSTREAM_BUDGET_S)
        # gRPC: ingress-nginx has no grpc_next_upstream annotation; none that would silently do nothing.
        assert not any(k.startswith(prefix + "proxy-next-upstream") for k in ingresses["threegnet-grpc"])
    if shutil.which("haproxy") is None:
        return  # the rehearsal's side needs HAProxy to build its configuration (make haproxy)
    fleet = Fleet(ROOT)  # its configuration only: nothing is started
    try:
        config = fleet.config()
    finally:
        fleet.stop()
    assert f"timeout server {UPSTREAM_TIMEOUT_S}s" in config and f"retries {UPSTREAM_ATTEMPTS - 1}" in config
    assert "retry-on conn-failure empty-response response-timeout 502 503" in config
    assert "option redispatch 1" in config and f"timeout check {CHECK_TIMEOUT_MS}ms" in config


def test_the_ingress_and_the_rehearsal_cap_request_bodies_at_the_same_size():
    """Triton 2.51 caps no body itself: the load balancer in front must (serve/endpoints.py MAX_REQUEST_MB)."""
    from deploy.local_fleet import Fleet

    for name in ("threegnet-http", "threegnet-grpc"):
        ingress = next(r for r in build(KUBE) if r["kind"] == "Ingress" and r["metadata"]["name"] == name)
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{MAX_REQUEST_MB}m"
    config = Fleet(ROOT, replicas=1).config()  # the rehearsal's HAProxy, as it would start
    assert f"req.hdr_val(content-length) gt {MAX_REQUEST_MB * 1024 * 1024}" in config
    assert f"set-var(txn.max_message) str({MAX_REQUEST_MB * 1024 * 1024:08X})" in config  # gRPC's length prefix
