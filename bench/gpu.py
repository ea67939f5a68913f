"""GPU harness: ResNet50-3G against torchvision's ResNet-50 in the same harness, batch 1 to 256.

    python bench/gpu.py --out bench/results/gpu        # about 2-4 minutes on an H100

Needs only torch, torchvision and numpy (and this repository's ``training/``, ``export/`` and
``threegnet_preprocessing.py`` for the model). Measures, for each batch size and both models:
PyTorch eager fp32 and PyTorch bf16 autocast (3G-Net's head keeps its covariance and Newton-Schulz in fp32 by itself);
then, where they exist, onnxruntime's CUDA and TensorRT (FP16) providers on the ONNX
exports, and a Triton server. Whatever is missing is skipped with a note saying why.

Both models run inside the serving wrapper (``export/serving_model.py``): uint8 NHWC images
already on the GPU, normalized inside the timed region, channels-last convolutions. The
throughput ratio (3G img/s over ResNet-50 img/s) is reported next to the FLOP ratio
(docs/performance.md). Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(ROOT))

from bench.common import GFLOP_PER_IMAGE, entry, md_table, write  # noqa: E402 (after the path)

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CROP = 224
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
    from export.serving_model import ServingModel
    from threegnet_preprocessing import Preprocessing

    torch.manual_seed(0)
    if name == "resnet50_3g":
        from training.model import create_model

        model = create_model("resnet50_3g", num_classes=1000)
    else:
        import torchvision

        model = _Plain(torchvision.models.resnet50(num_classes=1000))
    return ServingModel(model, Preprocessing()).eval()


def gpu_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        # PyTorch's defaults, recorded because they decide what "fp32" means on this GPU:
        # convolutions may use TF32 tensor cores, matrix products (the 3G head) do not.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": True,
    }
    with contextlib.suppress(Exception):
        import torchvision

        info["torchvision"] = torchvision.__version__
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    return info


def time_gpu(fn: Callable[[], object], min_seconds: float = 0.3, max_iters: int = 50) -> dict[str, float]:
    """Median-free GPU timing: warm up, pick an iteration count worth ``min_seconds``, time it with events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-5)
    iters = int(min(max_iters, max(5, min_seconds / one)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return {"ms": start.elapsed_time(end) / iters, "iterations": iters}


def torch_rows(
    models: dict[str, nn.Module], batches: tuple[int, ...], deadline: float, notes: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16"):
        for batch in batches:
            if time.monotonic() > deadline:
                notes.append(f"time budget spent: PyTorch {precision} stopped before batch {batch}")
                break
            x = torch.randint(0, 256, (batch, CROP, CROP, 3), dtype=torch.uint8, device="cuda")
            for name, model in models.items():

                def run(model: nn.Module = model, x: Tensor = x, bf16: bool = precision == "bf16") -> Tensor:
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                        return model(x)[0]

                row: dict[str, Any] = {"engine": f"torch_{precision}", "model": name, "batch": batch}
                try:
                    t = time_gpu(run)
                    row.update(t, images_per_s=1e3 * batch / t["ms"], tflops=GFLOP[name] * batch / t["ms"])
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                rows.append(row)
            print(_line(rows[-2:]), flush=True)
    return rows


def _line(rows: list[dict[str, Any]]) -> str:
    def one(r: dict[str, Any]) -> str:
        timing = f"{r['ms']:.2f} ms, {r['images_per_s']:.0f} img/s" if "ms" in r else r.get("error", "?")
        return f"{r['model']} {r['engine']} b{r['batch']}: {timing}"

    return "  " + " | ".join(one(r) for r in rows)


# -- optional engines: onnxruntime (CUDA, TensorRT) and Triton --------------------------------------------


def export_onnx(model: nn.Module, path: Path) -> Path:
    """The exporter the project ships (``export/onnx_graph.py``), for both models."""
    from export.onnx_graph import export_onnx as project_export

    project_export(model.cpu(), path, CROP)
    return path


def ort_rows(
    onnx_paths: dict[str, Path], batches: tuple[int, ...], deadline: float, notes: list[str], work: Path
) -> list[dict[str, Any]]:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (PyTorch's), when not on the library path
    available = ort.get_available_providers()
    providers: list[tuple[str, Any]] = []
    if "CUDAExecutionProvider" in available:
        providers.append(("onnxruntime_cuda", [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]))
    else:
        notes.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {available}): skipped")
    if "TensorrtExecutionProvider" in available:
        shapes = {
            f"trt_profile_{k}_shapes": f"image:{n}x{CROP}x{CROP}x3"
            for k, n in (("min", 1), ("opt", 32), ("max", max(batches)))
        }
        trt = {
            "device_id": 0,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(work / "trt_cache"),
            **shapes,
        }
        chain = [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        providers.append(("onnxruntime_tensorrt_fp16", chain))  # fmt: skip
    else:
        notes.append("onnxruntime has no TensorrtExecutionProvider (no TensorRT libraries): TensorRT FP16 skipped")
    rows = []
    for engine, provider_list in providers:
        for name, path in onnx_paths.items():
            if time.monotonic() > deadline:
                notes.append(f"time budget spent: {engine} {name} skipped")
                continue
            options = ort.SessionOptions()
            options.log_severity_level = 3
            started = time.monotonic()
            try:
                sess = ort.InferenceSession(str(path), options, providers=provider_list)
            except Exception as e:  # a provider that fails to load or build: note it, go on
                notes.append(f"{engine} {name}: session failed: {type(e).__name__}: {e}")
                continue
            build_s = time.monotonic() - started
            wanted = provider_list[0][0] if isinstance(provider_list[0], tuple) else provider_list[0]
            if sess.get_providers()[0] != wanted:  # onnxruntime fell back (e.g. no TensorRT libraries)
                notes.append(f"{engine} {name}: {wanted} could not be used (fell back to {sess.get_providers()[0]})")
                continue
            for batch in batches:
                if time.monotonic() > deadline:
                    notes.append(f"time budget spent: {engine} {name} stopped before batch {batch}")
                    break
                x = np.random.default_rng(0).integers(0, 256, (batch, CROP, CROP, 3), dtype=np.uint8)
                binding = sess.io_binding()
                # Input already on the GPU and output left there: the model's time, as for PyTorch.
                binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
                binding.bind_output("probabilities", "cuda", 0)
                row: dict[str, Any] = {"engine": engine, "model": name, "batch": batch, "session_seconds": build_s}
                try:
                    t = time_gpu(lambda sess=sess, binding=binding: sess.run_with_iobinding(binding))
                    row.update(t, images_per_s=1e3 * batch / t["ms"], tflops=GFLOP[name] * batch / t["ms"])
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(_line([row]), flush=True)
    return rows


def triton_available() -> str | None:
    """Why Triton cannot be measured here, or None when it can."""
    if shutil.which("tritonserver"):
        return None
    if importlib.util.find_spec("pytriton") is None:
        return "no tritonserver on PATH and no nvidia-pytriton wheel"
    try:
        import onnxruntime as ort
    except ImportError:
        return "the nvidia-pytriton server needs onnxruntime (with CUDA) for its ONNX stand-in"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "the nvidia-pytriton server's ONNX stand-in would run onnxruntime without CUDA"
    return None


def triton_rows(onnx_path: Path, deadline: float, notes: list[str], work: Path) -> list[dict[str, Any]]:
    """Closed-loop gRPC clients sending one uint8 image each, through Triton's dynamic batcher."""
    from bench.common import Settings
    from bench.load import brief
    from bench.serving import load, make_repository, triton

    repo = make_repository(onnx_path, Settings(), work / "repository")
    x = np.random.default_rng(0).integers(0, 256, (16, CROP, CROP, 3), dtype=np.uint8)
    rows = []
    with triton(repo) as server:
        for concurrency in (1, 8, 32):
            if time.monotonic() > deadline:
                notes.append(f"time budget spent: Triton stopped before concurrency {concurrency}")
                break
            result = brief(load(server, "grpc", "tensor", x, []).closed(concurrency, seconds=5.0, warmup=2.0))
            rows.append({"engine": "triton_grpc_tensor", "model": "resnet50_3g", "concurrency": concurrency, **result})
            print(f"  Triton gRPC, concurrency {concurrency}: {result['images_per_s']:.0f} img/s", flush=True)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """3G img/s over ResNet-50 img/s per engine and batch, next to the FLOP ratio (0.6)."""
    by = {(r["engine"], r["model"], r.get("batch")): r for r in rows if "images_per_s" in r}
    engines = list(dict.fromkeys(r["engine"] for r in rows))  # in the order they ran: fp32, bf16, ...
    out = []
    for (engine, model, batch), r in sorted(by.items(), key=lambda kv: (engines.index(kv[0][0]), kv[0][2] or 0)):
        other = by.get((engine, "resnet50", batch))
        if model == "resnet50_3g" and other:
            out.append(
                {
                    "engine": engine,
                    "batch": batch,
                    "resnet50_3g_images_per_s": r["images_per_s"],
                    "resnet50_images_per_s": other["images_per_s"],
                    "throughput_ratio": r["images_per_s"] / other["images_per_s"],
                    "flop_ratio": FLOP_RATIO,
                }
            )
    return out


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
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu", help="folder for gpu.json / gpu.md")
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
        onnx_paths: dict[str, Path] = {}
        if args.skip_onnx:
            notes.append("--skip-onnx: onnxruntime and Triton skipped")
        elif importlib.util.find_spec("onnxruntime") is None:
            notes.append("onnxruntime is not installed: onnxruntime CUDA / TensorRT skipped")
        else:
            import onnxruntime as ort

            if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
                try:
                    onnx_paths = {name: export_onnx(m, work / f"{name}.onnx") for name, m in models.items()}
                except Exception as e:  # onnx/onnxscript missing or an exporter problem: say so
                    notes.append(f"ONNX export failed ({type(e).__name__}: {e}): onnxruntime skipped")
            rows += ort_rows(onnx_paths, batches, deadline, notes, work) if onnx_paths else []
            if not onnx_paths and not any("onnxruntime" in n for n in notes):
                notes.append(
                    f"onnxruntime {ort.__version__} has neither CUDA nor TensorRT providers "
                    f"({ort.get_available_providers()}): skipped"
                )
        why_not = triton_available()
        if why_not:
            notes.append(f"Triton skipped: {why_not}")
        elif "resnet50_3g" not in onnx_paths:
            notes.append("Triton skipped: no ONNX export of ResNet50-3G in this run")
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
