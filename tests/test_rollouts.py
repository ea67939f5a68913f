"""Versions that cannot load, put into a served repository under load: a half-copied file, a model
with other input shapes, a model whose labels went missing. The version serving keeps answering,
readiness never drops (Triton counts a version that failed to load against the whole server), the
reason is reported, and a good version afterwards is served. Real servers, real clients."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from helpers import (
    CROP,
    ROOT,
    TINY_CLASSES,
    Load,
    http_status,
    infer_bytes,
    infer_tensor,
    png,
    server_on,
    tensor,
    wait_until,
)

from export.repository import COMPLETION_RECORD
from serve.server import TritonServer, free_port
from serve.versions import main as versions_main

pytestmark = pytest.mark.slow

POLL_SECS = 0.5


@pytest.fixture(scope="module")
def other_crop_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, sealed version of a model exported for 48x48 crops: its record is right, its
    input shape is not the served config's (64x64)."""
    import torch

    from export.to_onnx import main as export_main
    from threegnet_preprocessing import Preprocessing
    from training.checkpoint import make_checkpoint, save_atomic
    from training.model import create_model

    torch.manual_seed(1)
    model = create_model("resnet18_3g", num_classes=len(TINY_CLASSES), dim=32)
    work = tmp_path_factory.mktemp("crop48")
    ckpt = make_checkpoint(
        model, arch="resnet18_3g", class_names=TINY_CLASSES, preprocessing=Preprocessing(resize=55, crop=48)
    )
    save_atomic(ckpt, work / "crop48.pth.tar")
    assert export_main(["--checkpoint", str(work / "crop48.pth.tar"), "--output-dir", str(work / "repo")]) == 0
    return work / "repo" / "threegnet" / "1"


def copy_version(repo: Path, source: int | Path, version: int) -> Path:
    """A version copied as a sync tool would: files and completion record, not atomically."""
    src = repo / "threegnet" / str(source) if isinstance(source, int) else source
    target = repo / "threegnet" / str(version)
    shutil.copytree(src, target)
    return target


def half_copied(repo: Path, version: int) -> None:
    """``version`` as a copy interrupted halfway: the record arrived, model.onnx is a third of itself."""
    target = copy_version(repo, 1, version)
    data = (target / "model.onnx").read_bytes()
    (target / "model.onnx").write_bytes(data[: len(data) // 3])


class Readiness(threading.Thread):
    """Triton's readiness, the bytes ensemble's, and the launcher's (serve/readiness.py, what load
    balancers and pods probe), sampled at about 20 Hz."""

    def __init__(self, server: TritonServer) -> None:
        super().__init__(daemon=True)
        self.server, self.halt = server, threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            at = time.monotonic()
            statuses = (http_status(self.server, "/v2/health/ready"),
                        http_status(self.server, "/v2/models/threegnet_image/ready"),
                        http_status(self.server, "/v2/health/ready", self.server.supervisor_metrics_port))  # fmt: skip
            self.samples.append((at, *statuses))
            time.sleep(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)

    def not_ready(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if since <= s[0] <= until and s[1:] != (200, 200, 200)]


def index(server: TritonServer) -> list[tuple[str, str, str]]:
    """threegnet's versions in Triton's repository index: (version, state, reason)."""
    return [(m.get("version", ""), m.get("state", ""), m.get("reason", "")) for m in server.models()
            if m["name"] == "threegnet"]  # fmt: skip


def refused(server: TritonServer, version: int, reason: str) -> bool:
    assert server.supervisor is not None
    return any(v == version and reason in why for _, v, why in server.supervisor.rejections)


def break_then_fix(
    repo: Path, break_it: Callable[[], None], reason: str, fix: Callable[[], None] | None = None, version: int = 2
) -> None:
    """Serve ``repo`` under load from three client threads, ``break_it``, check that nothing noticed
    but the log, then ``fix`` (default: a good version 3 copied in) and check that it is served."""
    blob = png(90, 90, seed=5)
    with server_on(repo, poll_secs=POLL_SECS, supervisor_metrics_port=free_port()) as server:
        loads = [Load(server, infer_tensor), Load(server, infer_tensor), Load(server, lambda c: infer_bytes(c, blob))]
        readiness = Readiness(server)
        for thread in (*loads, readiness):
            thread.start()
        wait_until(lambda: all(len(load.results) >= 5 for load in loads), 60, "the load is answered")
        rejected_before = server.supervisor.rejected
        broken_at = time.monotonic()
        break_it()
        wait_until(lambda: refused(server, version, reason), 120, f"version {version} refused: {reason}")
        time.sleep(4 * POLL_SECS)  # and some more polls: it is not tried again until its files change
        refused_at = time.monotonic()
        assert server.supervisor.rejected > rejected_before
        tried = [(m, v) for m, v, _ in server.supervisor.rejections]
        assert len(tried) == len(set(tried)), server.supervisor.rejections  # each refused once
        assert [r for r in server.supervisor.rejections if r[1] == version and reason in r[2]][:1]
        assert [v for v, state, _ in index(server) if state == "READY"] == ["1"]
        assert not [row for row in index(server) if row[0] == str(version)], index(server)  # never shown to Triton
        log = [line for line in server.lines if f"version {version} refused" in line]
        assert log and reason in log[0] and "version 1 keeps serving" in log[0], log
        assert server.is_ready()

        (fix or (lambda: copy_version(repo, 1, 3)))()
        fixed_at = time.monotonic()
        wait_until(lambda: loads[0].results[-1][3] == "3", 120, "version 3 answers")
        wait_until(lambda: [v for v, state, _ in index(server) if state == "READY"] == ["3"], 60, "only 3 READY")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("image", [1, CROP, CROP, 3], "UINT8")
        inp.set_data_from_numpy(tensor(7))
        answer = client.infer("threegnet", [inp], model_version="3", client_timeout=30)
        assert answer.as_numpy("probabilities").shape == (1, len(TINY_CLASSES))
        client.close()
        wait_until(lambda: [r for r in index(server) if r[1:] != ("UNAVAILABLE", "unloaded")] == [("3", "READY", "")],
                   30, "version 1 unloaded, nothing else in the index")  # fmt: skip
        time.sleep(1)
        for thread in (*loads, readiness):
            thread.stop()
        assert server.is_ready()

    failures = [f for load in loads for f in load.failures()]
    assert not failures, failures[:3]
    during = [s for s in readiness.samples if broken_at <= s[0] <= refused_at]
    assert len(during) > 20, len(during)
    assert not readiness.not_ready(broken_at, refused_at), readiness.not_ready(broken_at, refused_at)[:5]
    assert readiness.samples[-1][1:] == (200, 200, 200)
    # Loading a good version is Triton's LOADING state for a moment: its strict readiness says no meanwhile;
    # the launcher's, which the fleet and the pods probe, says yes throughout (a version answers).
    rollout = [s for s in readiness.samples if s[0] >= fixed_at]
    assert rollout and all(s[3] == 200 for s in rollout), [s for s in rollout if s[3] != 200][:5]
    print(f"refused after {refused_at - broken_at - 4 * POLL_SECS:.1f} s; {len(during)} readiness samples, all 200; "
          f"{sum(len(load.results) for load in loads)} requests, none failed; version 3's rollout: "
          f"{len(readiness.not_ready(fixed_at))} of {len(rollout)} samples not ready (server "
          f"{sum(r[1] != 200 for r in rollout)}, threegnet_image {sum(r[2] != 200 for r in rollout)})")  # fmt: skip


def test_a_half_copied_version_costs_nothing_and_a_good_one_is_served_after_it(own_repository):
    break_then_fix(own_repository, lambda: half_copied(own_repository, 2), "a partial copy")


def test_a_version_with_other_input_shapes_is_refused(own_repository, other_crop_version):
    break_then_fix(own_repository, lambda: copy_version(own_repository, other_crop_version, 2), "input 'image'")


def test_a_version_whose_labels_went_missing_is_refused(own_repository):
    labels = own_repository / "threegnet" / "labels.txt"
    kept = labels.read_bytes()

    def break_it() -> None:
        labels.unlink()  # as a sync that deletes before it copies
        copy_version(own_repository, 1, 2)

    def fix() -> None:
        copy_version(own_repository, 1, 3)
        labels.write_bytes(kept)

    break_then_fix(own_repository, break_it, "labels.txt", fix)


def test_a_broken_newest_version_at_startup_serves_the_previous_one(own_repository):
    half_copied(own_repository, 2)
    with server_on(own_repository) as server:
        assert server.is_ready()
        assert [row[:2] for row in index(server)] == [("1", "READY")]
        assert refused(server, 2, "a partial copy")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert infer_tensor(client).get_response().model_version == "1"
        client.close()


def seal(repo: Path, version: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "serve" / "versions.py"), "--model-repository", str(repo), "--seal", str(version)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_seal_refuses_what_would_not_serve_and_seals_a_good_copy(own_repository, other_crop_version):
    model = own_repository / "threegnet"
    half_copied(own_repository, 2)
    (model / "2" / COMPLETION_RECORD).unlink()
    copy_version(own_repository, other_crop_version, 3)
    (model / "3" / COMPLETION_RECORD).unlink()
    (model / "4").mkdir()
    shutil.copy2(model / "1" / "model.onnx", model / "4" / "model.onnx")  # copied without its record

    for version, why in ((2, "does not load in onnxruntime"), (3, "input 'image'")):
        result = seal(own_repository, version)
        assert result.returncode == 2 and why in result.stderr, result.stderr
        assert not (model / str(version) / COMPLETION_RECORD).exists()
    assert versions_main(["--model-repository", str(own_repository), "--check", "4"]) == 3
    result = seal(own_repository, 4)
    assert result.returncode == 0 and "sealed" in result.stderr, result.stderr
    assert versions_main(["--model-repository", str(own_repository), "--check", "4"]) == 0
    assert (model / "4" / COMPLETION_RECORD).read_text() == (model / "1" / COMPLETION_RECORD).read_text()


def test_a_half_copied_version_in_a_shared_repository_costs_a_fleet_nothing(own_repository):
    """Two replicas serving one repository (pods sharing a volume) behind HAProxy, which takes a replica out
    at its first failed readiness check: before the fix, a half-copied version took both out."""
    from client.inference import ClientError, TritonClassifier
    from deploy.local_fleet import Fleet

    if shutil.which("haproxy") is None:
        pytest.skip("no haproxy (make haproxy)")
    with Fleet(own_repository, replicas=2) as fleet:
        classifier = TritonClassifier(fleet.http_url, "http", retries=0, timeout=30)
        x = tensor(3)
        ok, failures, states = [0], [], []
        halt = threading.Event()

        def classify() -> None:
            while not halt.is_set():
                try:
                    classifier.classify_tensors(x, top_k=2)
                    ok[0] += 1
                except ClientError as e:
                    failures.append(str(e))
                time.sleep(0.01)

        def watch() -> None:
            while not halt.is_set():
                states.append(set(fleet.states().values()))
                time.sleep(0.1)

        threads = [threading.Thread(target=classify, daemon=True) for _ in range(3)]
        threads.append(threading.Thread(target=watch, daemon=True))
        for thread in threads:
            thread.start()
        wait_until(lambda: ok[0] >= 20, 60, "the fleet answers")
        half_copied(own_repository, 2)
        logs = [fleet.work / f"{r.name}.log" for r in fleet.replicas]
        wait_until(lambda: all("version 2 refused" in log.read_text() for log in logs), 120, "both replicas refused 2")
        answered = ok[0]
        time.sleep(3)  # a few more health checks
        refused_looks, rollout_failures = len(states), len(failures)
        copy_version(own_repository, 1, 3)  # then a good version lands: every replica loads it at about once
        wait_until(lambda: all("now serving version 3" in log.read_text() for log in logs), 180, "both serve 3")
        time.sleep(2)
        halt.set()
        for thread in threads:
            thread.join(timeout=60)
        for replica in fleet.replicas:
            request = urllib.request.Request(f"http://127.0.0.1:{replica.http_port}/v2/repository/index", data=b"{}",
                                             method="POST", headers=fleet.control_headers)  # fmt: skip
            rows = json.loads(urllib.request.urlopen(request, timeout=5).read())
            ready = [m.get("version") for m in rows if m["name"] == "threegnet" and m.get("state") == "READY"]
            assert ready == ["3"], rows  # 2 never shown to Triton; 3 replaced 1

    during_rollout = states[refused_looks:]
    print(
        f"{ok[0]} answers through HAProxy; {len(failures)} failed ({len(failures) - rollout_failures} during version "
        f"3's rollout); {refused_looks} looks at the pool while 2 was refused, "
        f"{sum(s != {'UP'} for s in during_rollout)} of {len(during_rollout)} with a replica out during 3's rollout"
    )
    assert not failures, failures[:3]
    assert ok[0] > answered and all(s == {"UP"} for s in states[:refused_looks]), [s for s in states if s != {"UP"}][:3]
    assert all("UP" in s for s in during_rollout), "the pool was empty while a good version rolled out"
