"""bench/run.py --quick: every benchmark part runs and writes its tables. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

PART_FILES = ("model_speed", "head_share", "low_precision", "serving", "overload", "decoding", "payloads")


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
    head = data["head"]["summary"]
    assert 0 < head["b1"]["head_share_time"] < 1 and 0 < head["head_share_flop"] < 1
    precision = data["precision"]
    assert 0 <= precision["int8_top1_agreement"] <= 1 and precision["int8_speedup"] > 0
    serving = data["serving"]
    assert {(r["protocol"], r["input"]) for r in serving["rows"]} == {
        ("grpc", "tensor"),
        ("grpc", "bytes"),
        ("http", "tensor"),
        ("http", "bytes"),
    }
    assert all(r["requests"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in serving["rows"])
    assert set(serving["wire_bytes_per_image"]) == {"grpc_tensor", "grpc_bytes", "http_tensor", "http_bytes"}
    overload = data["overload"]
    assert overload["capacity_per_s"] > 0
    assert {(r["variant"], r["level"]) for r in overload["rows"]} == {
        (v, level) for v in ("queue policy (shipped)", "no queue policy") for level in (0.5, 2.0)
    }
    for row in overload["rows"]:
        assert row["answered"] + row["refused"] + row["other_failures"] == row["sent"] > 0
        assert row["ready_after"] and row["rss_mb_after"] > 0
    assert overload["policy_at_2x"]["level"] == 2.0
    decoding = data["decoding"]["rows"][0]
    assert decoding["photos"] == 16 and 0 <= decoding["top1_agreement"] <= 1
    assert decoding["decode_ms"]["fast"] > 0 and decoding["decode_ms"]["exact"] > 0
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
        "INT8 throughput vs fp32 (onnxruntime)",
        "2x overload: goodput of capacity (queue policy)",
        "12 MP JPEG as bytes vs tensors, concurrency 4",
        "INT8 accuracy / fp32 accuracy",
    }


@pytest.mark.slow
def test_quick_run_markdown_holds_the_tables(quick_run):
    out, _ = quick_run
    text = (out / "bench.md").read_text()
    headings = ("### Targets", "### Model speed", "### Where the time goes", "### Low precision", "### Serving",
                "### Overload", "### Fast vs exact decoding", "### Realistic payloads")  # fmt: skip
    for heading in headings:
        assert heading in text, heading
    assert "| batch |" in text and "flags:" in text  # the tables and the machine they were measured on


def test_gpu_harness_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the harness would measure")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0
    assert "no CUDA GPU found" in proc.stdout
