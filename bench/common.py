"""What every benchmark shares: the machine's description, timing, the model under test, result files.

Numbers on a shared 2-core machine move with whatever else runs, so nothing here
reports a lone absolute time as the result: each figure that matters is a ratio of
two things timed in the same run, in alternating rounds (A, B, A, B, ...), so a
burst of outside load hits both sides alike. Each series keeps every sample; the
tables show the median, and the JSON keeps the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first on sys.path, not the root
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
ARCH = "resnet50_3g"
CROP = 224
NUM_CLASSES = 1000
# ResNet50-3G at 224x224: about 6.8 GMAC = 13.6 GFLOP per image (docs/performance.md); bench/model_speed.py
# counts it again with torch's FLOP counter and records both.
GFLOP_PER_IMAGE = 13.6
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Settings:
    """How much work a run does: the full benchmark or the quick smoke run (``--quick``)."""

    quick: bool = False
    arch: str = ARCH
    crop: int = CROP
    num_classes: int = NUM_CLASSES
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


# -- the machine --------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key and key not in info:
                info[key] = value.strip()
            if not line.strip() and info:
                break  # the first processor is enough
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """CPU model, cores, the vector/matrix extensions that decide fp32/bf16/int8 speed, versions."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gib = round(int(mem_kib.split()[1]) / 2**20, 1)
    import onnxruntime as ort
    import torch

    return {
        "cpu": info.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cores": usable,
        "logical_cpus": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "onnx": _version("onnx"),
        "numpy": np.__version__,
        "tritonclient": _version("tritonclient"),
        "nvidia-pytriton": _version("nvidia-pytriton"),
        "load_average_at_start": load_average(),
    }


def machine_markdown(m: dict[str, Any]) -> str:
    flags = ", ".join(m["flags"]) or "none of interest"
    return (
        f"Machine: {m['cpu']} (family/model {m['cpu_family_model']}), {m['cores']} cores usable, "
        f"{m['memory_gib']} GiB; flags: {flags}. torch {m['torch']} ({m['torch_threads']} threads, "
        f"{m['torch_cpu_capability']}), onnxruntime {m['onnxruntime']}, Python {m['python']}. "
        f"Load average at start {m['load_average_at_start']}."
    )


# -- timing -------------------------------------------------------------------------------------------


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


class Measured(float):
    """Seconds measured where the work ran (inside a :class:`Worker`), without the IPC around it."""


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes (or what it measured itself, when it returns :class:`Measured`)."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    return float(result) if isinstance(result, Measured) else elapsed


def alternate(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, gap: float = 0.02
) -> dict[str, Series]:
    """Time each function once per round, in turn, ``rounds`` times (after ``warmup`` untimed rounds).

    Alternating rather than timing A ``n`` times then B ``n`` times is what makes the
    ratio of A to B trustworthy on a machine whose load changes by the second. The
    ``gap`` lets the previous engine's thread pool stop spinning before the next starts.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            time.sleep(gap)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(timed(fn))
            time.sleep(gap)
    return {name: Series(s) for name, s in out.items()}


def _worker_main(conn: Any, factory: Callable[..., Callable[[Any], object]], args: tuple) -> None:
    try:
        fn = factory(*args)
        conn.send(("ready", None))
    except BaseException as e:  # report it; never leave the parent waiting
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        command, arg = conn.recv()
        if command != "run":
            return
        try:
            start = time.perf_counter()
            result = fn(arg)
            conn.send(("done", (time.perf_counter() - start, result)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    """An engine (PyTorch eager, an onnxruntime session, a matrix multiply) in a process of its own.

    Two engines in one process disturb each other: onnxruntime's intra-op threads keep spinning
    after a run, and PyTorch's OpenMP team, waiting at a barrier for all its threads, loses whole
    time slices to them. So each engine gets a process, and only one of them works at a time.
    ``factory(*args)`` runs in the child (a module-level function, for pickling) and
    returns ``fn(arg)``; :meth:`run` calls it there and returns (seconds, its result).
    """

    def __init__(self, factory: Callable[..., Callable[[Any], object]], *args: Any) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.name = factory.__name__
        self.process = ctx.Process(target=_worker_main, args=(child, factory, args), daemon=True)
        self.process.start()
        status, detail = self._conn.recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"benchmark worker {self.name} failed to start: {detail}")

    def run(self, arg: Any = None) -> tuple[float, Any]:
        self._conn.send(("run", arg))
        status, detail = self._conn.recv()
        if status != "done":
            raise RuntimeError(f"benchmark worker {self.name}: {detail}")
        return detail

    def bind(self, arg: Any = None) -> Callable[[], Measured]:
        """A no-argument callable for :func:`alternate` that reports the worker's own timing."""
        return lambda: Measured(self.run(arg)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send(("stop", None))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


# -- models -------------------------------------------------------------------------------------------


def ort_session(path: str | Path, threads: int = 0, profile_prefix: str | None = None, **config: str):
    """An onnxruntime CPU session the way the server builds one (all graph optimizations on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_serving(settings: Settings, seed: int = 0):
    """The project's model in its serving wrapper (uint8 NHWC in), random weights: speed does not
    depend on them. BatchNorm statistics are left at their defaults."""
    import torch

    from export.serving_model import ServingModel
    from threegnet_preprocessing import Preprocessing
    from training.model import create_model

    torch.manual_seed(seed)
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
    if onnx_path is None:
        serving, _ = build_serving(settings)
        onnx_path = export(serving, work / "model.onnx", settings.crop)
    return onnx_path


def images(n: int, crop: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)


# -- output -------------------------------------------------------------------------------------------


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


def run_part(
    name: str,
    doc: str | None,
    run: Callable[..., tuple[dict[str, Any], str]],
    flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """``main()`` of a part: ``--quick``, ``--out`` and ``--work``, plus what ``flags(parser)`` adds (then
    ``run`` gets the parsed arguments too); runs it in a scratch folder, writes and prints its tables."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and few rounds: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    p.add_argument("--work", type=Path, help="keep the data, models and ONNX files here (default: a scratch folder)")
    if flags is not None:
        flags(p)
    args = p.parse_args()
    settings = Settings.make(args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = args.work or Path(tmp)
        data, markdown = run(settings, work) if flags is None else run(settings, work, args)
    info = machine()
    write(args.out, name, {"machine": info, **data}, machine_markdown(info) + "\n\n" + markdown)
    print(markdown)
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def entry(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main`` as a program that owns what it starts: SIGINT, SIGTERM and
    SIGHUP unwind it (servers and worker processes stop through their context managers)."""
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


# -- engines, built inside a Worker ------------------------------------------------------------------


def _batch(arg: int | np.ndarray, crop: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    if isinstance(arg, np.ndarray):
        return arg
    if arg not in cache:
        cache[arg] = images(arg, crop)
    return cache[arg]


def eager_engine(settings: Settings, bf16: bool = False, state_dict_path: str | None = None) -> Callable[[Any], Any]:
    """PyTorch eager on the serving model: ``fn(batch size)`` times noise, ``fn(images)`` returns
    probabilities. ``bf16``: under ``torch.autocast`` (the head keeps its second-order part fp32)."""
    import torch

    serving, _ = build_serving(settings)
    if state_dict_path:
        serving.model.load_state_dict(torch.load(state_dict_path, weights_only=True))
    cache: dict[int, np.ndarray] = {}

    def run(arg: int | np.ndarray) -> np.ndarray | None:
        x = torch.from_numpy(_batch(arg, settings.crop, cache))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probabilities = serving(x)[0]
        return probabilities.float().numpy() if isinstance(arg, np.ndarray) else None

    return run


def onnx_engine(path: str, crop: int, threads: int = 0, config: dict[str, str] | None = None) -> Callable[[Any], Any]:
    """onnxruntime on an exported model: ``fn(batch size)`` times noise, ``fn(images)`` returns
    probabilities."""
    sess = ort_session(path, threads, **(config or {}))
    cache: dict[int, np.ndarray] = {}

    def run(arg: int | np.ndarray) -> np.ndarray | None:
        (probabilities,) = sess.run(["probabilities"], {"image": _batch(arg, crop, cache)})
        return probabilities if isinstance(arg, np.ndarray) else None

    return run
