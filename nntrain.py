"""One epoch of training: the step (forward, loss, backward, optimizer step), the loop around it, and
how it stops early (a SIGINT or SIGTERM, a non-finite loss, a device out of memory)."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import distributed

READ_EVERY_S = 0.5  # the host reads the device's sums (progress bar, non-finite check) this often


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """`stop` was set (by SIGINT or SIGTERM); the message says where training stopped."""


def out_of_memory_message(config: dict) -> str:
    """One line for a device out of memory: the batch size and the memory the card has."""
    card = "the device"
    if config["device"] != "cpu" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        card = f"the {properties.name} ({properties.total_memory / 2 ** 30:.1f} GiB)"
    smaller = max(config["batch_size"] // 2, 1)
    return (f"out of memory: BATCH_SIZE={config['batch_size']} does not fit on {card}; try --batch-size {smaller} "
            f"(the last checkpoint is intact)")


class StopRequest:
    """Set by the first SIGINT or SIGTERM: training stops before its next step. A second signal
    acts at once (KeyboardInterrupt, or the default SIGTERM)."""

    def __init__(self, prog: str):
        self.prog = prog  # the script the messages name
        self.event = threading.Event()
        self.signal = None
        self.resume_from = ""  # the checkpoint a stop resumes from, once there is one
        self.owner = os.getpid()

    def name(self) -> str:
        """The signal that stopped the run, as the messages name it."""
        if self.signal is not None:
            return self.signal.name
        return "a signal to another rank" if distributed.distributed() else "SIGINT"

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.owner:  # a forked DataLoader worker
            if signum == signal.SIGTERM:  # as without this handler: the DataLoader ends stuck workers so
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # Ctrl-C reaches the whole process group: the main process decides
        self.signal = signal.Signals(signum)
        self.event.set()
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        os.write(2, f"\n{self.prog}: {self.signal.name}: stopping before the next training step "
                    f"(send it again to stop at once)\n".encode())


@contextlib.contextmanager
def stop_on_signals(prog: str):
    """A StopRequest that SIGINT and SIGTERM set while the block runs."""
    stop = StopRequest(prog)
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads the time the work really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class EagerStep:
    """One training step, op by op: forward, loss, backward, optimizer step.

    ``autocast``: the run's autocast context (speed.Speed.autocast); ``scaler``: the fp16
    gradient scaler (a disabled one passes straight through). ``mark_steps``: tell torch.compile's
    CUDA graphs (modes reduce-overhead, max-autotune) that a new step begins.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast=None, scaler: torch.amp.GradScaler | None = None, mark_steps: bool = False):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.mark_steps = mark_steps

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, check=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of the step; ``check(loss)`` runs before anything is applied."""
        if self.mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        if check is not None:
            check(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logits.detach(), loss.detach()


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


class StepChecks:
    """Stop requests, non-finite losses and the torchrun agreement on both, for one epoch's steps.

    One process: a set ``stop`` raises TrainingInterrupted before the next step (``before``). A
    non-finite loss raises NonFiniteLossError naming its step: on the CPU before that step is
    applied (``loss``, a free check there); on an accelerator the first bad step is recorded on
    the device and raised at the next read (``read_due``, every READ_EVERY_S, and ``finish``).
    Under torchrun the ranks agree after every forward pass (one all-reduce of three flags on the
    CPU, no device sync) whether any rank was stopped, had a non-finite loss (CPU) or wants its
    read, so that they all stop at the same step.
    """

    def __init__(self, device: torch.device, epoch: int, total: int, stop: threading.Event | None):
        self.epoch, self.total, self.stop = epoch, total, stop
        self.several = distributed.distributed()
        self.check_at_once = device.type == "cpu"  # free on the CPU; a host sync on an accelerator
        self.first_bad_step = torch.zeros((), device=device, dtype=torch.long)  # 1-based; 0: none yet
        self.step, self.read_at, self.read_now = 0, time.perf_counter(), False

    def where(self) -> str:
        return f"epoch {self.epoch + 1}, step {self.step} of {self.total}"

    def before(self, index: int) -> None:
        """Step ``index`` (0-based) is about to start: raise if a stop was requested."""
        self.step = index + 1
        if not self.several and self.stop is not None and self.stop.is_set():
            raise TrainingInterrupted(self.where())

    def loss(self, loss: torch.Tensor) -> None:
        """The step's loss, before its backward pass (whose gradient all-reduce every rank must join)."""
        at_once = self.check_at_once
        if self.several:
            stopping, bad, self.read_now = distributed.any_rank(
                self.stop is not None and self.stop.is_set(), at_once and not math.isfinite(loss.item()),
                time.perf_counter() - self.read_at > READ_EVERY_S)
            if stopping:
                raise TrainingInterrupted(self.where())
            if bad:
                raise NonFiniteLossError(f"non-finite training loss on a rank in epoch {self.epoch + 1}, step {self.step}")
        elif at_once and not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) in epoch {self.epoch + 1}, "
                                     f"step {self.step}")
        if not at_once:  # remember the first bad step on the device, read at the next read
            bad = (self.first_bad_step == 0) & ~torch.isfinite(loss.detach())
            self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)

    def read_due(self) -> bool:
        """True (after raising for a recorded non-finite loss) when the host should read the sums now."""
        now = time.perf_counter()
        if not (self.read_now if self.several else now - self.read_at > READ_EVERY_S):
            return False
        self.read_at = now
        self.finish()  # every rank raises, or none
        return True

    def finish(self) -> None:
        """Raise NonFiniteLossError for the earliest non-finite loss any rank recorded (a host sync)."""
        self.first_bad_step = earliest_bad_step(self.first_bad_step)
        check_finite(self.first_bad_step, self.epoch)


class Meter:
    """Summed loss and correct predictions, kept on the device; the host reads them when asked."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss * labels.size(0)
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += labels.size(0)

    def read(self) -> tuple[float, float]:
        """(mean loss, top-1 accuracy %) so far: a host sync."""
        seen = max(self.seen, 1)
        return self.loss_sum.item() / seen, 100.0 * self.correct.item() / seen

    def over_ranks(self) -> None:
        """Under torchrun: the sums and counts of all ranks, on every rank."""
        if distributed.distributed():
            seen = torch.tensor(self.seen, device=self.loss_sum.device)
            distributed.all_reduce_sum(self.loss_sum, self.correct, seen)
            self.seen = int(seen.item())


def progress_bar(loader, total: int, description: str) -> tqdm:
    return tqdm(loader, total=total, desc=description, leave=False, dynamic_ncols=True,
                disable=not distributed.is_main())


def train(step, loader: DataLoader, device: torch.device, epoch: int, max_batches: int = 0, *,
          channels_last: bool = False, stop: threading.Event | None = None) -> tuple[float, float, float, float]:
    """Train for one epoch with ``step`` (an EagerStep, or a GraphedStep that replays one from a
    CUDA graph); return (mean loss, top-1 accuracy %, seconds, images per second).

    Loss and correct counts accumulate on the device; the host reads them every READ_EVERY_S for
    the progress bar and at the end, never once per step. ``StepChecks`` says how stop requests
    and non-finite losses end the epoch. Under torchrun loss, accuracy and images per second are
    over all ranks.
    """
    step.model.train()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total = min(len(loader), max_batches) if max_batches else len(loader)
    checks, meter = StepChecks(device, epoch, total, stop), Meter(device)
    bar = progress_bar(loader, total, f"epoch {epoch + 1} train")
    synchronize(device)
    start = time.perf_counter()
    for index, (images, labels) in zip(range(total), bar):
        checks.before(index)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        logits, loss = step(images, labels, checks.loss)
        meter.add(loss, logits, labels)
        if checks.read_due():  # the only host syncs in the loop
            mean_loss, accuracy = meter.read()
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{accuracy:.1f}",
                            img_s=f"{meter.seen / (time.perf_counter() - start):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - start
    meter.over_ranks()
    checks.finish()
    mean_loss, accuracy = meter.read()
    return mean_loss, accuracy, elapsed, meter.seen / elapsed
