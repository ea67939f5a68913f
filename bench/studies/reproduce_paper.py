"""A small reproduction of the paper's comparison on the built-in textures, on this machine's CPU.

Three classifiers on the same ResNet-18 backbone (layer4 at stride 1), the same data,
schedule, seed and epochs, differing only in the head:

- ``gap``: global average pooling + fc (the first-order baseline, "plain ResNet");
- ``isqrt``: covariance pooling + Newton-Schulz square root, no re-weighting (0 stages,
  the iSQRT-COV-style head);
- ``3g``: the 3-stage global generalized-Gaussian head (3G-Net).

    python -m bench.studies.reproduce_paper                 # all three, two seeds
    python -m bench.studies.reproduce_paper --models 3g     # one row of the table

Writes ``bench/results/reproduce_paper.{md,json}``. Final-epoch val top-1 is reported (no
model selection on the val split); a couple of seeds give an idea of the spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import mean

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from bench.common import RESULTS, entry
from threegnet_preprocessing import Preprocessing
from training import distributed
from training.data import ImageFolderData, check_classes, collate_skipping, eval_transform, train_transform
from training.engine import evaluate, train_one_epoch
from training.model import create_model
from training.synthetic import generate

MODELS = {
    "gap": "ResNet-18 + global average pooling",
    "isqrt": "ResNet-18 + iSQRT-COV-style head (0 stages)",
    "3g": "ResNet-18 + 3G head (3 stages)",
}


class GapNet(nn.Module):
    """The 3G-Net backbone (same layers, same initialization) with global average pooling."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        net = create_model("resnet18_3g", num_classes, num_stages=0, dim=8)
        self.features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.fc = nn.Linear(net.layer4[-1].conv2.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def build(name: str, num_classes: int, dim: int) -> nn.Module:
    if name == "gap":
        return GapNet(num_classes)
    return create_model("resnet18_3g", num_classes, num_stages=3 if name == "3g" else 0, dim=dim)


def train_and_evaluate(name: str, data: Path, args: argparse.Namespace, seed: int) -> dict:
    """One model, one seed: the training script's recipe, minus the files."""
    ctx = distributed.setup(args.device)
    classes = check_classes(data, ("train", "val"))
    pp = Preprocessing(resize=args.resize, crop=args.image_size)
    train_set = ImageFolderData(data / "train", classes, train_transform(pp, args.min_scale))
    val_set = ImageFolderData(data / "val", classes, eval_transform(pp), min_side=pp.resize)
    torch.manual_seed(seed)
    model = build(name, len(classes), args.dim).to(ctx.device)
    generator = torch.Generator().manual_seed(seed)
    loader = {"batch_size": args.batch_size, "num_workers": args.workers, "collate_fn": collate_skipping}
    train_loader = DataLoader(train_set, sampler=RandomSampler(train_set, generator=generator), **loader)
    val_loader = DataLoader(val_set, sampler=SequentialSampler(val_set), **loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = MultiStepLR(optimizer, milestones=args.lr_steps, gamma=0.1)
    start, history = time.perf_counter(), []
    for epoch in range(args.epochs):
        tag = f"{name} seed {seed} epoch {epoch + 1}/{args.epochs}"
        train = train_one_epoch(model, train_loader, optimizer, ctx, desc=f"{tag} train")
        val = evaluate(model, val_loader, ctx, desc=f"{tag} val")
        scheduler.step()
        history.append(round(val.top1, 2))
        print(f"{tag}: train top-1 {train.top1:.1f}% | val top-1 {val.top1:.2f}% top-5 {val.top5:.2f}%", flush=True)
    return {
        "seed": seed,
        "val_top1": round(val.top1, 2),
        "val_top5": round(val.top5, 2),
        "best_val_top1": max(history),
        "val_top1_per_epoch": history,
        "train_seconds": round(time.perf_counter() - start, 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    return f"{cpu}, {where}, torch {torch.__version__}, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params (M) | val top-1 % (final, per seed) | mean | train time (s) | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{run['val_top1']:.1f}" for run in r["runs"])
        seconds = sum(run["train_seconds"] for run in r["runs"])
        lines.append(
            f"| {MODELS[r['model']]} | {r['runs'][0]['params_m']} | {per_seed} | {r['mean_val_top1']:.1f} | "
            f"{seconds:.0f} | `{r['command']}` |"
        )
    return "\n".join(lines)


def _without_models(argv: list[str]) -> list[str]:
    """The command-line flags minus ``--models ...``: a row's command adds its own."""
    out, skipping = [], False
    for arg in argv:
        skipping = arg == "--models" or (skipping and not arg.startswith("-"))
        if not skipping:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--data", type=Path, help="ImageFolder root (default: textures generated in bench/results)")
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr-steps", type=int, nargs="+", default=[14, 18])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize", type=int, default=80)
    p.add_argument("--min-scale", type=float, default=0.25)
    p.add_argument("--dim", type=int, default=64, help="head dimension of isqrt and 3g")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the comparison is made on the CPU")
    p.add_argument("--output", type=Path, default=RESULTS / "reproduce_paper", help="OUTPUT.md and OUTPUT.json")
    args = p.parse_args(argv)

    data = args.data or RESULTS / f"textures-{args.classes}x{args.per_class}+{args.val_per_class}"
    if not (data / "train").exists():
        generate(data, args.classes, args.per_class, args.val_per_class, size=128, seed=0)
    shared = _without_models(list(argv if argv is not None else sys.argv[1:]))
    rows = []
    for name in args.models:
        runs = [train_and_evaluate(name, data, args, seed) for seed in args.seeds]
        command = shlex.join(["python", "-m", "bench.studies.reproduce_paper", "--models", name, *shared])
        rows.append(
            {"model": name, "command": command, "mean_val_top1": mean(r["val_top1"] for r in runs), "runs": runs}
        )
    report = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_name(args.output.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    text = f"{table(rows)}\n\nMachine: {report['machine']}\n"
    args.output.with_name(args.output.name + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    entry(main)
