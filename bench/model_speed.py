"""Model speed on the CPU: PyTorch eager vs the exported ONNX in onnxruntime, per batch size, in alternating
rounds with a large fp32 matrix multiply (MLAS and torch.mm) whose speed is the machine's practical peak: the
model's GFLOP/s is reported as a fraction of it (docs/performance.md section 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    GFLOP_PER_IMAGE,
    Settings,
    Worker,
    alternate,
    build_serving,
    eager_engine,
    entry,
    export,
    log,
    md_table,
    onnx_engine,
    run_part,
    stage,
)


def sgemm_onnx_engine(n: int) -> Callable[[Any], object]:
    """An ``n x n`` fp32 matrix multiply through onnxruntime (MLAS), all threads: a one-node ONNX graph."""
    from onnx import TensorProto, helper

    from export.verify import session

    a, b, c = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm", [a, b], [c])
    # IR version 9: what onnxruntime 1.31 reads (onnx 1.23 would write 14 by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((n, n), dtype=np.float32) for name in "AB"}
    sess = session(model.SerializeToString())
    return lambda _: sess.run(None, feeds)


def sgemm_torch_engine(n: int) -> Callable[[Any], object]:
    """The same multiply through torch.mm (MKL), all threads: on AMD CPUs MKL tends to take its AVX2 path
    while MLAS uses AVX-512, so the peak is the better of the two."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return torch.inference_mode()(lambda _: torch.mm(a, b))


def run(settings: Settings, work: Path) -> tuple[dict[str, Any], str]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    serving, _ = build_serving(settings)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:  # convolutions, matmuls, the fc
        serving(torch.zeros(1, settings.crop, settings.crop, 3, dtype=torch.uint8))
    counted = counter.get_total_flops() / 1e9  # GFLOP per image
    # The documented round figure for the real model; the counter's figure for the quick run's small one.
    gflop = GFLOP_PER_IMAGE if (settings.arch, settings.crop) == ("resnet50_3g", 224) else counted
    path = export(serving, work / "model.onnx", settings.crop)
    del serving
    n = 1024 if settings.quick else 4096
    peak_flop = 2 * n**3
    rows, table = [], []
    with (
        Worker(sgemm_onnx_engine, n) as sgemm_onnx,
        Worker(sgemm_torch_engine, n) as sgemm_torch,
        Worker(eager_engine, settings) as eager,
        Worker(onnx_engine, str(path), settings.crop) as onnx,
    ):
        for batch in settings.batches:
            rounds = max(2, settings.rounds - 2) if batch >= 32 else settings.rounds
            fns = {"sgemm_onnxruntime": sgemm_onnx.bind(), "sgemm_torch": sgemm_torch.bind(),
                   "eager": eager.bind(batch), "onnxruntime": onnx.bind(batch)}  # fmt: skip
            with stage(f"model speed, batch {batch}: eager, onnxruntime and sgemm, {rounds} alternating rounds"):
                series = alternate(fns, rounds)
            sgemms = ("sgemm_onnxruntime", "sgemm_torch")
            sgemm = {f"{k}_gflops": peak_flop / series[k].median / 1e9 for k in sgemms}
            peak_med, peak_best = max(sgemm.values()), max(peak_flop / series[k].best for k in sgemms) / 1e9
            eager_s, onnx_s = series["eager"].median, series["onnxruntime"].median
            ort_gflops = gflop * batch / onnx_s
            row = {
                "batch": batch, "eager_ms": 1e3 * eager_s, "onnxruntime_ms": 1e3 * onnx_s,
                "eager_images_per_s": batch / eager_s, "onnxruntime_images_per_s": batch / onnx_s,
                "onnx_speedup_vs_eager": eager_s / onnx_s, "eager_gflops": gflop * batch / eager_s,
                "onnxruntime_gflops": ort_gflops, "peak_gflops": peak_med,
                "onnxruntime_fraction_of_peak": ort_gflops / peak_med,
                # The least-disturbed run of each: what the machine does when nothing else runs.
                "onnxruntime_fraction_of_peak_best": (gflop * batch / series["onnxruntime"].best) / peak_best,
                **sgemm, "series": {k: s.to_dict() for k, s in series.items()},
            }  # fmt: skip
            rows.append(row)
            table.append(
                [batch, f"{row['eager_ms']:.0f}", f"{row['onnxruntime_ms']:.0f}",
                 f"{row['onnx_speedup_vs_eager']:.2f}x", f"{row['onnxruntime_images_per_s']:.1f}", f"{ort_gflops:.0f}",
                 f"{row['sgemm_onnxruntime_gflops']:.0f} / {row['sgemm_torch_gflops']:.0f}",
                 f"{100 * row['onnxruntime_fraction_of_peak']:.0f}%",
                 f"{100 * row['onnxruntime_fraction_of_peak_best']:.0f}%"]
            )  # fmt: skip
            log(f"   batch {batch}: {table[-1]}")
    threads = {"torch": torch.get_num_threads(), "onnxruntime_intra_op": "default (one per core)"}
    data = {"arch": settings.arch, "crop": settings.crop, "gflop_per_image": gflop, "gflop_per_image_counted": counted,
            "sgemm_size": n, "threads": threads, "rows": rows}  # fmt: skip
    markdown = (
        "### Model speed: PyTorch eager vs ONNX in onnxruntime "
        f"({settings.arch}, {settings.crop}x{settings.crop}, fp32)\n\n"
        + md_table(
            f"batch | eager ms | ONNX ms | ONNX vs eager | ONNX img/s | ONNX GFLOP/s | sgemm {n}³ GFLOP/s (MLAS / "
            "torch.mm) | ONNX % of peak (medians) | (best runs)",
            table,
        )
        + f"\n\nMedians of {settings.rounds} alternating rounds (fewer at batch 32), each engine in its own "
        f"process. {gflop:.3g} GFLOP per image (torch's FLOP counter: {counted:.3g}). Peak = the faster of the "
        "two fp32 matrix multiplies, timed in the same rounds, all threads.\n"
    )
    return data, markdown


if __name__ == "__main__":
    entry(lambda: run_part("model_speed", __doc__, run))
