"""How benchmark.py measures a step: its median time after warm-up, its peak memory on any device
(PeakMemory on the CPU, the CUDA allocator's peak on a GPU) and the aten ops that launch a kernel
(KernelCount)."""
from __future__ import annotations

import collections
import gc
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nntrain import synchronize


MB = 2 ** 20


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active, on any device.

    Every op's outputs pass through __torch_dispatch__; a storage is counted when first seen and
    uncounted when it is freed (a weakref finaliser on the storage object, which torch keeps alive
    as long as the storage lives).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared parameters count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one step (everything allocated, after reset_peak_memory_stats)"
    return ("peak bytes of live tensor storages over one step, tracked by a TorchDispatchMode, plus the "
            "parameters, buffers, optimizer state and inputs that exist before it (not the allocator's caching, "
            "not the process RSS)")


def measure(step, device: torch.device, warmup: int, iters: int, static: list) -> dict:
    """Median seconds of `step()` after `warmup` calls, and the peak memory of one more call."""
    for _ in range(warmup):
        step()
    times = [timed(step, device)[1] for _ in range(iters)]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with PeakMemory() as tracker:
            step()
        peak = tracker.peak + storage_bytes(static)
    return {"median_s": statistics.median(times), "times_s": times, "peak_mb": peak / MB}


def timed(work, device: torch.device) -> tuple[object, float]:
    """(result of work(), seconds it took on the device)."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        phrase in text for phrase in ("out of memory", "can't allocate", "not enough memory"))


def default_memory_limit(device: torch.device) -> float | None:
    """Half of MemAvailable on CPU (an allocation past it could get the process killed); none on CUDA."""
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return available_kb * 1024 / 2
    except (OSError, StopIteration):
        return 8 * 2 ** 30


# ops that allocate or only relabel memory: no kernel runs (views are recognised by their schema)
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
                 "aten::_unsafe_view", "aten::promote_types"}


class KernelCount(TorchDispatchMode):
    """Counts the aten ops below autograd that launch a kernel: neither views nor NO_KERNEL_OPS.

    What an op runs inside its own kernel (a copy inside a convolution) is not seen; on a GPU each
    counted op is at least one kernel launch.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in NO_KERNEL_OPS:
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(step) -> int:
    with KernelCount() as counter:
        step()
    return sum(counter.ops.values())
