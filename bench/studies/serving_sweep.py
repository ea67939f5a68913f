"""The serving settings behind ``export/triton_config.py``: gRPC tensors at each concurrency, one
server per variant (batching delay, model instances, threads per instance), each against in-process
onnxruntime as in ``bench/serving.py``. Results: docs/performance.md section 4.

    .venv/bin/python -m bench.studies.serving_sweep [--quick]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import serving
from bench.common import Settings, entry, fp32_onnx, md_table, run_part, stage

SWEEP: tuple[dict[str, Any], ...] = (
    {},
    {"queue_delay_us": 10000},
    {"instances": 2},  # intra-op threads 0: the cores shared out, 1 thread each here
    {"instances": 2, "intra_op_threads": 2},  # what Triton's onnxruntime backend does with 0
)


def run(settings: Settings, work: Path) -> tuple[dict[str, Any], str]:
    onnx_path = fp32_onnx(settings, work)
    results = []
    for i, overrides in enumerate(SWEEP):
        with stage(f"sweep variant {overrides or 'shipped'}"):
            data, _ = serving.run(settings, work / f"sweep{i}", onnx_path, overrides, combos=(("grpc", "tensor"),))
        results += [{"overrides": overrides, **r} for r in data["rows"]]
    table = [
        [json.dumps(r["overrides"]) if r["overrides"] else "shipped", r["concurrency"], f"{r['images_per_s']:.2f}",
         f"{100 * r['fraction_of_in_process']:.0f}%", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
         f"{r['mean_server_batch']:.1f}"]
        for r in results
    ]  # fmt: skip
    markdown = "### Serving settings sweep (gRPC, uint8 tensors)\n\n" + md_table(
        "variant | concurrency | img/s | of in-process | p50 ms | p99 ms | server's mean batch", table
    )
    return {"rows": results}, markdown


def main() -> int:
    return run_part("serving_sweep", __doc__, run)


if __name__ == "__main__":
    entry(main)
