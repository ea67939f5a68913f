"""New versions earn their traffic: deploy/canary.py on the rehearsed fleet (2 real Triton replicas behind a
real HAProxy), under load from plain tritonclient clients that retry nothing. A good version 2 is promoted
with no failed request; a version that passes every check and the smoke inference but fails real requests
(bright images) is rolled back on its own, having failed a number of requests bounded by its share of the
traffic; the documented command starts, aborts and promotes a canary by hand. And the same roles in
Kubernetes (deploy/kubernetes/canary): the stable pod pinned, behind ingress-nginx canary Ingresses."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import K8S_VERSION, KUBE, ROOT, ClientThreads, build, kustomization

from deploy.canary import Canary, FleetView, Thresholds
from deploy.local_fleet import Fleet
from export.repository import versions
from serve.versions import current, seal
from serve.versions import serve as pin_version

fleet_test = pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy (make haproxy)")

CROP = 64  # tests/conftest.py's tiny model
SHARE = 0.25  # of the traffic for the canary
THRESHOLDS = Thresholds(window_s=15, min_requests=30, min_failures=3, tick_s=0.5)
CLIENT_TIMEOUT_S = 30.0
THREADS = ("grpc", "grpc", "http", "http")


# -- versions ----------------------------------------------------------------------------------------------
def add_good_version(repo: Path) -> int:
    """The next version: version 1's files, with their completion record (as a sync tool copies them)."""
    model = repo / "threegnet"
    version = max(versions(model)) + 1
    shutil.copytree(model / "1", model / str(version))
    return version


def add_failing_version(repo: Path) -> int:
    """The next version: the model with a fault that zeros never reach (the export's check, the launcher's
    smoke inference and Triton's warmup all send zeros): for a batch whose mean pixel value is above 127.5
    it gathers an element out of range, and onnxruntime fails the whole batch. Sealed by serve/versions.py,
    which checks it as the launcher does."""
    import onnx
    from onnx import TensorProto, helper

    model_dir = repo / "threegnet"
    graph_model = onnx.load(str(model_dir / "1" / "model.onnx"))
    g = graph_model.graph
    for node in g.node:
        node.output[:] = ["fault_probabilities_ok" if o == "probabilities" else o for o in node.output]
    const = [
        helper.make_tensor("fault_half", TensorProto.FLOAT, [], [127.5]),
        helper.make_tensor("fault_ten", TensorProto.INT64, [], [10]),
        helper.make_tensor("fault_one_dim", TensorProto.INT64, [1], [1]),
        helper.make_tensor("fault_zero", TensorProto.FLOAT, [], [0.0]),
    ]
    g.initializer.extend(const)
    g.node.extend([
        helper.make_node("Cast", ["image"], ["fault_image_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["fault_image_f"], ["fault_mean"], keepdims=0),
        helper.make_node("Greater", ["fault_mean", "fault_half"], ["fault_bright"]),
        helper.make_node("Cast", ["fault_bright"], ["fault_bright_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["fault_bright_i", "fault_ten"], ["fault_index0"]),
        helper.make_node("Reshape", ["fault_index0", "fault_one_dim"], ["fault_index"]),
        helper.make_node("Gather", ["fault_probabilities_ok", "fault_index"], ["fault_picked"], axis=1),
        helper.make_node("Mul", ["fault_picked", "fault_zero"], ["fault_nothing"]),
        helper.make_node("Add", ["fault_probabilities_ok", "fault_nothing"], ["probabilities"]),
    ])  # fmt: skip
    version = max(versions(model_dir)) + 1
    (model_dir / str(version)).mkdir()
    onnx.save(graph_model, str(model_dir / str(version) / "model.onnx"))
    seal(model_dir, version)  # refuses a version that fails the launcher's check: this one passes it
    return version


def stable_version(repo: Path) -> int:
    served = current(repo / "threegnet")[1]
    assert len(served) == 1, served
    return served[0]


# -- load ------------------------------------------------------------------------------------------------
def images() -> list[np.ndarray]:
    """Dark images (mean ~50) and bright ones (mean ~155), alternating. The failing version fails a batch whose
    mean is above 127.5: a bright image alone or batched with bright ones; a dark one is answered even when Triton
    batches it with a bright one, so the bad version is seen answering as well as failing."""
    rng = np.random.default_rng(7)
    dark = [rng.integers(0, 101, (1, CROP, CROP, 3), dtype=np.uint8) for _ in range(4)]
    bright = [rng.integers(55, 256, (1, CROP, CROP, 3), dtype=np.uint8) for _ in range(4)]
    return [x for pair in zip(dark, bright, strict=True) for x in pair]


def plain_client(protocol: str, url: str) -> Any:
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(url)
    return httpclient.InferenceServerClient(url, connection_timeout=CLIENT_TIMEOUT_S, network_timeout=CLIENT_TIMEOUT_S)


def classify(client: Any, protocol: str, x: np.ndarray, version: str = "") -> str:
    """The version that answered; raises on an error or an answer that is not finite probabilities."""
    module = grpcclient if protocol == "grpc" else httpclient
    inp = module.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    timeout = {"client_timeout": CLIENT_TIMEOUT_S} if protocol == "grpc" else {}
    result = client.infer("threegnet", [inp], model_version=version, **timeout)
    p = result.as_numpy("probabilities")
    if p is None or not np.isfinite(p).all() or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-3):
        raise AssertionError(f"not probabilities: {p}")
    response = result.get_response()
    return response.model_version if protocol == "grpc" else response["model_version"]


class Load(ClientThreads):
    """Plain clients through HAProxy, back to back: (time, protocol, version that answered, error)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.images = fleet, images()
        super().__init__(THREADS, join_timeout=2 * CLIENT_TIMEOUT_S)

    def client(self, protocol: str) -> Any:
        return plain_client(protocol, self.fleet.grpc_url if protocol == "grpc" else self.fleet.http_url)

    def send(self, client: Any, protocol: str, n: int) -> str:
        return classify(client, protocol, self.images[n % len(self.images)])

    def outcome(self, protocol: str, start: float, result: str | None, error: str | None) -> tuple:
        return time.monotonic(), protocol, result or "", error

    def wait_for(self, count: int, timeout: float = 60) -> None:
        target, deadline = len(self.outcomes) + count, time.monotonic() + timeout
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"the load stalled: {self.failures()[:3]}"
            time.sleep(0.05)

    def failures(self, since: float = 0.0) -> list[str]:
        return [f"{p} at {t:.1f}: {e}" for t, p, _, e in self.outcomes if e and t >= since]

    def answered_by(self, version: int, since: float = 0.0, until: float = math.inf) -> int:
        return sum(1 for t, _, v, e in self.outcomes if since <= t <= until and not e and v == str(version))

    def rate(self, since: float, until: float) -> float:
        return sum(1 for t, *_ in self.outcomes if since <= t <= until) / (until - since)


# -- the fleet ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the exported repository, its fleet pinned to version 1 (how a canary starts: docs/deploy.md)."""
    repo = tmp_path_factory.mktemp("canary") / "repo"
    shutil.copytree(model_repository, repo)
    pin_version(repo / "threegnet", "1")
    return repo


@pytest.fixture(scope="module")
def fleet(repo: Path):
    with Fleet(repo, replicas=2) as fleet:
        yield fleet


def serving_everywhere(fleet: Fleet) -> list[tuple[str, list[str], str]]:
    """Each replica, asked on its own ports: the versions READY in its repository index (the control plane,
    with the fleet's key) and the version that answers an inference."""
    seen = []
    for r in fleet.replicas:
        request = urllib.request.Request(f"http://127.0.0.1:{r.http_port}/v2/repository/index", data=b"{}",
                                         method="POST", headers=fleet.control_headers)  # fmt: skip
        rows = json.loads(urllib.request.urlopen(request, timeout=10).read())
        ready = sorted(m["version"] for m in rows if m["name"] == "threegnet" and m.get("state") == "READY")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{r.http_port}", network_timeout=CLIENT_TIMEOUT_S)
        seen.append((r.name, ready, classify(client, "http", images()[0])))
        client.close()
    return seen


def weights(fleet: Fleet) -> set[str]:
    return {fleet.admin(f"get weight {b}/{r.name}").strip() for b in ("triton_http", "triton_grpc")
            for r in fleet.replicas}  # fmt: skip


@dataclass
class Judged:
    """A canary started under load and left to ``watch``: what the clients saw, the controller's log
    (monotonic time, line), and when it started, began to be judged, and was decided."""

    canary: Canary
    load: Load
    promoted: bool
    verdict: Any
    lines: list[tuple[float, str]]
    started: float
    judged: float
    done: float


def judged_under_load(fleet: Fleet, version: int) -> Judged:
    lines: list[tuple[float, str]] = []
    canary = Canary(FleetView.load(fleet.description), log=lambda line: lines.append((time.monotonic(), line)))
    with Load(fleet) as load:
        load.wait_for(20)
        started = time.monotonic()
        canary.start(version, share=SHARE)
        judged = time.monotonic()
        promoted, verdict = canary.watch(THRESHOLDS)
        done = time.monotonic()
        load.wait_for(40)
    print("\n".join(f"+{t - started:5.1f} s {line}" for t, line in lines))
    return Judged(canary, load, promoted, verdict, lines, started, judged, done)


@pytest.mark.slow
@fleet_test
def test_a_good_version_is_promoted_under_load_with_no_failed_request(fleet, repo):
    old, new = stable_version(repo), add_good_version(repo)
    run = judged_under_load(fleet, new)
    load, verdict, judged, done = run.load, run.verdict, run.judged, run.done
    assert run.promoted, verdict.line()
    assert not load.failures(), load.failures()[:5]
    assert verdict.failures == 0 and verdict.requests >= THRESHOLDS.min_requests
    # While it was judged, both versions answered, the new one for about its share.
    decided = next(t for t, line in run.lines if "promoting" in line)
    on_new, on_old = load.answered_by(new, judged, decided), load.answered_by(old, judged, decided)
    print(f"judged: {on_new} answers from version {new}, {on_old} from {old} ({on_new / (on_new + on_old):.0%}; "
          f"share {SHARE:.0%}); started in {judged - run.started:.1f} s, judged for {decided - judged:.1f} s, promoted "
          f"{done - decided:.1f} s later")  # fmt: skip
    assert on_new > 0 and on_old > on_new
    after = [o for o in load.outcomes if o[0] > done]
    assert after and all(v == str(new) for _, _, v, _ in after)
    assert serving_everywhere(fleet) == [(r.name, [str(new)], str(new)) for r in fleet.replicas]
    assert stable_version(repo) == new and run.canary.state() is None
    assert weights(fleet) == {"1 (initial 1)"}


@pytest.mark.slow
@fleet_test
def test_a_version_that_fails_real_requests_is_rolled_back_on_its_own_within_a_bounded_cost(fleet, repo):
    old, bad = stable_version(repo), add_failing_version(repo)
    run = judged_under_load(fleet, bad)
    load, verdict, judged, done = run.load, run.verdict, run.judged, run.done
    assert not run.promoted and verdict.breach and "failed" in verdict.breach, verdict.line()
    failed = load.failures(run.started)
    # What the clients saw failed: the canary's failures before a look could see enough of them, plus what its
    # share of the traffic sent it in one look and the time to act on it, plus one in flight per client.
    rate = load.rate(run.started, done)
    bound = THRESHOLDS.min_failures + math.ceil(SHARE * rate * (THRESHOLDS.tick_s + 1.0)) + len(THREADS)
    decided = next(t for t, line in run.lines if "rolling back" in line)
    print(f"breach seen {decided - judged:.1f} s after the canary began serving, rolled back {done - decided:.1f} s "
          f"later; the controller counted {verdict.failures} failed of {verdict.requests}; the clients saw "
          f"{len(failed)} failures (bound {bound} at {rate:.0f} requests/s); {failed[:1]}")  # fmt: skip
    assert verdict.failures >= THRESHOLDS.min_failures
    assert len(failed) <= bound, failed
    assert load.answered_by(bad, run.started, done) > 0  # it served traffic: passed the checks, failed bright images
    assert not load.failures(done), load.failures(done)[:5]
    after = [o for o in load.outcomes if o[0] > done]
    assert after and all(v == str(old) for _, _, v, _ in after)
    assert serving_everywhere(fleet) == [(r.name, [str(old)], str(old)) for r in fleet.replicas]
    assert stable_version(repo) == old and run.canary.state() is None
    assert weights(fleet) == {"1 (initial 1)"}


def canary_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "canary.py"), "--fleet", str(fleet.work), *args],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)  # fmt: skip


@pytest.mark.slow
@fleet_test
def test_the_command_starts_aborts_and_promotes_a_canary_by_hand(fleet, repo):
    old, new = stable_version(repo), add_good_version(repo)
    with Load(fleet) as load:
        load.wait_for(10)
        started = canary_cli(fleet, "start", "--version", str(new), "--share", "0.5")
        assert started.returncode == 0, started.stderr
        assert canary_cli(fleet, "start", "--version", str(new)).returncode == 2  # one at a time
        load.wait_for(20)
        status = canary_cli(fleet, "status")
        assert status.returncode == 0 and f"version {new} at 50%" in status.stdout, status.stdout + status.stderr
        assert {v for _, v in serving_everywhere_names(fleet)} == {str(old), str(new)}
        aborted = canary_cli(fleet, "abort")
        assert aborted.returncode == 0 and "rolled back" in aborted.stderr, aborted.stderr
        assert serving_everywhere(fleet) == [(r.name, [str(old)], str(old)) for r in fleet.replicas]
        assert canary_cli(fleet, "status").stdout.strip() == "no canary under way"

        assert canary_cli(fleet, "start", "--version", str(new)).returncode == 0
        load.wait_for(10)
        promoted = canary_cli(fleet, "promote")
        assert promoted.returncode == 0 and "promoted" in promoted.stderr, promoted.stderr
        load.wait_for(20)
    print(started.stderr + aborted.stderr + promoted.stderr)
    assert not load.failures(), load.failures()[:5]
    assert serving_everywhere(fleet) == [(r.name, [str(new)], str(new)) for r in fleet.replicas]
    assert stable_version(repo) == new and weights(fleet) == {"1 (initial 1)"}


def serving_everywhere_names(fleet: Fleet) -> list[tuple[str, str]]:
    return [(name, answered) for name, _, answered in serving_everywhere(fleet)]


# -- the same in Kubernetes: deploy/kubernetes/canary --------------------------------------------------------
def canary_resources() -> dict[tuple[str, str], dict]:

    return {(r["kind"], r["metadata"]["name"]): r for r in build(KUBE / "canary")}


def test_the_canary_overlay_builds_into_valid_resources_beside_the_fleet():
    import kubernetes_validate

    resources = canary_resources()
    assert set(resources) == {("ConfigMap", "threegnet-canary-pins"), ("Deployment", "threegnet-triton-canary"),
                              ("Service", "threegnet-triton-canary"), ("NetworkPolicy", "threegnet-triton-canary"),
                              ("Ingress", "threegnet-http-canary"), ("Ingress", "threegnet-grpc-canary")}  # fmt: skip
    for resource in resources.values():
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        assert resource["metadata"]["namespace"] == kustomization(KUBE / "base")["namespace"]
    # Applied beside the fleet and deleted after: it names none of the fleet's resources.
    assert not {(r["kind"], r["metadata"]["name"]) for r in build(KUBE)} & set(resources)
    assert kustomization(KUBE / "canary")["images"] == kustomization(KUBE / "base")["images"]
    if shutil.which("kubectl") is not None:
        built = subprocess.run(["kubectl", "kustomize", str(KUBE / "canary")], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert built.returncode == 0, built.stderr
        import yaml

        assert {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built.stdout) if d} == set(resources)


def test_the_canary_pod_is_the_stable_pod_pinned_to_the_candidate(tmp_path):

    from serve.launch import parse_args
    from serve.supervisor import read_pins

    canary = canary_resources()[("Deployment", "threegnet-triton-canary")]
    stable = next(r for r in build(KUBE) if r["kind"] == "Deployment")
    name = "app.kubernetes.io/name"
    labels = canary["spec"]["template"]["metadata"]["labels"]
    assert canary["spec"]["selector"]["matchLabels"] == {name: labels[name]} and labels[name] != "threegnet-triton"
    pod, stable_pod = canary["spec"]["template"]["spec"], stable["spec"]["template"]["spec"]
    c, sc = pod["containers"][0], stable_pod["containers"][0]
    args = parse_args(c["args"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "pins")
    assert mount["readOnly"] and str(args.version_pins) == f"{mount['mountPath']}/pins"
    pins = next(v for v in pod["volumes"] if v["name"] == "pins")["configMap"]
    config_map = canary_resources()[("ConfigMap", pins["name"])]
    (tmp_path / "pins").write_text(config_map["data"]["pins"])
    assert read_pins(tmp_path / "pins") == {"threegnet": 2}
    # Everything else is the stable pod's: security context, probes, resources, the repository, the key.
    assert c["args"] == [*sc["args"], "--version-pins", str(args.version_pins)]
    assert {k: v for k, v in c.items() if k not in ("args", "volumeMounts")} == {
        k: v for k, v in sc.items() if k not in ("args", "volumeMounts")
    }
    assert [m for m in c["volumeMounts"] if m["name"] != "pins"] == sc["volumeMounts"]
    assert [v for v in pod["volumes"] if v["name"] != "pins"] == stable_pod["volumes"]
    assert {k: v for k, v in pod.items() if k not in ("containers", "volumes")} == {
        k: v for k, v in stable_pod.items() if k not in ("containers", "volumes")
    }


def test_the_canary_ingresses_send_a_weight_of_the_stable_paths_to_the_canary_only():

    resources, fleet = canary_resources(), build(KUBE)
    pod_labels = resources[("Deployment", "threegnet-triton-canary")]["spec"]["template"]["metadata"]["labels"]
    service = resources[("Service", "threegnet-triton-canary")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    stable_service = next(r for r in fleet if r["kind"] == "Service")
    assert not stable_service["spec"]["selector"].items() <= pod_labels.items()  # the Service of the fleet: not it
    assert {p["name"] for p in service["spec"]["ports"]} == {p["name"] for p in stable_service["spec"]["ports"]}
    policy = resources[("NetworkPolicy", "threegnet-triton-canary")]["spec"]
    stable_policy = next(r for r in fleet if r["kind"] == "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {k: v for k, v in policy.items() if k != "podSelector"} == {
        k: v for k, v in stable_policy.items() if k != "podSelector"
    }
    prefix = "nginx.ingress.kubernetes.io/"
    for stable_name in ("threegnet-http", "threegnet-grpc"):
        main = next(r for r in fleet if r["kind"] == "Ingress" and r["metadata"]["name"] == stable_name)
        canary = resources[("Ingress", f"{stable_name}-canary")]
        annotations = canary["metadata"]["annotations"]
        assert annotations[prefix + "canary"] == "true" and 0 <= int(annotations[prefix + "canary-weight"]) <= 100
        # ingress-nginx pairs a canary with the main Ingress of the same host and path
        assert [r["host"] for r in canary["spec"]["rules"]] == [r["host"] for r in main["spec"]["rules"]]
        paths = [p for r in canary["spec"]["rules"] for p in r["http"]["paths"]]
        main_paths = [p for r in main["spec"]["rules"] for p in r["http"]["paths"]]
        assert [(p["path"], p["pathType"], p["backend"]["service"]["port"]) for p in paths] == [
            (p["path"], p["pathType"], p["backend"]["service"]["port"]) for p in main_paths
        ]
        assert {p["backend"]["service"]["name"] for p in paths} == {service["metadata"]["name"]}
