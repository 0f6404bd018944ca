"""cuda_graph.GraphedStep's bookkeeping on the CPU, with torch.cuda's streams and graphs replaced by
a fake that records which stream each step ran on and can make a capture fail as torch.cuda.graph
does: the warm-up stream is made once, eager steps after the capture run on the current stream, a
failed capture is a CaptureError that restores the stream, and replays return tensors of their own.
(The real graph on a GPU: tests/test_gpu.py.)"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import cuda_graph

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
INVALIDATED = "CUDA error: operation failed due to a previous error during capture"


class FakeStream:
    def __init__(self, name: str):
        self.name, self.waited_for = name, []

    def wait_stream(self, other) -> None:
        self.waited_for.append(other)

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeCuda:
    """The torch.cuda calls of cuda_graph.py. ``graph`` behaves as torch.cuda.graph: it switches to
    its capture stream and, when the capture fails (``fail``, or an error in the captured code),
    raises from its exit before switching back."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.default = FakeStream("default")
        self.current = self.default
        self.made = []  # streams made by the code under test
        self.capturing = False
        self.replays = 0
        self.resets = 0

    def install(self, monkeypatch) -> "FakeCuda":
        for name in ("Stream", "stream", "current_stream", "set_stream", "CUDAGraph", "graph",
                     "is_current_stream_capturing"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def Stream(self, device=None, priority=0):
        self.made.append(FakeStream(f"side {len(self.made)}"))
        return self.made[-1]

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def current_stream(self, device=None):
        return self.current

    def set_stream(self, stream) -> None:
        self.current = stream

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    def CUDAGraph(self):
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1

            def reset(self):
                fake.resets += 1
        return Graph()

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.current, self.capturing = FakeStream("capture"), True
        try:
            yield
        except Exception:  # capture_end then fails too, chained to the op's error
            self.capturing = False
            raise RuntimeError(INVALIDATED)
        self.capturing = False
        if self.fail:
            raise RuntimeError(INVALIDATED)
        self.current = self.default


class RecordingStep:
    """An EagerStep's interface: records the stream of every call; ``raise_in_capture``: an op of
    the step cannot be captured."""

    def __init__(self, cuda: FakeCuda, raise_in_capture: bool = False):
        self.cuda, self.raise_in_capture = cuda, raise_in_capture
        self.optimizer = SimpleNamespace(param_groups=[], zero_grad=lambda set_to_none=True: None)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.streams = []

    def __call__(self, images, labels, check=None):
        if self.raise_in_capture and self.cuda.capturing:
            raise RuntimeError(CAPTURE_ERROR)
        self.streams.append(self.cuda.current)
        return images.flatten(1)[:, :10] * 2, images.mean()


def batch(size: int = 4):
    return torch.randn(size, 3, 4, 4), torch.randint(0, 10, (size,))


def test_warm_up_uses_one_side_stream_and_eager_steps_after_the_capture_the_current_one(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    recorded = RecordingStep(cuda)
    step = cuda_graph.GraphedStep(recorded)
    for _ in range(cuda_graph.WARMUP_STEPS):
        step(*batch())
    step(*batch())  # captured, then replayed
    step(*batch(3))  # a partial batch: eager
    step(*batch())  # replayed
    step(*batch(3))
    assert step.graph is not None and cuda.replays == 2
    assert len(cuda.made) == 1, f"{len(cuda.made)} streams made for {cuda_graph.WARMUP_STEPS} warm-up steps"
    side = cuda.made[0]
    assert recorded.streams[:cuda_graph.WARMUP_STEPS] == [side] * cuda_graph.WARMUP_STEPS
    assert recorded.streams[cuda_graph.WARMUP_STEPS] != side  # the capture, on torch.cuda.graph's own stream
    assert recorded.streams[cuda_graph.WARMUP_STEPS + 1:] == [cuda.default, cuda.default]
    assert cuda.current is cuda.default


def test_replays_return_tensors_the_next_replay_leaves_alone(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    step = cuda_graph.GraphedStep(RecordingStep(cuda))
    for _ in range(cuda_graph.WARMUP_STEPS):
        step(*batch())
    logits, loss = step(*batch())
    # the fake replay computes nothing, so the outputs hold whatever the capture left (NaN included)
    kept = logits.clone(), loss.clone()
    step.logits.fill_(7.0), step.loss.fill_(7.0)  # what the next replay does to the graph's outputs
    assert logits.data_ptr() != step.logits.data_ptr() and loss.data_ptr() != step.loss.data_ptr()
    torch.testing.assert_close(logits, kept[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loss, kept[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("where", ["inside the captured step", "at the capture's end"])
def test_a_failed_capture_raises_a_capture_error_and_restores_the_stream(monkeypatch, where):
    cuda = FakeCuda(fail=where == "at the capture's end").install(monkeypatch)
    recorded = RecordingStep(cuda, raise_in_capture=where == "inside the captured step")
    step = cuda_graph.GraphedStep(recorded)
    for _ in range(cuda_graph.WARMUP_STEPS):
        step(*batch())
    with pytest.raises(cuda_graph.CaptureError, match="--compile off") as error:
        step(*batch())
    if where == "inside the captured step":  # the op that failed, not the capture's end that follows it
        assert CAPTURE_ERROR in str(error.value)
    assert cuda.current is cuda.default and cuda.resets == 1 and step.graph is None
    steps = len(recorded.streams)
    with pytest.raises(cuda_graph.CaptureError):  # no eager steps in a process after a failed capture
        step(*batch())
    assert len(recorded.streams) == steps


def test_fp16_needs_a_fused_optimizer_to_be_captured(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    recorded = RecordingStep(cuda)
    recorded.scaler = SimpleNamespace(is_enabled=lambda: True)
    step = cuda_graph.GraphedStep(recorded)
    for _ in range(cuda_graph.WARMUP_STEPS):
        step(*batch())
    with pytest.raises(cuda_graph.CaptureError, match="AMP=fp16 needs a fused optimizer"):
        step(*batch())
    recorded.optimizer._step_supports_amp_scaling = True  # fused Adam: the scale is applied on the device
    step = cuda_graph.GraphedStep(recorded)
    for _ in range(cuda_graph.WARMUP_STEPS + 1):
        step(*batch())
    assert step.graph is not None
