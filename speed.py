"""A run's speed settings, resolved once for its device: DEVICE, AMP (the autocast context and the
fp16 gradient scaler), CPU threads and cuDNN autotuning, CHANNELS_LAST and COMPILE.

``resolve_speed`` turns the settings into a ``Speed``; the model (``speed_up``), the training step,
the loops and the log all read that one object.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import distributed
from user_input import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CAPABILITY = (8, 0)  # CUDA compute capability from which the GPU has bf16 units (Ampere)
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def select_device(name: str) -> torch.device:
    """DEVICE="auto" picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"DEVICE={name!r} but no such CUDA device is available; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE='mps' but MPS is not available; use --device auto or cpu")
    return device


def switched_on(setting: str, device: torch.device) -> bool:
    """An "auto" / "on" / "off" speed setting for this device: "auto" means on CUDA only."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve_amp(amp: str, device: torch.device) -> str:
    """AMP="auto": on CUDA bf16 where the GPU computes it natively (compute capability 8.0 and up),
    fp16 with its gradient scaler below (T4, Turing laptop GPUs); fp32 elsewhere. fp16 needs CUDA."""
    if amp == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"AMP=fp16 needs CUDA (it trains with a gradient scaler), but the device is "
                          f"{device}; use --amp bf16 or --amp fp32")
    return amp


def describe_amp(setting: str, amp: str, device: torch.device) -> str:
    """The precision as the run's "speed:" line says it, with why "auto" chose it on CUDA."""
    text = f"amp {amp}" + (" with a gradient scaler" if amp == "fp16" else "")
    if setting == "auto" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        has = "has" if (major, minor) >= BF16_CAPABILITY else "has no"
        text += f" (auto: compute capability {major}.{minor} {has} native bf16)"
    return text


def resolve_compile(mode: str, device: torch.device, amp: str) -> str:
    """COMPILE as this run does it: "off", "graph" (the whole step in one CUDA graph) or a
    torch.compile mode. "auto" is "graph" on CUDA in one process with bf16 or fp32: one graph
    launch per step and no compile time (torch.compile's kernels fuse more, but cost minutes to
    compile for a run of minutes; benchmarks/gpu_check.sh measures each); "off" elsewhere. A CUDA
    graph needs CUDA and a single process: elsewhere "graph" trains eagerly."""
    one_cuda_process = device.type == "cuda" and not distributed.distributed()
    if mode == "auto":
        return "graph" if one_cuda_process and amp != "fp16" else "off"
    if mode == "graph" and not one_cuda_process:
        return "off"
    return mode


@dataclass(frozen=True)
class Speed:
    """What the speed settings mean on this run's device (``resolve_speed``)."""
    device: torch.device
    amp: str             # "fp32", "bf16" or "fp16"
    channels_last: bool  # images and convolution weights in the channels_last memory format
    compile: str         # "off", "graph" (the step replayed from one CUDA graph) or a torch.compile mode
    amp_setting: str = "fp32"  # AMP as set; "auto" has the log say why it chose `amp`

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """An autocast context for the steps and evaluations; a no-op context for fp32. A step
        captured in a CUDA graph casts without the cache (its casts are recomputed on replay)."""
        if self.amp == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp], cache_enabled=self.compile != "graph")

    def scaler(self) -> torch.amp.GradScaler:
        """Gradient scaler, active only for fp16 (bf16 has fp32's exponent range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def describe_amp(self) -> str:
        return describe_amp(self.amp_setting, self.amp, self.device)


def resolve_speed(config: dict, device: torch.device) -> Speed:
    """AMP, CHANNELS_LAST and COMPILE of `config` as they apply on `device`."""
    amp = resolve_amp(config["amp"], device)
    return Speed(device, amp, switched_on(config["channels_last"], device),
                 resolve_compile(config["compile"], device, amp), config["amp"])


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_backends(config: dict, device: torch.device) -> None:
    """Thread count and cuDNN autotuning; both global to the process."""
    torch.set_num_threads(config["num_threads"] or min(torch.get_num_threads(), available_cpus()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config["cudnn_benchmark"]


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last for the weights of the 2-D convolutions, the tensors whose layout picks cuDNN's
    kernels. Every other parameter keeps the layout its module chose (a memory format exists for 4-D
    tensors only, and the lambda convolution's kernel is 5-D)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def speed_up(model: nn.Module, config: dict, speed: Speed) -> nn.Module:
    """channels_last, DistributedDataParallel under torchrun (``distribute``) and torch.compile as
    `speed` says, in that order; returns the module to train (``unwrap`` gives the plain one back)."""
    if speed.channels_last:
        model = to_channels_last(model)
    model = distributed.distribute(model, config, speed.device)  # unchanged on a single process
    if speed.compile in TORCH_COMPILE_MODES:
        model = torch.compile(model, mode=speed.compile)
    return model
