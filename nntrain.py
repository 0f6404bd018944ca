"""One epoch of training."""
from __future__ import annotations

import contextlib
import math
import threading
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import distributed


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """`stop` was set (by SIGINT or SIGTERM); the message says where training stopped."""


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads the time the work really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def earliest_bad_step(first_bad_step: torch.Tensor) -> torch.Tensor:
    """Over the ranks, the earliest step with a non-finite loss (0: none on any rank). The ranks
    take their steps together, so every rank then reports the same step."""
    if not distributed.distributed():
        return first_bad_step
    never = torch.iinfo(first_bad_step.dtype).max
    step = torch.where(first_bad_step == 0, never, first_bad_step)  # 0 means "none", not "earliest"
    distributed.all_reduce_min(step)
    return torch.where(step == never, 0, step)


def check_finite(first_bad_step: torch.Tensor, epoch: int) -> None:
    """Raise NonFiniteLossError if the device recorded a non-finite loss (a host sync)."""
    step = int(first_bad_step.item())
    if step:
        raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}, step {step} "
                                 f"(found on the device a few steps later)")


def train(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
          device: torch.device, epoch: int, max_batches: int = 0, *, autocast=None,
          scaler: torch.amp.GradScaler | None = None, channels_last: bool = False,
          stop: threading.Event | None = None) -> tuple[float, float, float, float]:
    """Train for one epoch; return (mean loss, top-1 accuracy %, seconds, images per second).

    Loss and correct counts accumulate on the device; the host reads them about twice a second
    for the progress bar and once at the end, never once per step. ``autocast``: the run's one
    autocast context (model_preparation.autocast); ``scaler``: the fp16 gradient scaler.
    A non-finite loss raises NonFiniteLossError naming its step: on the CPU before that step is
    applied; on an accelerator (no per-step sync) at the next read, the first bad step being
    recorded on the device. When `stop` is set, TrainingInterrupted is raised before the next step.

    Under torchrun the ranks agree after every forward pass (one all-reduce of three flags on the
    CPU, no device sync) whether any rank was stopped, had a non-finite loss (CPU) or wants its
    twice-a-second read, so that they all stop at the same step; loss, accuracy and images per
    second are over all ranks.
    """
    model.train()
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total = min(len(loader), max_batches) if max_batches else len(loader)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad_step = torch.zeros((), device=device, dtype=torch.long)  # 1-based; 0: none yet
    seen, shown_at = 0, 0.0
    synchronize(device)
    start = time.perf_counter()
    several = distributed.distributed()
    bar = tqdm(loader, total=total, desc=f"epoch {epoch + 1} train", leave=False, dynamic_ncols=True,
               disable=not distributed.is_main())
    for step, (images, labels) in enumerate(bar):
        if step == total:
            break
        if not several and stop is not None and stop.is_set():
            raise TrainingInterrupted(f"epoch {epoch + 1}, step {step + 1} of {total}")
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
            loss = criterion(logits, labels)
        if several:  # before the backward pass, whose gradient all-reduce every rank must join
            read_now = time.perf_counter() - shown_at > 0.5
            stopping, bad, read_now = distributed.any_rank(stop is not None and stop.is_set(),
                                                    device.type == "cpu" and not math.isfinite(loss.item()),
                                                    read_now)
            if stopping:
                raise TrainingInterrupted(f"epoch {epoch + 1}, step {step + 1} of {total}")
            if bad:
                raise NonFiniteLossError(f"non-finite training loss on a rank in epoch {epoch + 1}, step {step + 1}")
        if device.type == "cpu" and not several:  # a check is free on the CPU: stop before the step is applied
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) in epoch {epoch + 1}, "
                                         f"step {step + 1}")
        elif device.type != "cpu":  # remember the first bad step on the device, read at the next sync
            bad = (first_bad_step == 0) & ~torch.isfinite(loss.detach())
            first_bad_step = torch.where(bad, step + 1, first_bad_step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # a disabled scaler passes straight through
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        # accumulate without leaving the device
        loss_sum += loss.detach() * labels.size(0)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.size(0)
        now = time.perf_counter()
        if (read_now if several else now - shown_at > 0.5):  # these .item() are the only host syncs in the loop
            shown_at = now
            first_bad_step = earliest_bad_step(first_bad_step)  # every rank raises, or none
            check_finite(first_bad_step, epoch)
            mean_loss = loss_sum.item() / seen
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen / (now - start):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - start
    if several:  # sums over the ranks; the first bad step of any rank
        seen_all = torch.tensor(seen, device=device)
        distributed.all_reduce_sum(loss_sum, correct, seen_all)
        first_bad_step = earliest_bad_step(first_bad_step)
        seen = int(seen_all.item())
    check_finite(first_bad_step, epoch)
    mean_loss = loss_sum.item() / max(seen, 1)
    return mean_loss, 100.0 * correct.item() / max(seen, 1), elapsed, seen / elapsed
