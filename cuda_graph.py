"""The training step replayed from one CUDA graph (COMPILE=graph): after the PyTorch CUDA-graph
notes ("whole network capture") and MLPerf's ResNet submissions.

A step of ResNet-50 at CIFAR-10 sizes launches ~500 small kernels (the lambda models ~1,100);
launched one by one from Python they, not the arithmetic, set the speed. Captured once into a
CUDA graph, forward, loss, backward and the fused Adam step are launched as one.
"""
from __future__ import annotations

import sys

import torch

from nntrain import EagerStep

WARMUP_STEPS = 3  # eager steps before the capture: cuDNN autotuning and Adam's lazy state happen there


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let the optimizer step run inside a graph: capturable, with its learning rate in a device
    tensor that the schedule fills in place (LambdaLR does), so that no recapture is needed."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


class GraphedStep:
    """``step`` (an EagerStep) captured in one CUDA graph and replayed for every batch of the
    captured shape; same arguments and results as the EagerStep.

    The first WARMUP_STEPS batches train eagerly on a side stream (as graph capture requires), the
    next one is captured, then every batch is copied into the graph's static input buffers and the
    graph replayed. A batch of another shape (a last partial batch) trains eagerly, and so does
    every step if the capture fails (a warning says so). ``check(loss)`` runs after the replay: on
    the device it only records a non-finite loss, so nothing waits. The gradient scaler's
    host-side bookkeeping does not replay, so fp16 is captured only on request.
    """

    def __init__(self, step: EagerStep):
        self.step = step
        self.graph = None
        self.eager_steps = 0
        self.failed = False  # the capture failed: every step trains eagerly

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, check=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and not self.failed and self.eager_steps >= WARMUP_STEPS:
            self.capture(images, labels)
        if self.graph is None or images.shape != self.images.shape:
            self.eager_steps += 1
            return self.warm_up(images, labels, check)
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        if check is not None:
            check(self.loss)
        return self.logits, self.loss

    def warm_up(self, images, labels, check):
        """An eager step on a side stream (the default stream waits for it)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.step(images, labels, check)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one step on static buffers shaped like this batch (nothing runs until replay)."""
        make_capturable(self.step.optimizer, images.device)
        self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients then live in the graph's memory
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # DataLoader's pin-memory thread may run
                self.logits, self.loss = self.step(self.images, self.labels)
        except RuntimeError as error:  # an op that cannot be captured (a host sync, a host-to-device copy)
            self.failed = True
            print(f"warning: CUDA graph capture failed ({str(error).splitlines()[0]}); training eagerly "
                  f"(--compile off hides this warning)", file=sys.stderr)
            return
        self.graph = graph
