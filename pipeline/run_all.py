"""``make demo``: see the whole pipeline work on built-in data.

Generates the built-in dataset, trains a small 3G-Net on the CPU, exports it,
starts Triton through ``serve/launch.py`` and the Gradio demo through
``client/demo.py``, then prints the URLs; Ctrl-C stops everything. Each stage is
the same command a user would run by hand (printed before it runs), and a second
run reuses what the first one made:

    python pipeline/run_all.py                    # generate, train, export, serve, demo
    python pipeline/run_all.py --retrain          # train (and export) again
    python pipeline/run_all.py --checkpoint ResNet50-3G-ImageNet.pth.tar   # serve a released model
    python pipeline/run_all.py --headless --tiny  # CI: tiny settings, predict over gRPC, stop
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from serve.children import (
    NotAnswering,
    Stopped,
    raise_on_stop_signals,
    spawn,
    stop,
    wait_any,
    wait_http_ok,
)

ROOT = Path(__file__).resolve().parents[1]

PY = sys.executable
# Seconds a stage gets to stop on SIGTERM before SIGKILL: Triton drains for its exit timeout (5 s here).
STOP_GRACE = {"server": 12.0, "other": 5.0}

# Built-in data and training budget: a few minutes on 2 CPU cores, clearly better than chance.
RECIPES = {
    "demo": {  # docs/training.md: ~100% val top-1 on 8 classes (chance 12.5%), ~2-3 min on 2 idle cores
        "data": ["--classes", "8", "--per-class", "150", "--val-per-class", "50", "--size", "128"],
        "train": ["--arch", "resnet18_3g", "--dim", "64", "--image-size", "64", "--resize", "80",
                  "--min-scale", "0.25", "--epochs", "15", "--lr-steps", "10", "13",
                  "--batch-size", "32", "--lr", "0.1", "--workers", "1"],
    },
    "tiny": {  # for the end-to-end test: seconds, accuracy irrelevant
        "data": ["--classes", "3", "--per-class", "6", "--val-per-class", "2", "--size", "48"],
        "train": ["--arch", "resnet18_3g", "--dim", "16", "--image-size", "32", "--resize", "36",
                  "--epochs", "1", "--batch-size", "6", "--lr", "0.05"],
    },
}  # fmt: skip


def log(message: str) -> None:
    tag = "\033[1m[demo]\033[0m" if sys.stderr.isatty() else "[demo]"
    print(f"{tag} {message}", file=sys.stderr, flush=True)


class Children:
    """The processes this pipeline started. Each runs in its own process group and dies with
    the pipeline (even when it is SIGKILLed); :meth:`stop_all` stops the ones still running,
    the newest first, each with SIGTERM and then SIGKILL."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen, float]] = []

    def start(self, cmd: list[str], grace: float = STOP_GRACE["other"]) -> subprocess.Popen:
        log("$ " + shlex.join(str(c) for c in cmd))
        proc = spawn([str(c) for c in cmd], cwd=ROOT)
        self.procs.append((proc, grace))
        return proc

    def run(self, cmd: list[str]) -> None:
        """One stage in the foreground (its progress bars show), failing loudly."""
        proc = self.start(cmd)
        if proc.wait() != 0:
            raise SystemExit(f"[demo] stage failed with status {proc.returncode}: {shlex.join(map(str, cmd))}")

    def stop_all(self) -> None:
        for proc, grace in reversed(self.procs):
            stop(proc, grace)


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    try:
        wait_http_ok(url, proc, timeout)
    except NotAnswering as e:
        raise SystemExit(f"[demo] {what} {e}") from None


def _exported_parameters(repository: Path, name: str) -> dict[str, str]:
    """The parameters an existing export records in its config (empty when there is none)."""
    config = repository / name / "config.pbtxt"
    if not config.exists():
        return {}
    from export.triton_config import parse_pbtxt

    return {k: v.string_value for k, v in parse_pbtxt(config.read_text()).parameters.items()}


def exported_sha(repository: Path, name: str) -> str | None:
    """The checkpoint sha256 an existing export records in its config, if any."""
    return _exported_parameters(repository, name).get("source_sha256")


def exported_preprocessing(repository: Path, name: str) -> dict:
    """The export's preprocessing record (resize, crop, ...), read from its config file."""
    return json.loads(_exported_parameters(repository, name).get("preprocessing") or "{}")


def accuracy(run_dir: Path) -> float | None:
    log_file = run_dir / "metrics.jsonl"
    if not log_file.exists():
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    tops = [r["val_top1"] for r in rows if "val_top1" in r]
    return max(tops) if tops else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint (e.g. a released one) instead of training")
    p.add_argument("--retrain", action="store_true", help="train and export again even if a model exists")
    p.add_argument("--tiny", action="store_true", help="tiny data and one short epoch (tests)")
    p.add_argument("--headless", action="store_true", help="no Gradio: classify the val images over gRPC and stop")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--supervisor-metrics-port", type=int, default=8003)
    p.add_argument("--demo-port", type=int, default=7860)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT (a terminal's Ctrl-C or `kill -INT`), SIGTERM and SIGHUP: stop every stage and exit.
    raise_on_stop_signals()
    children = Children()
    try:
        return pipeline(args, children)
    except Stopped as e:
        log(f"{e}: stopping")
        return 0 if e.signum == 2 else 128 + e.signum  # Ctrl-C is how the demo is meant to end
    finally:
        children.stop_all()
        log("stopped")


def pipeline(args: argparse.Namespace, children: Children) -> int:
    recipe = RECIPES["tiny" if args.tiny else "demo"]
    started = time.perf_counter()
    run = children.run

    # 1. Built-in data (also the demo's examples).
    if not (args.data_dir / "val").is_dir():
        run([PY, "training/synthetic.py", str(args.data_dir), *recipe["data"], "--seed", "0"])
    else:
        log(f"reusing the built-in data in {args.data_dir}")

    # 2. A checkpoint: given, reused or trained.
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.run_dir / "model_best.pth.tar"
        if args.retrain or not checkpoint.exists():
            run([PY, "training/train.py", str(args.data_dir), *recipe["train"], "--output-dir", str(args.run_dir)])
        else:
            log(f"reusing {checkpoint} (make demo RETRAIN=1 to train again)")
        top1 = accuracy(args.run_dir)
        if top1 is not None:
            chance = 100 / len(os.listdir(args.data_dir / "val"))
            log(f"held-out top-1 of the demo model: {top1:.1f}% (chance: {chance:.1f}%)")
    elif not checkpoint.exists():
        raise SystemExit(f"[demo] {checkpoint}: no such checkpoint")

    # 3. Export, unless the repository already holds this very checkpoint.
    from training.checkpoint import sha256sum

    if exported_sha(args.model_repository, "threegnet") != sha256sum(checkpoint):
        run([PY, "export/to_onnx.py", "--checkpoint", str(checkpoint), "--output-dir", str(args.model_repository),
             "--version", "1", "--force"])  # fmt: skip
    else:
        log(f"reusing the export in {args.model_repository}")

    # 4. Triton, through the launcher (a short exit timeout: the demo's own connections stay open).
    server_cmd = [PY, "serve/launch.py", "--model-repository", str(args.model_repository), "--quiet",
                  "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port),
                  "--metrics-port", str(args.metrics_port),
                  "--supervisor-metrics-port", str(args.supervisor_metrics_port), "--exit-timeout", "5"]  # fmt: skip
    server = children.start(server_cmd, grace=STOP_GRACE["server"])
    wait_http(f"http://127.0.0.1:{args.http_port}/v2/health/ready", server, "Triton")
    grpc_url = f"127.0.0.1:{args.grpc_port}"
    if args.headless:
        run([PY, "client/predict.py", str(args.data_dir / "val"), "--url", grpc_url, "--protocol", "grpc",
             "--top-k", "3", "--json"])  # fmt: skip
        log(f"pipeline done in {time.perf_counter() - started:.0f} s")
        return 0
    # The locked server keeps the preprocessing record private; the demo draws the weight map over the crop.
    resize = exported_preprocessing(args.model_repository, "threegnet").get("resize")
    demo_cmd = [PY, "client/demo.py", "--url", grpc_url, "--port", str(args.demo_port),
                "--examples", str(args.data_dir / "val"), *(["--resize", str(resize)] if resize else [])]  # fmt: skip
    demo = children.start(demo_cmd)
    wait_http(f"http://127.0.0.1:{args.demo_port}/", demo, "the Gradio demo", timeout=120)
    log(
        f"ready in {time.perf_counter() - started:.0f} s:\n"
        f"    demo     http://127.0.0.1:{args.demo_port}   <- open this in a browser\n"
        f"    Triton   http://127.0.0.1:{args.http_port} (HTTP), 127.0.0.1:{args.grpc_port} (gRPC), "
        f"http://127.0.0.1:{args.metrics_port}/metrics\n"
        f"    CLI      python client/predict.py {args.data_dir / 'val'} --url {grpc_url}\n"
        "Ctrl-C to stop."
    )
    ended = wait_any([server, demo])
    raise SystemExit(f"[demo] {'Triton' if ended is server else 'the Gradio demo'} exited ({ended.returncode})")


if __name__ == "__main__":
    sys.exit(main())
