"""Seeing what the fleet does: the alert rules (one source, unit-tested with promtool), the operator's
manifests (checked against the operator's own schemas), the Grafana dashboard, the autoscaler's metric
(the Prometheus adapter's rule, expanded), and then all of it against a real Prometheus scraping the
rehearsal's replicas (deploy/local_fleet.py --prometheus): the metric below the HPA's target at idle and
above it at twice the capacity, the overload and replica-down alerts firing and resolving, every
dashboard panel with data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from helpers import ROOT, documents, png

from export.triton_config import MAX_QUEUE_SIZE
from serve.endpoints import METRICS_PATH, METRICS_PORT, SUPERVISOR_METRICS_PORT

MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
RULES = MONITORING / "rules.yml"
SERVICE_MONITOR = MONITORING / "servicemonitor.yaml"
DASHBOARD = MONITORING / "dashboard.json"
ADAPTER_RULES = ROOT / "deploy" / "kubernetes" / "prometheus-adapter-rules.yaml"
HPA = ROOT / "deploy" / "kubernetes" / "base" / "hpa.yaml"
SERVICE = ROOT / "deploy" / "kubernetes" / "base" / "service.yaml"
JOB = "threegnet-triton"
# Panels on metrics nothing exports yet, or that this machine cannot have: the only ones allowed to be
# empty in the rehearsal (and they must be: a panel that gets data belongs with the others).
PANELS_WITHOUT_DATA = {
    "GPU utilization": "nv_gpu_utilization: no GPU in the rehearsal",
}


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def adapter_rule() -> dict:
    (config_map,) = documents(ADAPTER_RULES)
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    return rule


def adapter_query(matchers: str, group_by: str) -> str:
    """The adapter rule's metricsQuery as the adapter expands it (Go template: ``<<.LabelMatchers>>``...)."""
    query = adapter_rule()["metricsQuery"]
    query = query.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)
    assert "<<" not in query, query
    return query


def hpa_target_us() -> float:
    (hpa,) = documents(HPA)
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["metric"]["name"] == adapter_rule()["name"]["as"]  # the HPA reads what the rule serves
    return float(pods["target"]["averageValue"])


def panel_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL, with Grafana's ``$__rate_interval`` as the rehearsal's one minute."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        p["title"]: [t["expr"].replace("$__rate_interval", "1m") for t in p["targets"]] for p in dashboard["panels"]
    }


# -- the rules, the manifests and the dashboard, without a server ------------------------------------------


def test_the_plain_rules_file_is_the_prometheus_rules_spec_word_for_word():
    check = subprocess.run([sys.executable, str(MONITORING / "generate_rules.py"), "--check"], capture_output=True,
                           text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    (rule,) = documents(PROMETHEUS_RULE)
    assert yaml.safe_load(RULES.read_text()) == rule["spec"]


def test_promtool_accepts_the_rules_and_every_alert_unit_test_passes():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((MONITORING / "tests").glob("*.yml"))
    assert tests
    run = subprocess.run(["promtool", "test", "rules", *map(str, tests)], capture_output=True, text=True,
                         cwd=MONITORING / "tests")  # fmt: skip
    assert run.returncode == 0 and "SUCCESS" in run.stdout + run.stderr, run.stdout + run.stderr


def test_every_alert_is_unit_tested_both_firing_and_silent():
    cases = [
        case
        for path in (MONITORING / "tests").glob("*.yml")
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it stays silent"


def test_the_production_for_durations_are_minutes_and_documented():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for rule in alert_rules():
        assert rule["alert"] in doc, f"{rule['alert']} is not in docs/monitoring.md"
        wait = rule.get("for", "0s")
        assert re.fullmatch(r"\d+m", wait) or rule["alert"] == "ThreegnetBackendHealedRepeatedly", (rule, wait)
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def strict(schema: object) -> object:
    """kubernetes-validate's --strict, for a CRD's schema: no property the schema does not name."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.mark.parametrize(
    "manifest, schema", [(PROMETHEUS_RULE, "prometheusrules"), (SERVICE_MONITOR, "servicemonitors")]
)
def test_the_operators_kinds_pass_their_own_crd_schemas_since_kubernetes_validate_has_none(manifest, schema):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", "1.37.0", str(manifest)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # kubernetes-validate knows only Kubernetes' own kinds: for these it warns and checks nothing.
    assert "Couldn't find schema" in result.stdout + result.stderr and "passed" not in result.stdout
    crd = strict(json.loads((MONITORING / "crd-schemas" / f"{schema}.json").read_text()))
    (document,) = documents(manifest)
    validator = jsonschema.Draft7Validator(crd)  # OpenAPI v3's schemas are (nearly) draft 7; Go's regexes are not
    validator.validate(document)  # raises on a misspelt or misplaced field
    with pytest.raises(jsonschema.ValidationError):  # and the check can fail
        validator.validate({**document, "spec": {**document["spec"], "bogus": 1}})
    assert document["metadata"]["namespace"] == "threegnet"


def test_the_service_monitor_scrapes_the_services_metrics_port():
    (monitor,) = documents(SERVICE_MONITOR)
    (service,) = documents(SERVICE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert service["metadata"]["name"] == JOB  # the operator names the job after the Service: the rules' job
    # Triton's metrics and the launcher's own (the supervisor's heals, rollouts, refused versions).
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    scraped = {ports[e["port"]] for e in monitor["spec"]["endpoints"] if e["path"] == METRICS_PATH}
    assert scraped == {METRICS_PORT, SUPERVISOR_METRICS_PORT}
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["prometheus-rule.yaml", "servicemonitor.yaml"]


def test_every_dashboard_panel_has_a_query_that_promtool_parses(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {"name": "datasource", "type": "datasource"}.items() <= dashboard["templating"]["list"][0].items()
    queries = panel_queries()
    assert set(PANELS_WITHOUT_DATA) < set(queries)
    wanted = ["Throughput", "p99", "Queue time", "Refusals", "Compute", "healed", "Rejected uploads"]
    assert all(any(w in title for title in queries) for w in wanted), list(queries)
    # PromQL syntax: as recording rules, which promtool parses.
    exprs = [q for qs in queries.values() for q in qs]
    rules = {
        "groups": [{"name": "panels", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "panels.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_adapter_rule_is_per_model_then_the_largest_and_the_hpa_reads_it():
    rule = adapter_rule()
    query = adapter_query('namespace="threegnet",pod=~"a|b"', "pod")
    assert query.startswith("max by (pod) (") and "by (pod, model)" in query
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert 0 < hpa_target_us() < 1_500_000  # below the queue timeout at which Triton refuses


# -- a real Prometheus beside the rehearsal ---------------------------------------------------------------


def prometheus_available() -> bool:
    return shutil.which("prometheus") is not None and shutil.which("haproxy") is not None


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as r:
            answer = json.loads(r.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def values(self, expr: str, label: str = "replica") -> dict[str, float]:
        """One value per ``label`` value (a query that returns two for one is a wrong query)."""
        result = self.query(expr)
        values = {r["metric"].get(label, ""): float(r["value"][1]) for r in result}
        assert len(values) == len(result), f"{expr}: more than one series per {label}: {result}"
        return values

    def alerts(self, name: str, state: str = "firing") -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name and
                a["state"] == state]  # fmt: skip

    def wait(self, what: str, condition, timeout: float, detail=lambda: ""):
        """``detail()``: more for the failure's message (what the test offered, say)."""
        start = time.monotonic()
        while not (result := condition()):
            assert time.monotonic() - start < timeout, f"{what}: not within {timeout:.0f} s; {self.state()} {detail()}"
            time.sleep(0.5)
        return time.monotonic() - start, result

    def state(self) -> str:
        """What Prometheus sees now, for a failure's message."""
        alerts = [(a["labels"]["alertname"], a["labels"].get("instance"), a["state"])
                  for a in self.get("/api/v1/alerts")["alerts"]]  # fmt: skip
        return f"up {self.query('up')}, alerts {alerts}"


class OpenLoop(threading.Thread):
    """Requests through the load balancer at a fixed rate, whatever the answers: users, not a benchmark."""

    def __init__(self, url: str, rate: float, model: str = "threegnet") -> None:
        super().__init__(daemon=True)
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        self.inputs = [grpcclient.InferInput("image", list(x.shape), "UINT8")]
        self.inputs[0].set_data_from_numpy(x)
        self.rate, self.model, self.halt = rate, model, threading.Event()
        self.ok = self.refused = self.sent = 0
        self.errors: list[str] = []

    def _done(self, result, error) -> None:
        if error is None:
            self.ok += 1
        elif "Exceeds maximum queue size" in error.message() or "Request timeout expired" in error.message():
            self.refused += 1
        else:
            self.errors.append(error.message())

    def run(self) -> None:
        self.started = start = time.monotonic()
        while not self.halt.is_set():
            time.sleep(max(0.0, start + self.sent / self.rate - time.monotonic()))
            self.client.async_infer(self.model, self.inputs, self._done, client_timeout=30)
            self.sent += 1

    def stop(self) -> float:
        """Stop sending; the rate actually offered (a busy machine may send slower than asked)."""
        self.halt.set()
        self.join(timeout=10)
        offered = self.sent / (time.monotonic() - self.started)
        time.sleep(2)  # the last answers
        self.client.close()
        return offered


def closed_loop_capacity(url: str, seconds: float = 8, threads: int = 4) -> float:
    """Requests per second the fleet answers to ``threads`` clients sending back to back."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    answered = [0] * threads
    end = time.monotonic() + seconds

    def loop(k: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = [grpcclient.InferInput("image", list(x.shape), "UINT8")]
        inputs[0].set_data_from_numpy(x)
        while time.monotonic() < end:
            client.infer("threegnet", inputs, client_timeout=30)
            answered[k] += 1
        client.close()

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(answered) / seconds


@pytest.fixture(scope="module")
def fleet(model_repository):
    if not prometheus_available():
        pytest.fail("needs Debian's prometheus and haproxy: make prometheus haproxy")
    from deploy.local_fleet import Fleet

    with Fleet(model_repository, replicas=2, prometheus=True, alert_for="1s") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def prometheus(fleet) -> Prometheus:
    prometheus = Prometheus(fleet.prometheus_url)
    for endpoint in ("metrics", "supervisor"):
        prometheus.wait(
            f"both replicas' {endpoint} port scraped",
            lambda e=endpoint: prometheus.values(f'up{{job="{JOB}", endpoint="{e}"}}') == {"r0": 1, "r1": 1},
            30,
        )
    return prometheus


@pytest.mark.slow
def test_prometheus_scrapes_every_replica_by_name_with_latency_quantiles(fleet, prometheus):
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert {(t["labels"]["replica"], t["labels"]["endpoint"]): t["scrapeUrl"] for t in targets} == {
        (r.name, endpoint): f"http://127.0.0.1:{port}{METRICS_PATH}"
        for r in fleet.replicas
        for endpoint, port in (("metrics", r.metrics_port), ("supervisor", r.supervisor_metrics_port))
    }  # as the ServiceMonitor: Triton's port and the launcher's, one job
    assert all(t["health"] == "up" and t["labels"]["job"] == JOB for t in targets), [
        (t["scrapeUrl"], t["health"], t["lastError"]) for t in targets
    ]
    # The supervisor's counters, zeros included from the start: the heals alert and panel work from the first heal.
    heals = prometheus.values('threegnet_supervisor_heals_total{endpoint="supervisor", model="threegnet"}')
    assert heals == {"r0": 0.0, "r1": 0.0}
    # The summaries the p99 alert and panel read (Triton's --metrics-config summary_latencies=true).
    quantiles = prometheus.values(f'nv_inference_request_summary_us{{job="{JOB}", quantile="0.99", model="threegnet"}}')
    assert set(quantiles) == {"r0", "r1"}
    loaded = {g["file"] for g in prometheus.get("/api/v1/rules")["groups"]}
    assert loaded == {str(fleet.work / "rules.yml")}
    names = {r["name"] for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]}
    assert names == {r["alert"] for r in alert_rules()}


@pytest.mark.slow
def test_the_autoscalers_metric_is_below_target_at_idle_above_it_at_twice_capacity_and_overload_alerts(
    fleet, prometheus
):
    query = adapter_query(f'job="{JOB}",replica=~"r0|r1"', "replica")
    target = hpa_target_us()
    time.sleep(3)
    idle = prometheus.values(query)
    assert set(idle) == {"r0", "r1"} and all(v < target for v in idle.values()), idle
    assert not prometheus.alerts("ThreegnetOverloaded", "pending") + prometheus.alerts("ThreegnetOverloaded")
    # Triton counts a full queue's refusals nowhere: the alert reads the queue's fill against the size the
    # launcher exports from the config it loaded (a fast model's full queue waits too little for the mean wait).
    sizes = prometheus.values(f'threegnet_model_max_queue_size{{job="{JOB}", model="threegnet"}}')
    assert sizes == {"r0": MAX_QUEUE_SIZE, "r1": MAX_QUEUE_SIZE}, sizes

    capacity = closed_loop_capacity(fleet.grpc_url)
    light = OpenLoop(fleet.grpc_url, capacity / 2)  # half the capacity: busy, not overloaded
    light.start()
    time.sleep(20)
    half = prometheus.values(query)
    offered_half = light.stop()
    overload = [OpenLoop(fleet.grpc_url, 2 * capacity)]
    overload[0].start()
    try:
        time.sleep(20)
        if not overload[0].refused:  # the closed loop under-measured what batching can do: offer more
            overload.append(OpenLoop(fleet.grpc_url, 2 * capacity))
            overload[-1].start()
        fired, firing = prometheus.wait(
            "ThreegnetOverloaded fires",
            lambda: prometheus.alerts("ThreegnetOverloaded"),
            90,
            lambda: (
                f"capacity {capacity:.1f} req/s, offered {2 * capacity * len(overload):.1f} req/s, "
                f"refused {sum(o.refused for o in overload)} of {sum(o.sent for o in overload)}"
            ),
        )
        time.sleep(max(0.0, 10 - fired))  # half a minute into the overload: the 1 m window mostly overload
        busy = prometheus.values(query)
        p99 = prometheus.values(f'max by (replica) (nv_inference_request_summary_us{{job="{JOB}", model="threegnet", '
                                f'quantile="0.99"}})')  # fmt: skip
    finally:
        offered = sum(o.stop() for o in overload)
    sent, ok, refused = (sum(getattr(o, a) for o in overload) for a in ("sent", "ok", "refused"))
    errors = [e for o in overload for e in o.errors]
    resolved, _ = prometheus.wait(
        "ThreegnetOverloaded resolves", lambda: not prometheus.alerts("ThreegnetOverloaded", "firing"), 150
    )
    print(f"\ncapacity {capacity:.1f} req/s, offered {offered_half:.1f} and {offered:.1f} req/s; "
          f"adapter metric (us per request) idle {idle}, at 0.5x {half}, "
          f"at {offered / capacity:.1f}x {busy} (target {target:.0f}); p99 there {p99} us; {sent} sent, {ok} answered, "
          f"{refused} refused; ThreegnetOverloaded fired {20 + fired:.0f} s into the overload on "
          f"{sorted(a['labels']['instance'] for a in firing)}, resolved {resolved:.0f} s after it")  # fmt: skip
    assert not errors and not light.errors, (errors + light.errors)[:3]
    assert refused > 0  # it was an overload: Triton refused
    assert all(v < target for v in half.values()), half
    assert set(busy) == {"r0", "r1"} and all(v > target for v in busy.values()), busy
    assert {a["labels"]["model"] for a in firing} == {"threegnet"}


@pytest.mark.slow
def test_a_sigkilled_replica_fires_replica_down_which_resolves_after_its_restart(fleet, prometheus):
    victim = fleet.replicas[1]
    assert not prometheus.alerts("ThreegnetReplicaDown"), prometheus.state()

    def victim_down() -> list[dict]:
        return [a for a in prometheus.alerts("ThreegnetReplicaDown") if a["labels"]["replica"] == victim.name]

    with fleet.held(victim.name):  # not restarted until the alert fired: a restart can beat a short `for:`
        os.kill(victim.triton_pid(), signal.SIGKILL)
        fired, firing = prometheus.wait("ThreegnetReplicaDown fires for the victim", victim_down, 120)
    assert [a["labels"]["instance"] for a in firing] == [f"127.0.0.1:{victim.metrics_port}"]
    resolved, _ = prometheus.wait("ThreegnetReplicaDown resolves", lambda: not victim_down(), 300)
    victim.wait_ready()
    print(f"\nThreegnetReplicaDown fired {fired:.1f} s after the SIGKILL, resolved {resolved:.1f} s after that")
    both_up = {"r0": 1, "r1": 1}
    prometheus.wait(
        "both replicas scraped again",
        lambda: prometheus.values(f'up{{job="{JOB}", endpoint="metrics"}}') == both_up,
        30,
    )
    prometheus.wait("every alert resolved", lambda: not prometheus.get("/api/v1/alerts")["alerts"], 30)


@pytest.mark.slow
def test_every_dashboard_panel_has_data_except_those_on_metrics_not_exported_yet(fleet, prometheus):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from client.inference import TritonClassifier

    # Some traffic on every path: tensors and image files (the ensemble and the preprocessing model).
    classifier = TritonClassifier(fleet.grpc_url, "grpc")
    for i in range(10):
        classifier.classify_tensors(np.random.default_rng(i).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
        classifier.classify_bytes([png(80, 80, seed=i)])
    # And uploads that are no image: the preprocessing model refuses them, by reason.
    client = grpcclient.InferenceServerClient(fleet.grpc_url)
    upload = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    upload.set_data_from_numpy(np.array([b"not an image at all"], dtype=object).reshape(1, 1))
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("threegnet_image", [upload], client_timeout=30)
    client.close()
    time.sleep(5)
    (rejected,) = panel_queries()["Rejected uploads by reason"]
    assert sum(float(r["value"][1]) for r in prometheus.query(rejected)) > 0, prometheus.query(rejected)
    empty = {title for title, queries in panel_queries().items() if not all(prometheus.query(q) for q in queries)}
    assert empty == set(PANELS_WITHOUT_DATA), (
        f"empty: {sorted(empty)}; only {sorted(PANELS_WITHOUT_DATA)} may be (and must be: once their metric "
        "exists, take them off PANELS_WITHOUT_DATA)"
    )
