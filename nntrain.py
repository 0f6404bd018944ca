"""One epoch of training."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads the time the work really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
          device: torch.device, epoch: int, max_batches: int = 0, *, autocast=None,
          scaler: torch.amp.GradScaler | None = None, channels_last: bool = False) -> tuple[float, float, float, float]:
    """Train for one epoch; return (mean loss, top-1 accuracy %, seconds, images per second).

    Loss and correct counts accumulate on the device; the host reads them about twice a second
    for the progress bar and once at the end, never once per step. ``autocast``: the run's one
    autocast context (model_preparation.autocast); ``scaler``: the fp16 gradient scaler.
    """
    model.train()
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total = min(len(loader), max_batches) if max_batches else len(loader)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, shown_at = 0, 0.0
    synchronize(device)
    start = time.perf_counter()
    bar = tqdm(loader, total=total, desc=f"epoch {epoch + 1} train", leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        if step == total:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
            loss = criterion(logits, labels)
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
        if now - shown_at > 0.5:  # this .item() is the only host sync inside the loop
            shown_at = now
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}, step {step + 1}")
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen / (now - start):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - start
    mean_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}")
    return mean_loss, 100.0 * correct.item() / max(seen, 1), elapsed, seen / elapsed
