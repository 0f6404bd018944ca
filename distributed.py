"""Several processes under torchrun: process group, DistributedDataParallel, reductions over the ranks.

torchrun starts one process per GPU and sets TORCHELASTIC_RUN_ID, WORLD_SIZE, RANK and LOCAL_RANK; a
plain `python` run has none of them and never creates a process group. Every helper below is a
no-op then.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from user_input import ConfigError


_CONTROL_GROUP = None  # gloo group for the per-step stop flags: no CUDA sync to read them


def launched_by_torchrun() -> bool:
    """True under torchrun, with one process too (WORLD_SIZE=1), or under a launcher that sets
    LOCAL_RANK and WORLD_SIZE (torch.distributed.launch): such a run joins a process group."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(name in os.environ for name in ("LOCAL_RANK", "WORLD_SIZE"))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main() -> bool:
    """True on the process that writes the run's files: rank 0, or the only process."""
    return rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); return this rank's device.

    Each process uses the GPU cuda:LOCAL_RANK. Call only when launched_by_torchrun().
    """
    global _CONTROL_GROUP
    if device.type == "mps":
        raise ConfigError("torchrun runs on CUDA (nccl) or the CPU (gloo), not on MPS; use --device cuda or cpu")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              f"visible; start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _CONTROL_GROUP = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return device


def close_distributed() -> None:
    global _CONTROL_GROUP
    if distributed():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def distribute(model: nn.Module, config: dict, device: torch.device) -> nn.Module:
    """DistributedDataParallel (with SyncBatchNorm if SYNC_BN) under torchrun; `model` otherwise."""
    if not distributed():
        return model  # SYNC_BN has nothing to synchronise on one process
    if config["sync_bn"] and device.type != "cuda":
        raise ConfigError("SYNC_BN needs CUDA (SyncBatchNorm has no CPU kernel); drop --sync-bn on the CPU")
    if config["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (tensors on this rank's device)."""
    if distributed():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> None:
    """The smallest value of `tensor` over the ranks, in place."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether it is True on any rank (a gloo all-reduce on the CPU: no device sync)."""
    if not distributed():
        return list(flags)
    counts = torch.tensor([int(flag) for flag in flags])
    dist.all_reduce(counts, group=_CONTROL_GROUP)
    return [bool(count) for count in counts.tolist()]


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank, so all ranks evaluate one model
    (DDP broadcasts them before each forward, so they drift apart in the last training step)."""
    if distributed():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, 0)


def from_main(work, *, everywhere: bool = False):
    """Run `work()` on rank 0 and return its result on every rank; a ConfigError it raises is raised
    on every rank, so that no rank waits for one that gave up. everywhere=True: the other ranks
    then run `work()` themselves (after rank 0, e.g. once rank 0 has written the files they read)."""
    if not distributed():
        return work()
    message, result = [None, None], None  # [error, result to share]
    if is_main():
        try:
            result = work()
        except ConfigError as error:
            message[0] = str(error)
        message[1] = None if everywhere else result
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ConfigError(message[0])
    if is_main():
        return result
    return work() if everywhere else message[1]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers, whose state_dict
    keys have neither the "_orig_mod." nor the "module." prefix."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model
