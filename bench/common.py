"""What every benchmark shares: the machine, timing, the model under test, result files. Figures that matter
are ratios of two things timed side by side, so that outside load hits both alike (docs/performance.md)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results"
CROP = 224
# ResNet50-3G at 224x224: about 6.8 GMAC = 13.6 GFLOP per image (docs/performance.md); bench/model_speed.py
# counts it again with torch's FLOP counter and records both.
GFLOP_PER_IMAGE = 13.6
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
Result = tuple[dict[str, Any], str]  # what a part's or a study's run returns: its JSON data and its markdown


@dataclass(frozen=True)
class Settings:
    """How much work a run does: the full benchmark or the quick smoke run (``--quick``)."""

    quick: bool = False
    arch: str = "resnet50_3g"
    crop: int = CROP
    num_classes: int = 1000
    dim: int = 256
    batches: tuple[int, ...] = (1, 8, 32)
    rounds: int = 5  # alternating rounds per comparison (each side timed once per round)
    concurrency: tuple[int, ...] = (1, 4, 16)
    serve_seconds: float = 12.0  # measuring window per serving configuration
    train_per_class: int = 16
    val_per_class: int = 32
    classes: int = 8

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if not quick:
            return cls()
        # A small 3G-Net on 64x64 crops: every code path runs, in a few minutes.
        return cls(quick=True, arch="resnet18_3g", crop=64, num_classes=8, dim=32, batches=(1, 4), rounds=2,
                   concurrency=(1, 4), serve_seconds=1.5, train_per_class=4, val_per_class=4)  # fmt: skip

    @property
    def resize(self) -> int:
        return round(self.crop * 256 / 224)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """CPU model, cores, the vector/matrix extensions that decide fp32/bf16/int8 speed, versions."""
    import onnxruntime as ort
    import torch

    first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    info = {key.strip(): value.strip() for key, _, value in (ln.partition(":") for ln in first_cpu.splitlines())}
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cores": len(os.sched_getaffinity(0)), "logical_cpus": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "numpy": np.__version__, **{name: version(name) for name in ("onnx", "tritonclient", "nvidia-pytriton")},
        "load_average_at_start": load_average(),
    }  # fmt: skip


def machine_markdown(m: dict[str, Any]) -> str:
    flags = ", ".join(m["flags"]) or "none of interest"
    return (
        f"Machine: {m['cpu']} (family/model {m['cpu_family_model']}), {m['cores']} cores usable, "
        f"{m['memory_gib']} GiB; flags: {flags}. torch {m['torch']} ({m['torch_threads']} threads, "
        f"{m['torch_cpu_capability']}), onnxruntime {m['onnxruntime']}, Python {m['python']}. "
        f"Load average at start {m['load_average_at_start']}."
    )


@dataclass
class Series:
    """Samples (seconds) of one timed thing."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "best_s": self.best, "samples_s": [round(s, 6) for s in self.samples]}


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, Series]:
    """Call each function (it returns the seconds it measured: :meth:`Worker.bind`) in turn, ``rounds`` times
    after an untimed round; the pause lets the previous engine's thread pool stop spinning before the next starts."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(1 + rounds):
        for name, fn in fns.items():
            seconds = fn()
            if i > 0:
                out[name].append(seconds)
            time.sleep(0.02)
    return {name: Series(s) for name, s in out.items()}


_engine: Callable[[Any], object] | None = None  # a Worker's engine, in the Worker's process


def _build(factory: Callable[..., Callable[[Any], object]], args: tuple) -> None:
    global _engine
    _engine = factory(*args)


def _call(arg: Any) -> tuple[float, Any]:
    assert _engine is not None
    start = time.perf_counter()
    result = _engine(arg)
    return time.perf_counter() - start, result


class Worker(ProcessPoolExecutor):
    """An engine in a process of its own: in one process, onnxruntime's spinning threads cost PyTorch's OpenMP team
    whole time slices. ``factory(*args)`` (module-level, for pickling) builds ``fn(arg)`` in the child; :meth:`run`
    calls it there and returns (seconds, its result)."""

    def __init__(self, factory: Callable[..., Callable[[Any], object]], *args: Any) -> None:
        super().__init__(1, multiprocessing.get_context("spawn"), initializer=_build, initargs=(factory, args))
        try:
            self.submit(time.sleep, 0).result()  # the engine is built here, or its error raised
        except BaseException as e:
            self.shutdown(cancel_futures=True)
            raise RuntimeError(f"benchmark worker {factory.__name__} failed to start (its error is above)") from e

    def run(self, arg: Any = None) -> tuple[float, Any]:
        return self.submit(_call, arg).result()

    def bind(self, arg: Any = None) -> Callable[[], float]:
        """A no-argument callable for :func:`alternate`: the seconds one run takes in the worker."""
        return lambda: self.run(arg)[0]


def build_serving(settings: Settings):
    """The project's model in its serving wrapper (uint8 NHWC in), random weights and BatchNorm statistics
    at their defaults: speed does not depend on them."""
    import torch

    from export.serving_model import ServingModel
    from threegnet_preprocessing import Preprocessing
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model(settings.arch, num_classes=settings.num_classes, dim=settings.dim).eval()
    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    return ServingModel(model, pp).eval(), pp


def export(serving, path: Path, crop: int) -> Path:
    """``export/onnx_graph.export_onnx`` + its checks: exactly what ``export/to_onnx.py`` ships."""
    from export.onnx_graph import check_graph, export_onnx

    check_graph(export_onnx(serving, path, crop))
    return path


def fp32_onnx(settings: Settings, work: Path, onnx_path: Path | None = None) -> Path:
    """``onnx_path``, or the serving model exported to ``work/model.onnx`` when there is none yet."""
    return onnx_path or export(build_serving(settings)[0], work / "model.onnx", settings.crop)


def images(n: int, crop: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)


def md_table(headers: Sequence[str] | str, rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; ``headers`` may be one string, the columns separated by " | "."""
    if isinstance(headers, str):
        headers = headers.split(" | ")

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: float | None, spec: str = ".0f") -> str:
    """``value`` formatted for a table, or "-" where nothing was measured."""
    return "-" if value is None else format(value, spec)


def write(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """``out_dir/name.json`` and ``out_dir/name.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")


def run_part(name: str, doc: str | None, run: Callable[..., Result], **flags: Any) -> int:
    """``main()`` of a part or study: ``--quick``, ``--out`` and ``--work``, plus an option per ``flags`` entry
    (its ``add_argument`` keywords) whose value ``run`` gets by name; writes and prints the tables."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and few rounds: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    p.add_argument("--work", type=Path, help="keep the data, models and ONNX files here (default: a scratch folder)")
    for flag, options in flags.items():
        p.add_argument("--" + flag.replace("_", "-"), **options)
    args = p.parse_args()
    settings = Settings.make(args.quick)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data, markdown = run(settings, args.work or Path(tmp), **{flag: getattr(args, flag) for flag in flags})
    info = machine()
    write(args.out, name, {"machine": info, **data}, machine_markdown(info) + "\n\n" + markdown)
    print(markdown)
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def entry(main: Callable[[], int]) -> None:
    """Run ``main`` as a program whose SIGINT, SIGTERM and SIGHUP unwind it, so that its servers and worker
    processes stop through their context managers."""
    from serve.children import Stopped, raise_on_stop_signals

    raise_on_stop_signals()
    try:
        code = main()
    except Stopped as e:
        log(f"{e}: stopped")
        code = 128 + e.signum
    raise SystemExit(code)


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    start = time.perf_counter()
    log(f"-- {what}")
    yield
    log(f"   {what}: {time.perf_counter() - start:.0f} s (load {load_average()})")


_noise = functools.cache(images)  # one batch of each size per engine: made once, never written to


def _batch(arg: int | np.ndarray, crop: int) -> np.ndarray:
    return arg if isinstance(arg, np.ndarray) else _noise(arg, crop)


def eager_engine(settings: Settings, bf16: bool = False, state_dict_path: str | None = None) -> Callable[[Any], Any]:
    """PyTorch eager on the serving model: ``fn(batch size)`` runs noise, ``fn(images)`` returns probabilities.
    ``bf16``: under ``torch.autocast`` (the head keeps its second-order part fp32)."""
    import torch

    serving, _ = build_serving(settings)
    if state_dict_path:
        serving.model.load_state_dict(torch.load(state_dict_path, weights_only=True))

    def run(arg: int | np.ndarray) -> np.ndarray | None:
        x = torch.from_numpy(_batch(arg, settings.crop))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probabilities = serving(x)[0]
        return probabilities.float().numpy() if isinstance(arg, np.ndarray) else None

    return run


def onnx_engine(path: str, crop: int) -> Callable[[Any], Any]:
    """onnxruntime on an exported model: ``fn(batch size)`` runs noise, ``fn(images)`` returns probabilities."""
    from export.verify import session

    sess = session(path)

    def run(arg: int | np.ndarray) -> np.ndarray | None:
        (probabilities,) = sess.run(["probabilities"], {"image": _batch(arg, crop)})
        return probabilities if isinstance(arg, np.ndarray) else None

    return run
