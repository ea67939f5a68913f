"""bench/run.py --quick: every benchmark part runs and writes its tables (no timing is asserted); the load
generator's bookkeeping; the studies stay importable (bench/studies/, run on demand)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from helpers import ROOT

PART_FILES = ("model_speed", "low_precision", "serving", "overload", "payloads", "soak")
STUDIES = ("decoding", "head_share", "int8", "reproduce_paper", "serving_sweep")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown_for_every_part(quick_run):
    out, proc = quick_run
    for name in (*PART_FILES, "bench"):
        assert (out / f"{name}.json").is_file(), name
        assert (out / f"{name}.md").read_text().strip(), name
    assert not any((out / f"{name}.json").exists() for name in STUDIES)  # the studies run on demand only
    assert "## CPU benchmarks" in proc.stdout


@pytest.mark.slow
def test_quick_run_records_the_machine_and_the_ratios(quick_run):
    out, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    machine = data["machine"]
    for key in ("cpu", "cores", "flags", "torch", "onnxruntime", "load_average_at_start", "seconds"):
        assert key in machine, key
    assert data["quick"] is True
    speed = data["speed"]["rows"]
    assert [r["batch"] for r in speed] == [1, 4]
    for row in speed:
        for key in (
            "eager_ms",
            "onnxruntime_ms",
            "onnx_speedup_vs_eager",
            "peak_gflops",
            "onnxruntime_fraction_of_peak",
        ):
            assert row[key] > 0, key
    serving = data["serving"]
    assert {(r["protocol"], r["input"]) for r in serving["rows"]} == {
        ("grpc", "tensor"),
        ("grpc", "bytes"),
        ("http", "tensor"),
        ("http", "bytes"),
    }
    assert all(r["requests"] > 0 and r["p999_ms"] >= r["p99_ms"] >= r["p90_ms"] >= r["p50_ms"] > 0
               for r in serving["rows"])  # fmt: skip
    # Triton's own statistics over the measured windows (their edges cut a request or two either way).
    for row in serving["rows"]:
        server = row["server"]
        assert abs(server["requests"] - row["requests"]) <= 2 * 2 * row["concurrency"], (server, row["requests"])
        assert server["queue_ms_per_request"] >= 0 and server["compute_ms_per_request"] > 0, server
        assert sum(server["batch_sizes"].values()) == server["executions"], server
    assert set(serving["wire_bytes_per_image"]) == {"grpc_tensor", "grpc_bytes", "http_tensor", "http_bytes"}
    overload = data["overload"]
    assert overload["capacity_per_s"] > 0
    assert {(r["variant"], r["level"]) for r in overload["rows"]} == {
        (v, level) for v in ("queue policy (shipped)", "no queue policy") for level in (0.5, 2.0)
    }
    for row in overload["rows"]:
        assert row["answered"] + row["refused"] + row["failed"] == row["sent"] > 0
        assert row["ready_after"] and row["rss_mb_after"] > 0
    assert overload["policy_at_2x"]["level"] == 2.0
    payloads = data["payloads"]
    assert set(payloads["bytes_vs_tensor"]) == {"12 MP JPEG", "12 MP HEIC", "3 MP PNG", "256 px JPEG"}
    assert all(r["bytes_images_per_s"] > 0 and r["tensor_images_per_s"] > 0 for r in payloads["rows"])
    # The CPU accounting sees the server's work: a 12 MP HEIC decode (no scaled decode for HEVC) costs
    # the server far more than a ready crop does.
    assert all(r[f"{p}_{side}_cpu_ms"] > 0 for r in payloads["rows"] for p in ("bytes", "tensor")
               for side in ("server", "client"))  # fmt: skip
    heic = next(r for r in payloads["rows"] if r["payload"] == "12 MP HEIC")
    assert heic["bytes_server_cpu_ms"] > heic["tensor_server_cpu_ms"], heic
    assert {t["target"] for t in data["targets"]} >= {
        "ONNX vs PyTorch eager at batch 1",
        "2x overload: goodput of capacity (queue policy)",
        "12 MP JPEG as bytes vs tensors, concurrency 4",
    }


@pytest.mark.slow
def test_quick_run_markdown_holds_the_tables(quick_run):
    out, _ = quick_run
    text = (out / "bench.md").read_text()
    headings = ("### Targets", "### Model speed", "### Low precision", "### Serving", "### Overload",
                "### Realistic payloads", "### Soak")  # fmt: skip
    for heading in headings:
        assert heading in text, heading
    assert "| batch |" in text and "flags:" in text  # the tables and the machine they were measured on


@pytest.mark.slow
def test_low_precision_part_measures_int8_and_bf16_against_fp32(quick_run):
    out, _ = quick_run  # the part's own files, from bench/run.py --quick
    data = json.loads((out / "low_precision.json").read_text())
    assert 0 <= data["int8_top1_agreement"] <= 1 and data["int8_speedup"] > 0
    assert 0 <= data["bf16_top1_agreement"] <= 1 and data["int8_accuracy_ratio"] > 0
    markdown = (out / "low_precision.md").read_text()
    assert "### Low precision" in markdown and "#### INT8 targets" in markdown


def test_gpu_harness_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the harness would measure")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0
    assert "no CUDA GPU found" in proc.stdout


def test_load_counts_refusals_apart_from_failures_and_pools_windows():
    from bench.load import combine, summarize
    from client.inference import OVERLOAD_MESSAGES

    window = summarize(
        [(0.01, None), (0.03, None), (0.002, f"[StatusCode.UNAVAILABLE] {OVERLOAD_MESSAGES[0]}"), (1.0, "reset")],
        seconds=2.0,
        server_counts={"requests": 3, "inferences": 3, "executions": 2, "queue_ns": 3_000_000, "batch_1": 1,
                       "batch_2": 1},
    )  # fmt: skip
    assert (window["sent"], window["answered"], window["refused"], window["failed"]) == (4, 2, 1, 1)
    assert window["images_per_s"] == 1.0 and window["p50_ms"] == pytest.approx(20.0)
    assert window["refusal_max_ms"] == pytest.approx(2.0)
    assert window["server"]["mean_batch"] == 1.5 and window["server"]["queue_ms_per_request"] == 1.0
    assert window["server"]["batch_sizes"] == {1: 1, 2: 1}
    pooled = combine([window, window])
    assert (pooled["sent"], pooled["answered"], pooled["seconds"]) == (8, 4, 4.0)
    assert pooled["server"]["executions"] == 4 and pooled["server"]["mean_batch"] == 1.5


def test_studies_stay_importable():
    """The studies are out of make bench and run on demand; importing each keeps them from rotting unnoticed."""
    for name in STUDIES:
        assert callable(importlib.import_module(f"bench.studies.{name}").main), name
