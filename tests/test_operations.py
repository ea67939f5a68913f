"""What production does to a server, done to a real one: a backend process SIGKILLed under load,
bursts far over capacity, a new version exported while serving, a rollback. No timing asserts:
the tests check what happened and in what order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from helpers import (
    CROP,
    ROOT,
    TINY_CLASSES,
    TINY_PREPROCESSING,
    Load,
    http_status,
    infer_bytes,
    infer_tensor,
    png,
    server_on,
    tensor,
    wait_until,
)
from tritonclient.utils import InferenceServerException

from client.inference import OVERLOAD_MESSAGES, ServerOverloaded, TritonClassifier
from serve.server import TritonServer, free_port
from serve.supervisor import backend_processes


def overload_error(message: str) -> bool:
    """Triton's admission control: the queue was full, or the request waited past the queue timeout."""
    return any(m in message for m in OVERLOAD_MESSAGES)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["threegnet", "threegnet_preprocess"])
def test_a_killed_backend_process_heals_itself_and_readiness_never_lies(own_repository, model):
    blob = png(80, 80)
    with server_on(own_repository, supervisor_metrics_port=free_port()) as server:
        load = Load(server, lambda c: infer_bytes(c, blob))  # through the ensemble: needs both models
        # Each probe samples on its own thread, so that one held answer does not blind the others.
        probes = {"server": (server.http_port, "/v2/health/ready"),
                  "model": (server.http_port, "/v2/models/threegnet_image/ready"),
                  "launcher": (server.supervisor_metrics_port, "/v2/health/ready")}  # fmt: skip
        readiness: list[tuple[float, float, str, int]] = []  # (asked, answered, probe, status)
        sampling = threading.Event()

        def sample(probe: str) -> None:
            port, path = probes[probe]
            while not sampling.is_set():
                asked = time.monotonic()
                status = http_status(server, path, port)
                readiness.append((asked, time.monotonic(), probe, status))
                time.sleep(0.02)

        samplers = [threading.Thread(target=sample, args=(p,), daemon=True) for p in probes]
        load.start()
        for sampler in samplers:
            sampler.start()
        wait_until(lambda: len(load.results) >= 5, 60, "the load is answered")
        victim = next(p for p in backend_processes(server.process.pid) if p.model == model)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)  # as the kernel's OOM killer would

        # Serving resumes by itself: a request that started after the kill succeeds again.
        wait_until(lambda: any(r[0] > killed_at and r[2] is None for r in load.results[-3:])
                   and server.supervisor.heals == 1, 120, "serving resumes")  # fmt: skip
        time.sleep(0.5)
        load.stop()
        sampling.set()
        for sampler in samplers:
            sampler.join(timeout=10)
            assert not sampler.is_alive()
        assert server.is_ready()
        [(healed_model, unloaded_at, serving_at)] = server.supervisor.outages
        # The heal is counted where Prometheus scrapes the launcher (serve/metrics.py).
        scraped = urllib.request.urlopen(server.supervisor_metrics_url, timeout=5).read().decode().splitlines()
        assert f'threegnet_supervisor_heals_total{{model="{model}"}} 1' in scraped, scraped

    assert healed_model == model
    failed = load.failures()
    assert failed, "the kill should have cost some requests"
    assert all(r[1] >= killed_at for r in failed), "nothing failed before the kill (one in flight may fail)"
    # They failed fast with an error that says what is wrong, instead of hanging.
    assert all(r[1] - r[0] < 10 for r in failed), max(r[1] - r[0] for r in failed)
    assert all("not healthy" in r[2] or "unknown model" in r[2] or "not ready" in r[2] for r in failed), failed[:3]
    # Honest readiness: from the supervisor's unload (it noticed the crash) until the model was loaded
    # again and requests stopped failing, every readiness answer, the server's, the model's and the
    # launcher's (serve/readiness.py, what the fleet and the pods probe), said so.
    # (The model is ready a moment before Triton's answer to the load reaches the supervisor.)
    until = max(serving_at - 0.2, max(r[0] for r in failed) - 0.05)
    during = [s for s in readiness if unloaded_at <= s[0] and s[1] < until]
    around = [(round(s[0] - killed_at, 3), round(s[1] - s[0], 3), *s[2:]) for s in readiness if s[1] > killed_at]
    assert during, ("no readiness answer between the unload and the reload", unloaded_at - killed_at, around[:40])
    lies = [(round(serving_at - s[1], 3), s) for s in during if s[3] == 200]
    assert not lies, lies[:5]
    assert {probe: status for _, _, probe, status in readiness} == dict.fromkeys(probes, 200)
    healed = next(r[0] for r in load.results if r[0] > killed_at and r[2] is None)
    print(f"detected after {unloaded_at - killed_at:.2f} s; serving again after {healed - killed_at:.2f} s "
          f"(reloaded after {serving_at - killed_at:.2f} s); {len(failed)} requests failed meanwhile")  # fmt: skip


@pytest.fixture(scope="module")
def tight_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with a tiny queue: one request at a time, one waiting."""
    from export.to_onnx import main as export_main

    repo = tmp_path_factory.mktemp("tight")
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo), "--max-batch-size", "1",
            "--max-queue-size", "1", "--queue-timeout-ms", "200"]  # fmt: skip
    assert export_main(args) == 0
    return repo


@pytest.fixture(scope="module")
def tight_server(tight_repository: Path):
    with server_on(tight_repository) as server:
        yield server


def failure_count(server: TritonServer) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('nv_inference_request_failure{model="threegnet"'))  # fmt: skip


@pytest.mark.slow
def test_a_burst_far_over_capacity_is_refused_with_the_overload_error_and_the_server_stays_ready(tight_server):
    request = urllib.request.Request(
        f"http://{tight_server.http_url}/v2/models/threegnet/config", headers=tight_server.control_headers
    )
    config = json.loads(urllib.request.urlopen(request, timeout=5).read())
    policy = config["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == 1 and policy["default_timeout_microseconds"] == 200_000

    client = grpcclient.InferenceServerClient(tight_server.grpc_url)
    inp = grpcclient.InferInput("image", [1, CROP, CROP, 3], "UINT8")
    inp.set_data_from_numpy(tensor())
    outcomes: list[tuple[str, str] | None] = []
    done = threading.Event()

    def callback(result, error) -> None:
        outcomes.append(None if error is None else (error.status(), error.message()))
        if len(outcomes) == 200:
            done.set()

    for _ in range(200):  # all at once: far over what one instance with a queue of 1 can hold
        client.async_infer("threegnet", [inp], callback)
    assert done.wait(timeout=120)
    refused = [o for o in outcomes if o is not None]
    assert refused and len(refused) < 200
    assert all(status == "StatusCode.UNAVAILABLE" and overload_error(message) for status, message in refused), refused[
        :3
    ]
    assert any("Exceeds maximum queue size" in message for _, message in refused)  # the bound did the shedding
    assert tight_server.is_ready()
    # And it answers what comes next. Triton 2.51's batcher can hold a lone request until its 500 ms wake-up,
    # past this server's 200 ms queue timeout, when the machine is busy: a refusal, so three tries.
    for attempt in range(3):
        try:
            infer_tensor(client)
            break
        except InferenceServerException as e:
            assert attempt < 2 and overload_error(e.message()), e
    client.close()


@pytest.mark.slow
def test_the_client_library_retries_overload_refusals(tight_server):
    """40 callers at once against a queue of 1: the server refuses many requests, yet every
    caller gets its answer through the retries; without retries the refusal is reported plainly."""
    refusals_before = failure_count(tight_server)
    patient = TritonClassifier(tight_server.grpc_url, "grpc", retries=12, backoff=0.05)
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(lambda i: patient.classify_tensors(tensor(i), top_k=2), range(40)))
    assert all(len(a) == 1 and len(a[0].top_k) == 2 for a in answers)
    assert failure_count(tight_server) > refusals_before  # the server did refuse; the retries absorbed it

    impatient = TritonClassifier(tight_server.grpc_url, "grpc", retries=0)
    impatient.describe()

    def once(i: int) -> str:
        try:
            impatient.classify_tensors(tensor(i))
            return "ok"
        except ServerOverloaded as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(once, range(40)))
    errors = [r for r in results if r != "ok"]
    assert errors and all("overloaded" in e and overload_error(e) for e in errors), errors[:2]


@pytest.mark.slow
def test_predict_reports_overload_per_image_and_goes_on(tight_server, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        (folder / f"img_{i:02d}.png").write_bytes(png(70, 70, seed=i))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "client" / "predict.py"), str(folder), "--url", tight_server.grpc_url,
         "--json", "--batch-size", "1", "--concurrency", "16", "--retries", "0", "--send", "tensor",
         "--resize", str(TINY_PREPROCESSING["resize"])],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 24, proc.stderr[-2000:]
    refused = [line for line in lines if "error" in line]
    answered = [line for line in lines if "top_k" in line]
    assert refused and answered, proc.stderr[-2000:]
    assert all("overloaded" in line["error"] for line in refused)
    assert {k["label"] for line in answered for k in line["top_k"]} <= set(TINY_CLASSES)
    assert proc.returncode == 1 and f"{len(refused)} failed" in proc.stderr


@pytest.mark.slow
def test_a_new_version_rolls_out_under_load_without_one_failed_request_and_rolls_back(own_repository, tiny_checkpoint):
    blob = png(90, 90, seed=3)
    with server_on(own_repository, poll_secs=0.5) as server:
        tensors, images = Load(server, infer_tensor), Load(server, lambda c: infer_bytes(c, blob))
        tensors.start()
        images.start()
        wait_until(lambda: len(tensors.results) >= 5 and len(images.results) >= 5, 60, "the load is answered")
        assert {r[3] for r in tensors.results} == {"1"}

        export = subprocess.run(
            [sys.executable, str(ROOT / "export" / "to_onnx.py"), "--checkpoint", str(tiny_checkpoint),
             "--output-dir", str(own_repository)],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr[-2000:]
        exported = time.monotonic()
        wait_until(lambda: tensors.results[-1][3] == "2", 120, "version 2 answers")
        print(f"version 2 answered {time.monotonic() - exported:.1f} s after the export finished")

        rollback = subprocess.run(
            [sys.executable, str(ROOT / "serve" / "versions.py"), "--model-repository", str(own_repository),
             "--serve", "1"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert rollback.returncode == 0 and "served: 1" in rollback.stdout, rollback.stderr
        wait_until(lambda: tensors.results[-1][3] == "1", 120, "version 1 answers again")
        time.sleep(1)
        tensors.stop()
        images.stop()
        assert server.supervisor.rollouts >= 2

    assert not tensors.failures() and not images.failures(), (tensors.failures() + images.failures())[:3]
    versions = [r[3] for r in tensors.results]
    first_two = versions.index("2")
    assert set(versions[:first_two]) == {"1"} and "1" in versions[first_two:]  # 1, then 2, then 1 again
    assert len(images.results) > 20
