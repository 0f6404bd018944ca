"""The training step replayed from one CUDA graph (COMPILE=graph): after the PyTorch CUDA-graph
notes ("whole network capture") and MLPerf's ResNet submissions.

At CIFAR-10 sizes a ResNet step is many small kernels; launched one by one from Python they, not
the arithmetic, set the speed (docs/gpu.md, docs/speed.md). Captured once into a CUDA graph,
forward, loss, backward and the fused Adam step are launched as one.
"""
from __future__ import annotations

import contextlib

import torch

from nntrain import EagerStep
from user_input import ConfigError

WARMUP_STEPS = 3  # eager steps before the capture: cuDNN autotuning and Adam's lazy state happen there


class CaptureError(ConfigError):
    """The step could not be captured into a CUDA graph; the run stops (exit status 2) and names
    --compile off. Not retried eagerly: torch.cuda.graph's exit raises before it restores the
    current stream, and the caching allocator is left with the capture's private pool."""


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let the optimizer step run inside a graph: capturable, with its learning rate in a device
    tensor that the schedule fills in place (LambdaLR does), so that no recapture is needed."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def check_scaler(step: EagerStep) -> None:
    """An fp16 scaler captures only with an optimizer that applies the scale on the device (fused
    Adam, as build_optimizer makes on CUDA): GradScaler.step reads found_inf on the host otherwise."""
    if step.scaler.is_enabled() and not getattr(step.optimizer, "_step_supports_amp_scaling", False):
        raise CaptureError(f"COMPILE=graph with AMP=fp16 needs a fused optimizer, not {type(step.optimizer).__name__} "
                           f"without fused=True (its scaler step reads the device); use --compile off or --amp bf16")


def first_line(error: BaseException) -> str:
    """The error a failed capture began with (the op that could not be captured, not capture_end's
    "invalidated" that follows it), in one line."""
    origin = error.__context__ or error
    return f"{type(origin).__name__}: {(str(origin).splitlines() or [''])[0]}"


class GraphedStep:
    """``step`` (an EagerStep) captured in one CUDA graph and replayed for every batch of the
    captured shape; same arguments and results as the EagerStep.

    The first WARMUP_STEPS batches train eagerly on one side stream (as graph capture requires), the
    next one is captured, then every batch is copied into the graph's static input buffers and the
    graph replayed. A batch of another shape (a last partial batch) trains eagerly on the current
    stream, in order with the replays. A failed capture raises CaptureError. ``check(loss)`` runs
    after the replay: on the device it only records a non-finite loss, so nothing waits. fp16 is
    captured only with a fused optimizer (``check_scaler``).
    """

    def __init__(self, step: EagerStep):
        self.step = step
        self.graph = None
        self.side = None  # the warm-up stream, made once: freed blocks are reused only on their own stream
        self.eager_steps = 0
        self.failure = None  # the CaptureError of a failed capture, raised again if called again

    @property
    def model(self) -> torch.nn.Module:
        return self.step.model

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, check=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of the step: tensors of their own, which a later replay leaves alone."""
        if self.failure is not None:
            raise self.failure
        if self.graph is None and self.eager_steps >= WARMUP_STEPS:
            self.capture(images, labels)
        if self.graph is None:
            self.eager_steps += 1
            return self.warm_up(images, labels, check)
        if images.shape != self.images.shape:
            self.eager_steps += 1
            return self.step(images, labels, check)
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        if check is not None:
            check(self.loss)
        # self.logits and self.loss are the graph's static outputs, overwritten by the next replay
        return self.logits.clone(), self.loss.clone()

    def warm_up(self, images, labels, check):
        """An eager step on the side stream (the current stream waits for it)."""
        if self.side is None:
            self.side = torch.cuda.Stream(device=images.device)
        self.side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(self.side):
            result = self.step(images, labels, check)
        torch.cuda.current_stream(images.device).wait_stream(self.side)
        return result

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one step on static buffers shaped like this batch (nothing runs until replay)."""
        check_scaler(self.step)
        make_capturable(self.step.optimizer, images.device)
        self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients then live in the graph's memory
        current = torch.cuda.current_stream(images.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # DataLoader's pin-memory thread may run
                self.logits, self.loss = self.step(self.images, self.labels)
        except Exception as error:  # an op that cannot be captured (a host sync, a host-to-device copy)
            torch.cuda.set_stream(current)  # graph's exit raised before it restored the stream
            with contextlib.suppress(Exception):
                graph.reset()  # releases the capture's private memory pool, as far as it can
            self.failure = CaptureError(f"CUDA graph capture failed ({first_line(error)}); run with --compile off "
                                        f"(checkpoints written so far are intact)")
            raise self.failure from error
        self.graph = graph
