"""GPU harness: ResNet50-3G against torchvision's ResNet-50 in the same serving wrapper, batch 1 to 256, in
PyTorch fp32 and bf16, then onnxruntime CUDA, TensorRT FP16 and Triton where they exist (else a note says why);
the throughput ratio next to the FLOP ratio (docs/gpu.md). About 2-4 minutes on an H100; without a CUDA GPU
it says so and exits 0."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import CROP, GFLOP_PER_IMAGE, Settings, build_serving, entry, images, md_table, version, write

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GFLOP = {"resnet50_3g": GFLOP_PER_IMAGE, "resnet50": 8.2}  # per 224x224 image: 6.8 and 4.1 GMAC
FLOP_RATIO = GFLOP["resnet50"] / GFLOP["resnet50_3g"]  # 0.6: the throughput ratio to expect at equal efficiency


class _Plain(nn.Module):
    """torchvision's ResNet-50 as :class:`ServingModel` takes a model: no head stages, no weight map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.conv1, self.head = net, net.conv1, SimpleNamespace(num_stages=0)

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, None]:
        return self.net(x), None


def build(name: str) -> nn.Module:
    """The model in the serving wrapper, random weights: speed does not depend on them."""
    if name == "resnet50_3g":
        return build_serving(Settings())[0]
    import torchvision

    from export.serving_model import ServingModel
    from threegnet_preprocessing import Preprocessing

    torch.manual_seed(0)
    return ServingModel(_Plain(torchvision.models.resnet50(num_classes=1000)), Preprocessing()).eval()


def gpu_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count, "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(), "torchvision": version("torchvision"),
        "onnxruntime": version("onnxruntime-gpu") or version("onnxruntime"),
        # What "fp32" means here: convolutions may use TF32 tensor cores, matrix products (the 3G head) do not.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }  # fmt: skip


def timed_row(row: dict[str, Any], fn: Callable[[], object]) -> dict[str, Any]:
    """``row`` with ``fn``'s time per call (CUDA events; after a warm-up, as many calls as take 0.3 s, 5 to 50), or
    the error that stopped it."""

    def elapsed_ms(iters: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    try:
        elapsed_ms(3)  # warm-up
        iters = int(min(50, max(5, 0.3 / max(elapsed_ms(1) / 1e3, 1e-5))))
        ms, batch = elapsed_ms(iters) / iters, row["batch"]
        row.update(ms=ms, iterations=iters, images_per_s=1e3 * batch / ms, tflops=GFLOP[row["model"]] * batch / ms)
    except Exception as e:  # out of memory at a large batch, a provider failing at run time
        row["error"] = f"{type(e).__name__}: {e}"[:200]
        torch.cuda.empty_cache()
    timing = f"{row['ms']:.2f} ms, {row['images_per_s']:.0f} img/s" if "ms" in row else row["error"]
    print(f"  {row['model']} {row['engine']} b{row['batch']}: {timing}", flush=True)
    return row


def late(deadline: float, notes: list[str], what: str) -> bool:
    """Whether the time budget is spent, noting ``what`` was skipped if so."""
    if spent := time.monotonic() > deadline:
        notes.append(f"time budget spent: {what}")
    return spent


def torch_rows(
    models: dict[str, nn.Module], batches: tuple[int, ...], deadline: float, notes: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16"):
        for batch in batches:
            if late(deadline, notes, f"PyTorch {precision} stopped before batch {batch}"):
                break
            x = torch.from_numpy(images(batch, CROP)).cuda()
            for name, model in models.items():

                def run(model: nn.Module = model, x: Tensor = x, bf16: bool = precision == "bf16") -> Tensor:
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                        return model(x)[0]

                rows.append(timed_row({"engine": f"torch_{precision}", "model": name, "batch": batch}, run))
    return rows


def gpu_providers(batches: tuple[int, ...], work: Path, notes: list[str]) -> dict[str, list[Any]]:
    """onnxruntime's GPU provider chains present here (the CPU provider is added last), by engine name; what is
    missing goes into ``notes``."""
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("onnxruntime is not installed: onnxruntime CUDA / TensorRT skipped")
        return {}
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (PyTorch's), when not on the library path
    available = ort.get_available_providers()
    chains: dict[str, list[Any]] = {}
    if "CUDAExecutionProvider" in available:
        chains["onnxruntime_cuda"] = [("CUDAExecutionProvider", {"device_id": 0})]
    else:
        notes.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {available}): skipped")
    if "TensorrtExecutionProvider" in available:
        trt = {"device_id": 0, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(work / "trt_cache")}  # fmt: skip
        for key, n in (("min", 1), ("opt", 32), ("max", max(batches))):
            trt[f"trt_profile_{key}_shapes"] = f"image:{n}x{CROP}x{CROP}x3"
        chains["onnxruntime_tensorrt_fp16"] = [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider"]
    else:
        notes.append("onnxruntime has no TensorrtExecutionProvider (no TensorRT libraries): TensorRT FP16 skipped")
    return chains


def ort_rows(
    paths: dict[str, Path], chains: dict[str, list[Any]], batches: tuple[int, ...], deadline: float, notes: list[str]
) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from export.verify import session

    rows = []
    for engine, chain in chains.items():
        for name, path in paths.items():
            if late(deadline, notes, f"{engine} {name} skipped"):
                continue
            started = time.monotonic()
            try:
                sess = session(path, [*chain, "CPUExecutionProvider"])
            except Exception as e:  # a provider that fails to load or build: note it, go on
                notes.append(f"{engine} {name}: session failed: {type(e).__name__}: {e}")
                continue
            build_s, used = time.monotonic() - started, sess.get_providers()[0]
            if used != chain[0][0]:  # onnxruntime fell back (e.g. no TensorRT libraries)
                notes.append(f"{engine} {name}: {chain[0][0]} could not be used (fell back to {used})")
                continue
            for batch in batches:
                if late(deadline, notes, f"{engine} {name} stopped before batch {batch}"):
                    break
                # Input already on the GPU and output left there: the model's time, as for PyTorch.
                binding = sess.io_binding()
                binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(images(batch, CROP), "cuda", 0))
                binding.bind_output("probabilities", "cuda", 0)
                row = {"engine": engine, "model": name, "batch": batch, "session_seconds": build_s}
                rows.append(timed_row(row, lambda sess=sess, binding=binding: sess.run_with_iobinding(binding)))
    return rows


def triton_missing(chains: dict[str, list[Any]], onnx_paths: dict[str, Path]) -> str | None:
    """Why Triton cannot be measured here, or None when it can."""
    if not shutil.which("tritonserver"):
        if importlib.util.find_spec("pytriton") is None:
            return "no tritonserver on PATH and no nvidia-pytriton wheel"
        if "onnxruntime_cuda" not in chains:
            return "the nvidia-pytriton server's ONNX stand-in would run onnxruntime without CUDA"
    return None if "resnet50_3g" in onnx_paths else "no ONNX export of ResNet50-3G in this run"


def triton_rows(onnx_path: Path, deadline: float, notes: list[str], work: Path) -> list[dict[str, Any]]:
    """Closed-loop gRPC clients sending one uint8 image each, through Triton's dynamic batcher."""
    from bench.load import Load, brief, triton

    rows = []
    with triton(onnx_path, Settings(), work / "repository") as server:
        requests = Load(server, list(images(16, CROP)))
        for concurrency in (1, 8, 32):
            if late(deadline, notes, f"Triton stopped before concurrency {concurrency}"):
                break
            result = brief(requests.closed(concurrency, seconds=5.0, warmup=2.0))
            rows.append({"engine": "triton_grpc_tensor", "model": "resnet50_3g", "concurrency": concurrency, **result})
            print(f"  Triton gRPC, concurrency {concurrency}: {result['images_per_s']:.0f} img/s", flush=True)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """3G img/s over ResNet-50 img/s per engine and batch, in the order they ran, next to the FLOP ratio."""
    by = {(r["engine"], r["model"], r["batch"]): r["images_per_s"] for r in rows if "ms" in r}  # timed, not Triton's
    return [
        {"engine": engine, "batch": batch, "resnet50_3g_images_per_s": ips,
         "resnet50_images_per_s": by[engine, "resnet50", batch],
         "throughput_ratio": ips / by[engine, "resnet50", batch], "flop_ratio": FLOP_RATIO}
        for (engine, model, batch), ips in by.items()
        if model == "resnet50_3g" and (engine, "resnet50", batch) in by
    ]  # fmt: skip


def markdown(info: dict[str, Any], table: list[dict[str, Any]], notes: list[str]) -> str:
    rows = [
        [r["engine"], r["batch"], f"{r['resnet50_3g_images_per_s']:.0f}", f"{r['resnet50_images_per_s']:.0f}",
         f"{r['throughput_ratio']:.2f}", f"{r['flop_ratio']:.2f}"]
        for r in table
    ]  # fmt: skip
    head = f"### GPU: {info['gpu']} (torch {info['torch']}, CUDA {info['cuda']})\n\n"
    columns = "engine | batch | ResNet50-3G img/s | ResNet-50 img/s | throughput ratio | FLOP ratio"
    return head + md_table(columns, rows) + "\n\n" + "".join(f"- {n}\n" for n in notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/gpu", help="for gpu.json and gpu.md")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--budget", type=float, default=270.0, help="seconds; later measurements are skipped past it")
    p.add_argument("--skip-onnx", action="store_true", help="PyTorch only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU found (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    started = time.monotonic()
    deadline = started + args.budget
    torch.backends.cudnn.benchmark = True
    info = gpu_info()
    print(f"GPU: {info['gpu']}, {info['gpu_memory_gib']} GiB; torch {info['torch']}, CUDA {info['cuda']}", flush=True)
    batches = tuple(sorted(set(args.batches)))
    notes: list[str] = [
        "PyTorch fp32 uses PyTorch's defaults: cuDNN convolutions may use TF32 "
        f"(allow_tf32={info['cudnn_allow_tf32']}), matrix products do not (allow_tf32={info['matmul_allow_tf32']})",
        "bf16 = torch.autocast('cuda', torch.bfloat16); 3G-Net's covariance and Newton-Schulz stay fp32",
    ]
    models = {name: build(name).cuda().to(memory_format=torch.channels_last) for name in GFLOP}
    rows = torch_rows(models, batches, deadline, notes)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        chains = {} if args.skip_onnx else gpu_providers(batches, work, notes)
        onnx_paths: dict[str, Path] = {}
        if args.skip_onnx:
            notes.append("--skip-onnx: onnxruntime and Triton skipped")
        elif chains:
            from export.onnx_graph import export_onnx

            try:  # the exporter the project ships, for both models
                for name, model in models.items():
                    export_onnx(model.cpu(), work / f"{name}.onnx", CROP)
                    onnx_paths[name] = work / f"{name}.onnx"
            except Exception as e:  # onnx/onnxscript missing or an exporter problem: say so
                notes.append(f"ONNX export failed ({type(e).__name__}: {e}): onnxruntime skipped")
                onnx_paths = {}
        rows += ort_rows(onnx_paths, chains, batches, deadline, notes)
        if why_not := triton_missing(chains, onnx_paths):
            notes.append(f"Triton skipped: {why_not}")
        else:
            try:
                rows += triton_rows(onnx_paths["resnet50_3g"], deadline, notes, work)
            except Exception as e:
                notes.append(f"Triton failed: {type(e).__name__}: {e}")
    table = ratios(rows)
    info["seconds"] = round(time.monotonic() - started, 1)
    result = {"machine": info, "flop_ratio": FLOP_RATIO, "gflop_per_image": GFLOP, "ratios": table, "rows": rows}
    text = markdown(info, table, notes)
    write(args.out, "gpu", result, text)
    print(text)
    print(f"wrote {args.out / 'gpu.json'} and gpu.md in {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    entry(main)
