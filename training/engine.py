"""One training epoch and one evaluation pass, for one process or one rank of many.

Running sums stay on the device and are read back only when the progress bar is
refreshed, so a GPU is not stalled by a host sync every step. The epoch's totals are
summed over all ranks: the numbers returned are those of the whole dataset.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from training.data import Batch, Unreadable
from training.distributed import Context, all_reduce_sum

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_REFRESH_STEPS = 10  # progress bar refresh (one host sync) every this many steps


@dataclass
class EpochStats:
    """Totals of one pass over a split, summed over ranks."""

    loss: float
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    images: int
    seconds: float
    skipped: int  # unreadable files met on all ranks
    skipped_examples: list[Unreadable] = field(default_factory=list)  # this rank's, for the warning

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    images = batch.images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch.targets.to(device, non_blocking=True)


def _correct(logits: Tensor, targets: Tensor, ks: Sequence[int]) -> list[Tensor]:
    """Per k, how many targets are among the top-k logits."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == targets[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def _bar(iterable: Iterable, ctx: Context, progress: bool, desc: str, total: int) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        file=sys.stderr,
        disable=not (progress and ctx.is_main),
        mininterval=0.5 if interactive else 30.0,  # a log file gets a line every 30 s, not a flood
        dynamic_ncols=interactive,
        unit="step",
    )


def _finish(sums: Sequence[Tensor | float], seconds: float, skipped: list[Unreadable], ctx: Context) -> EpochStats:
    loss, correct1, correct5, n, n_skipped = all_reduce_sum([float(s) for s in sums] + [float(len(skipped))], ctx)
    per_image = 1.0 / n if n else 0.0  # no image read: true counts, zero averages (the caller decides)
    return EpochStats(
        loss=loss * per_image,
        top1=100.0 * correct1 * per_image,
        top5=100.0 * correct5 * per_image,
        images=int(n),
        seconds=seconds,
        skipped=int(n_skipped),
        skipped_examples=skipped[:5],
    )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    ctx: Context,
    *,
    desc: str = "train",
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
    frozen: Sequence[nn.Module] = (),
    progress: bool = True,
) -> EpochStats:
    """SGD over one pass of ``loader`` (or ``max_steps`` batches).

    ``frozen`` modules stay in eval mode (their BatchNorm statistics do not move).
    A batch whose every file was unreadable is skipped; under DDP the ``join``
    context lets this rank run one step fewer than the others without a hang.
    Raises ``FloatingPointError`` when the loss stops being finite (outside fp16,
    where the gradient scaler deals with overflowing steps).
    """
    model.train()
    for module in frozen:
        module.eval()
    device = ctx.device
    total = len(loader) if max_steps is None else min(len(loader), max_steps)  # type: ignore[arg-type]
    zero = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum, correct1, correct5, bad = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    n, skipped, start = 0, [], time.perf_counter()
    join = model.join() if ctx.distributed else contextlib.nullcontext()  # type: ignore[operator]
    with join, _bar(itertools.islice(loader, total), ctx, progress, desc, total) as bar:
        for step, batch in enumerate(bar):
            skipped.extend(batch.skipped)
            if len(batch) == 0:
                continue
            images, targets = _to_device(batch, device, channels_last)
            with autocast(device, amp):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            finite = torch.isfinite(loss.detach())
            bad += ~finite
            loss_sum += torch.where(finite, loss.detach().double(), zero) * len(batch)
            c1, c5 = _correct(logits.detach(), targets, (1, min(5, logits.shape[1])))
            correct1 += c1
            correct5 += c5
            n += len(batch)
            if step % _REFRESH_STEPS == 0 or step == total - 1:
                if bad.item() and amp != "fp16":
                    raise FloatingPointError(f"{desc}: the loss became inf or nan by step {step} (try a lower --lr)")
                rate = n * ctx.world_size / (time.perf_counter() - start)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / n:.3f}",
                    top1=f"{100 * correct1.item() / n:.1f}",
                    img_s=f"{rate:.0f}",
                )
    return _finish([loss_sum, correct1, correct5, n], time.perf_counter() - start, skipped, ctx)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    ctx: Context,
    *,
    desc: str = "val",
    amp: str | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> EpochStats:
    """Loss and top-1/top-5 over ``loader``; ten-crop batches ``(B, 10, 3, H, W)`` average the logits.

    Runs the unwrapped model: evaluation needs no gradient sync, and each rank may hold
    a different number of batches (see :class:`training.distributed.ShardSampler`).
    """
    model = getattr(model, "module", model).eval()
    device = ctx.device
    zero = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum, correct1, correct5 = zero.clone(), zero.clone(), zero.clone()
    n, skipped, start = 0, [], time.perf_counter()
    with _bar(loader, ctx, progress, desc, len(loader)) as bar:  # type: ignore[arg-type]
        for batch in bar:
            skipped.extend(batch.skipped)
            if len(batch) == 0:
                continue
            images, targets = _to_device(batch, device, channels_last)
            crops = images.shape[1] if images.dim() == 5 else 0
            if crops:
                images = images.flatten(0, 1)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(images).float()
            if crops:
                logits = logits.view(len(batch), crops, -1).mean(dim=1)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            c1, c5 = _correct(logits, targets, (1, min(5, logits.shape[1])))
            correct1 += c1
            correct5 += c5
            n += len(batch)
    return _finish([loss_sum, correct1, correct5, n], time.perf_counter() - start, skipped, ctx)
