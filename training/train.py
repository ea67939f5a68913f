"""Train (or evaluate) a 3G-Net on an ImageFolder dataset: one CPU, one GPU, or many under torchrun.

    python training/train.py DATA_DIR --arch resnet50_3g --recipe imagenet
    torchrun --nproc-per-node 8 training/train.py DATA_DIR --arch resnet50_3g --amp bf16
    python training/train.py DATA_DIR --evaluate --resume ResNet50-3G-ImageNet.pth.tar

DATA_DIR holds ``train/<class>/*`` and ``val/<class>/*``. Every epoch writes
OUTPUT_DIR/checkpoint.pth.tar (atomically; ``--resume`` continues from it),
OUTPUT_DIR/model_best.pth.tar (best val top-1, weights only) and one JSON line in
OUTPUT_DIR/metrics.jsonl. Explicit flags override the ``--recipe`` values.

Exit status:
  0    done (or nothing left to do)
  1    the loss became inf or nan
  2    bad flags or data (a missing split, an empty class, a split with no readable
       image), an unusable checkpoint, or an OUTPUT_DIR that cannot be written (not a
       folder, no space left on device); no checkpoint of the failing epoch is written
  130  interrupted; rerun with --resume
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, DistributedSampler

from threegnet_preprocessing import Preprocessing
from training import distributed
from training.checkpoint import (
    CheckpointError,
    describe_os_error,
    load_model,
    make_checkpoint,
    save_atomic,
)
from training.data import (
    DataError,
    ImageFolderData,
    check_classes,
    collate_skipping,
    eval_transform,
    train_transform,
)
from training.engine import EpochStats, evaluate, train_one_epoch
from training.model import ARCHS, ThreeGNet, create_model

# The released schedules: SGD, momentum 0.9, lr 0.1, wd 1e-4, batch 256, lr x0.1 at the steps.
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {"epochs": 115, "lr_steps": [30, 60, 90]},
    "places365": {"epochs": 55, "lr_steps": [30, 40, 45, 50]},
}
COMMON = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 256}
MODEL_DEFAULTS = {"arch": "resnet50_3g", "num_stages": 3, "dim": 256}
BACKBONE = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
CHECKPOINT, BEST, METRICS = "checkpoint.pth.tar", "model_best.pth.tar", "metrics.jsonl"
RESUMABLE = ("optimizer", "lr_scheduler", "scaler")  # left out of model_best


class UsageError(ValueError):
    """Flags that contradict each other or the data."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--arch", choices=list(ARCHS), help=f"default {MODEL_DEFAULTS['arch']}")
    p.add_argument("--num-stages", type=int, metavar="N", help="re-weighting stages (3 = 3G-Net, 0 = iSQRT-COV head)")
    p.add_argument("--dim", type=int, metavar="D", help="head dimension d (256 = released; fc input d(d+1)/2)")
    p.add_argument(
        "--num-classes", type=int, metavar="N", help="checked against the class folders (default: their count)"
    )
    p.add_argument("--recipe", choices=list(RECIPES), default="imagenet", help="released schedule (default imagenet)")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="N", help="total over all processes (recipe: 256)")
    p.add_argument("--lr", type=float, help="initial learning rate (recipe: 0.1)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--lr-steps", type=int, metavar="EPOCH", nargs="+", help="epochs after which lr is multiplied by --lr-gamma"
    )
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--image-size", type=int, metavar="PX", default=224, help="training and centre crop size")
    p.add_argument("--resize", type=int, metavar="PX", default=256, help="shorter side before the centre crop")
    p.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction (0.08)")
    p.add_argument(
        "--workers", type=int, metavar="N", default=min(8, os.cpu_count() or 1), help="loader processes per rank"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("runs/train"))
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="checkpoint to continue from; alone or 'auto': OUTPUT_DIR/checkpoint.pth.tar if it exists",
    )
    p.add_argument(
        "--finetune", type=Path, metavar="CKPT", help="start from this checkpoint (released or own); new fc if needed"
    )
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head and fc")
    p.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint on val")
    p.add_argument("--ten-crop", action="store_true", help="validate with TenCrop averaged (Places365 protocol)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16: the head runs in fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--max-steps-per-epoch", type=int, metavar="N", help="cut epochs short (quick runs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for key, value in {**COMMON, **RECIPES[args.recipe]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace, world_size: int) -> None:
    problems = [
        (args.epochs < 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.lr <= 0, f"--lr must be > 0, got {args.lr}"),
        (args.image_size < 16, f"--image-size must be >= 16, got {args.image_size}"),
        (
            args.resize < args.image_size,
            f"--resize {args.resize} is smaller than --image-size {args.image_size}",
        ),
        (not 0 < args.min_scale <= 1, f"--min-scale must be in (0, 1], got {args.min_scale}"),
        (args.batch_size < world_size, f"--batch-size {args.batch_size} is below the {world_size} processes"),
        (
            args.batch_size % world_size != 0,
            f"--batch-size {args.batch_size} is not divisible by {world_size}",
        ),
        (args.workers < 0, f"--workers must be >= 0, got {args.workers}"),
        (args.evaluate and args.resume is None, "--evaluate needs a checkpoint: --resume PATH"),
        (args.resume is not None and args.finetune is not None, "--resume and --finetune exclude each other"),
        (
            args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1,
            "--max-steps-per-epoch must be >= 1",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise UsageError(message)


def prepare_output_dir(out: Path, create: bool) -> None:
    """Refuse an OUTPUT_DIR that is not a folder (before any work); ``create`` it on the main rank."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} exists and is not a directory")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--output-dir {out}: cannot create it ({describe_os_error(e)})") from None


def check_read(split: str, stats: EpochStats) -> None:
    """A pass that read no image at all trains or measures nothing: stop before saving it."""
    if stats.images == 0:
        examples = "; ".join(f"{u.path}: {u.reason}" for u in stats.skipped_examples[:3])
        raise DataError(
            f"no readable image in {split}: all {stats.skipped} image file(s) read were unreadable"
            + (f" (e.g. {examples})" if examples else "")
        )


def resume_path(args: argparse.Namespace) -> Path | None:
    """``--resume`` alone/``auto`` means OUTPUT_DIR's checkpoint if there is one (rerun the same command
    after a crash); an explicit path must exist."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = args.output_dir / CHECKPOINT
        if not path.exists() and args.evaluate:
            raise CheckpointError(f"{path}: no such file")
        return path if path.exists() else None
    return Path(args.resume)


def build_model(
    args: argparse.Namespace, classes: list[str], source: Path | None
) -> tuple[ThreeGNet, str, dict[str, Any]]:
    """The model, its arch name and the checkpoint dict it came from (empty when fresh).

    From a checkpoint (resume, evaluate, fine-tune) the architecture is the checkpoint's;
    model flags given explicitly must agree with it rather than be silently ignored.
    """
    if source is None:
        knobs = {k: MODEL_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in MODEL_DEFAULTS}
        arch = knobs.pop("arch")
        return create_model(arch, len(classes), **knobs), arch, {}
    loaded = load_model(source)
    found = {"arch": loaded.arch, **loaded.model_kwargs}
    clash = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {found[k]})"
        for k in MODEL_DEFAULTS
        if getattr(args, k) is not None and getattr(args, k) != found[k]
    ]
    if clash:
        raise UsageError(f"{source} is a different model: {', '.join(clash)}")
    model, raw = loaded.model, loaded.raw
    if args.finetune is not None:
        if loaded.class_names != classes:  # new classes (or unknown ones): a new classifier
            model.fc = nn.Linear(model.fc.in_features, len(classes))
        return model, loaded.arch, raw
    if loaded.num_classes != len(classes):
        raise UsageError(f"{source} has {loaded.num_classes} classes, the data {len(classes)}")
    if loaded.class_names is not None and loaded.class_names != classes:
        raise UsageError(f"{source} was trained on other classes than {args.data}")
    if not args.evaluate and (loaded.released or "optimizer" not in raw):
        raise UsageError(f"{source} holds no training state to resume; use --finetune to start from it")
    return model, loaded.arch, raw


def freeze_backbone(model: ThreeGNet) -> list[nn.Module]:
    """Stop gradients into the ResNet backbone; the caller keeps these modules in eval mode."""
    modules = [getattr(model, name) for name in BACKBONE]
    for module in modules:
        module.requires_grad_(False)
    return modules


def loader(dataset: ImageFolderData, batch_size: int, sampler: Any, args: argparse.Namespace, cuda: bool):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate_skipping,
        pin_memory=cuda,
        persistent_workers=args.workers > 0,
    )


def warn_skipped(split: str, stats: EpochStats) -> None:
    if stats.skipped:
        examples = "; ".join(f"{u.path}: {u.reason}" for u in stats.skipped_examples[:3])
        print(f"warning: skipped {stats.skipped} unreadable image(s) in {split} (e.g. {examples})", flush=True)


def trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs after the checkpoint (a crash between the two writes), atomically."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs_done]
    if kept != lines:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def restore(raw: dict[str, Any], source: Path, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[int, float]:
    """Load the optimizer, lr schedule and grad scaler; returns (epochs done, best val top-1)."""
    try:
        optimizer.load_state_dict(raw["optimizer"])
        scheduler.load_state_dict(raw["lr_scheduler"])
        if raw.get("scaler"):
            scaler.load_state_dict(raw["scaler"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot restore the training state ({e}); same flags?") from None
    return int(raw["epoch"]), float(raw.get("best_top1", 0.0))


def epoch_record(epoch: int, lr: float, train: EpochStats, val: EpochStats, seconds: float, best: float) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": round(train.loss, 5),
        "train_top1": round(train.top1, 3),
        "val_loss": round(val.loss, 5),
        "val_top1": round(val.top1, 3),
        "val_top5": round(val.top5, 3),
        "images_per_s": round(train.images_per_s, 1),
        "time_s": round(seconds, 2),
        "train_images": train.images,
        "val_images": val.images,
        "skipped": train.skipped + val.skipped,
        "best_top1": round(best, 3),
    }


def run(args: argparse.Namespace) -> int:
    classes = check_classes(args.data, ("val",) if args.evaluate else ("train", "val"))
    if args.num_classes is not None and args.num_classes != len(classes):
        raise UsageError(f"--num-classes {args.num_classes}, but {args.data} has {len(classes)} class folders")
    pp = Preprocessing(resize=args.resize, crop=args.image_size)
    val_set = ImageFolderData(args.data / "val", classes, eval_transform(pp, args.ten_crop), min_side=pp.resize)
    if not args.evaluate:
        train_set = ImageFolderData(args.data / "train", classes, train_transform(pp, args.min_scale))
    source = resume_path(args) or args.finetune
    model, arch, raw = build_model(args, classes, source)
    if not args.evaluate:
        prepare_output_dir(args.output_dir, create=distributed.env_rank() == 0)

    ctx = distributed.setup(args.device)  # after every check: bad input never waits on a rendezvous
    check_args(args, ctx.world_size)

    def say(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)

    torch.manual_seed(args.seed + ctx.rank)
    cuda = ctx.device.type == "cuda"
    per_rank = args.batch_size // ctx.world_size
    progress, amp, channels_last = not args.no_progress, args.amp, args.channels_last
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model  # under --amp fp16 its head and fc stay fp32 (ThreeGNet.FP16_FP32_MODULES)
    val_sampler = distributed.ShardSampler(len(val_set), ctx.rank, ctx.world_size)
    val_loader = loader(val_set, per_rank, val_sampler, args, cuda)

    if args.evaluate:
        stats = evaluate(net, val_loader, ctx, amp=amp, channels_last=channels_last, progress=progress)
        warn_skipped("val", stats)
        check_read("val", stats)
        crops = "10-crop" if args.ten_crop else "1-crop"
        result = {"checkpoint": str(source), "protocol": f"{crops} {pp.crop} of {pp.resize}"}
        result |= {"val_loss": round(stats.loss, 4), "val_top1": round(stats.top1, 3)}
        result |= {"val_top5": round(stats.top5, 3), "val_images": stats.images}
        say(json.dumps(result))
        return 0

    frozen = freeze_backbone(model) if args.freeze_backbone else []
    if ctx.distributed:
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if cuda else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == "fp16")
    start_epoch, best_top1 = 0, 0.0
    if args.resume is not None and raw:
        start_epoch, best_top1 = restore(raw, source, optimizer, scheduler, scaler)
        say(f"resumed {source} after epoch {start_epoch} (best val top-1 {best_top1:.2f}%)")
        steps = sorted(scheduler.milestones.elements())
        if (steps, scheduler.gamma) != (sorted(args.lr_steps), args.lr_gamma):
            say(f"note: the lr schedule is the checkpoint's (x{scheduler.gamma:g} after epochs {steps})")
    elif args.finetune is not None:
        say(f"fine-tuning {arch} from {args.finetune}")

    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    train_loader = loader(train_set, per_rank, sampler, args, cuda)
    out = args.output_dir
    if ctx.is_main:
        trim_metrics(out / METRICS, start_epoch)
        for stale in out.glob(".*.pth.tar.*.tmp"):  # left by a process killed inside save_atomic
            stale.unlink()
    say(
        f"{arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {len(classes)} classes, "
        f"{len(train_set)} train / {len(val_set)} val images, {ctx.world_size} process(es) on {ctx.device.type}"
    )
    if start_epoch >= args.epochs:
        say(f"{out / CHECKPOINT} already has {start_epoch} of {args.epochs} epochs; nothing to do")
    for epoch in range(start_epoch, args.epochs):
        lr, tag, start = optimizer.param_groups[0]["lr"], f"epoch {epoch + 1}/{args.epochs}", time.perf_counter()
        say(f"{tag} started (lr {lr:g})")
        sampler.set_epoch(epoch)
        train = train_one_epoch(
            net, train_loader, optimizer, ctx, desc=f"{tag} train", amp=amp, scaler=scaler,
            channels_last=channels_last, max_steps=args.max_steps_per_epoch, frozen=frozen, progress=progress,
        )  # fmt: skip
        check_read("train", train)  # on every rank (the counts are summed over ranks): all stop together
        val = evaluate(net, val_loader, ctx, desc=f"{tag} val", amp=amp, channels_last=channels_last, progress=progress)
        check_read("val", val)
        scheduler.step()
        is_best = val.top1 > best_top1 or epoch == start_epoch == 0
        best_top1 = max(best_top1, val.top1)
        record = epoch_record(epoch + 1, lr, train, val, time.perf_counter() - start, best_top1)
        if not ctx.is_main:
            continue
        warn_skipped("train", train)
        warn_skipped("val", val)
        try:
            with open(out / METRICS, "a") as f:  # before the checkpoint: see trim_metrics
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(f"cannot write {out / METRICS}: {describe_os_error(e)}") from None
        ckpt = make_checkpoint(
            model, arch=arch, class_names=classes, preprocessing=pp, args=vars(args), epoch=epoch + 1,
            metrics=record, optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), best_top1=best_top1,
        )  # fmt: skip
        save_atomic(ckpt, out / CHECKPOINT)
        if is_best:
            save_atomic({k: v for k, v in ckpt.items() if k not in RESUMABLE}, out / BEST)
        say(
            f"{tag}: train loss {train.loss:.4f} top-1 {train.top1:.2f}% | val loss {val.loss:.4f} "
            f"top-1 {val.top1:.2f}% top-5 {val.top5:.2f}% | {train.images_per_s:.0f} img/s, {record['time_s']:.0f} s"
        )
    say(f"done: best val top-1 {best_top1:.2f}%; checkpoints in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    main_rank = distributed.env_rank() == 0
    try:
        check_args(args, 1)
        return run(args)
    except distributed.SetupError as e:  # this rank's own problem: every rank says it
        print(f"train.py: error: [rank {distributed.env_rank()}] {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, UsageError) as e:
        if main_rank:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        if main_rank:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if main_rank:
            print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
