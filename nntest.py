"""Evaluation on the test set."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
             max_batches: int = 0, *, autocast=None, channels_last: bool = False) -> tuple[float, float]:
    """Return (mean loss, top-1 accuracy %) over the loader (at most `max_batches` batches)."""
    model.eval()
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total = min(len(loader), max_batches) if max_batches else len(loader)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (images, labels) in enumerate(tqdm(loader, total=total, desc="test", leave=False,
                                                 dynamic_ncols=True)):
        if step == total:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        loss_sum += criterion(logits.float(), labels) * labels.size(0)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.size(0)
    return loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1)
