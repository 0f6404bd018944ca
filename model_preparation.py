"""Model, loss, optimiser, learning-rate schedule, device and speed settings, and checkpoints."""
from __future__ import annotations

import contextlib
import glob
import math
import os
import random
import re
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import data_preprocessing
from label_smoothing import LabelSmoothingLoss
from lambda_layer import POSITIONS
from resnet import resnet
from resnet_lambda import lambda_resnet
from user_input import ConfigError, defaults, parse_config, switched_on

# Settings that define the network's structure and its data: a checkpoint only resumes with the same ones.
MODEL_KEYS = ("model", "depth", "stem", "dataset", "image_size", "heads", "qk_size", "lambda_position", "lambda_r",
              "lambda_u", "lambda_stages")
LAMBDA_KEYS = ("heads", "qk_size", "lambda_position", "lambda_r", "lambda_u", "lambda_stages")  # no baseline's


def model_folder(config: dict) -> str:
    """"Baseline" or "Lambda": the per-model folder under RUNS_DIR and CHECKPOINT_DIR."""
    return config["model"].capitalize()


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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> str:
    """AMP="auto" is bf16 on CUDA and fp32 elsewhere; fp16 needs CUDA (its gradient scaler)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"AMP=fp16 needs CUDA (it trains with a gradient scaler), but the device is "
                          f"{device}; use --amp bf16 or --amp fp32")
    return amp


def autocast(amp: str, device: torch.device):
    """The one autocast context of a run, entered for every step; a no-op context for fp32."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def build_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """Gradient scaler, active only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_backends(config: dict, device: torch.device) -> None:
    """Thread count and cuDNN autotuning; both global to the process."""
    torch.set_num_threads(config["num_threads"] or min(torch.get_num_threads(), available_cpus()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config["cudnn_benchmark"]


def speed_up(model: nn.Module, config: dict, device: torch.device) -> nn.Module:
    """channels_last, DistributedDataParallel under torchrun (``distribute``) and torch.compile as
    configured, in that order; returns the module to train (``unwrap`` gives the plain one back)."""
    if switched_on(config["channels_last"], device):
        model = model.to(memory_format=torch.channels_last)
    model = distribute(model, config, device)  # unchanged on a single process
    if config["compile"]:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers, whose state_dict
    keys have neither the "_orig_mod." nor the "module." prefix."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def build_model(config: dict) -> nn.Module:
    """The network of these settings, with as many classes as the data set has (counted from the
    class folders for DATASET=folder: a ConfigError when they are missing)."""
    classes = data_preprocessing.num_classes(config)
    if config["model"] == "baseline":
        return resnet(config["depth"], classes, config["stem"], config["zero_init_residual"])
    return lambda_resnet(classes, config["stem"], config["heads"], config["qk_size"], image_size=config["image_size"],
                         zero_init_residual=config["zero_init_residual"], position=config["lambda_position"],
                         r=config["lambda_r"], dim_u=config["lambda_u"], stages=config["lambda_stages"],
                         depth=config["depth"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared embeddings count once


TABLE_STAGES = ("LLLL", "CCLL", "CCCL")  # all lambda, and the paper's two hybrids


def parameter_table(config: dict) -> str:
    """Markdown table of the parameter counts of the baseline and each lambda variant at these settings."""
    size, classes = config["image_size"], data_preprocessing.num_classes(config)
    settings = (f"depth {config['depth']}, stem {config['stem']}, h {config['heads']}, k {config['qk_size']}, "
                f"u {config['lambda_u']}, r {config['lambda_r']} (conv only), {classes} classes, {size}x{size} images")
    rows = [f"Parameters at {settings}:", "", "| model | position | stages | parameters |", "|---|---|---|---|",
            f"| baseline | - | CCCC | {count_parameters(build_model({**config, 'model': 'baseline'})):,} |"]
    for position in POSITIONS:
        for stages in TABLE_STAGES:
            variant = {**config, "model": "lambda", "lambda_position": position, "lambda_stages": stages}
            try:
                count = f"{count_parameters(build_model(variant)):,}"
            except ValueError as error:  # absolute embeddings too large for this stem
                count = f"refused: {error}"
            rows.append(f"| lambda | {position} | {stages} | {count} |")
    return "\n".join(rows)


def build_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    # fused on CUDA: one kernel per step, and the fp16 scaler's inf check stays on the device (no host sync)
    fused = all(p.is_cuda for p in model.parameters()) or None
    return torch.optim.Adam(model.parameters(), lr=config["lr"], betas=tuple(config["adam_betas"]),
                            weight_decay=config["weight_decay"], fused=fused)


def lr_factor(epoch: int, warmup_epochs: int, epochs: int) -> float:
    """Multiplier of LR in epoch `epoch` (0-based).

    Warm-up: LR x (epoch + 1) for the first `warmup_epochs` epochs (reproduction: 5e-4 ... 2.5e-3).
    Then cosine decay from the warm-up peak, no restarts, so that it would reach zero one epoch
    after the last: the reproduction's chained schedulers reached zero *in* the last epoch, which
    then trained with lr 0.
    """
    if epoch < warmup_epochs:
        return epoch + 1.0
    peak = max(warmup_epochs, 1)
    progress = (epoch - warmup_epochs + 1) / (epochs - warmup_epochs + 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """One per-epoch scheduler for warm-up and cosine; step it once after each epoch."""
    warmup, epochs = config["warmup_epochs"], config["epochs"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, warmup, epochs))


def build_criterion(config: dict) -> nn.Module:
    return LabelSmoothingLoss(config["label_smoothing"])


# --- several processes: torchrun ---
# torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python`
# run has none of them and never creates a process group. Every helper below is a no-op then.

_CONTROL_GROUP = None  # gloo group for the per-step stop flags: no CUDA sync to read them


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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


# --- checkpoints ---

def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_acc", "best_epoch", "config", "rng")


def temporary_path(path: str) -> str:
    """Where `path` is written before it is renamed into place; stale ones are removed on resume."""
    return f"{path}.tmp-{os.getpid()}"


def save_checkpoint(state: dict, path: str, copies: tuple[str, ...] = ()) -> None:
    """Write `state` to `path` and to every path in `copies`, each complete or not at all.

    Each file is written to a temporary file in the same folder, flushed to disk and renamed into
    place. `path` is renamed last, so a crash never leaves it ahead of its copies (best.pt, epoch_NNN.pt).
    """
    temporary = temporary_path(path)
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    for copy in copies:
        shutil.copyfile(temporary, temporary_path(copy))
        os.replace(temporary_path(copy), copy)
    os.replace(temporary, path)


def remove_stale_temporaries(checkpoint_dir: str) -> None:
    """Delete half-written checkpoints left by a run that was killed while saving."""
    for path in glob.glob(os.path.join(checkpoint_dir, "*.pt.tmp-*")):
        os.remove(path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, with its "path" added; ConfigError naming the file if it is
    missing, unreadable or foreign."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}); it may be "
                          f"truncated or corrupt: use another checkpoint of the run") from None
    if not isinstance(checkpoint, dict) or not set(CHECKPOINT_KEYS) <= set(checkpoint):
        raise ConfigError(f"{path} is not a checkpoint of main_general.py (it lacks "
                          f"{', '.join(CHECKPOINT_KEYS)}); use a last.pt, best.pt or epoch_NNN.pt")
    return dict(checkpoint, path=path)


def newest_run_folder(root: str, model: str, filename: str) -> str | None:
    """The run folder under root/<Model>/ whose `filename` was written last, or None."""
    candidates = glob.glob(os.path.join(root, model_folder({"model": model}), "*", filename))
    return os.path.dirname(max(candidates, key=os.path.getmtime)) if candidates else None


def latest_run(config: dict) -> str:
    """Checkpoint folder of the most recently saved run of MODEL under CHECKPOINT_DIR."""
    folder = newest_run_folder(config["checkpoint_dir"], config["model"], "last.pt")
    if folder is None:
        pattern = os.path.join(config["checkpoint_dir"], model_folder(config), "*", "last.pt")
        raise ConfigError(f"--resume latest found no checkpoint matching {pattern}; "
                          f"start a run without --resume first")
    return folder


def newest_loadable(run_checkpoints: str) -> dict:
    """last.pt of a run or, when that cannot be loaded, the loadable best.pt or epoch_NNN.pt with
    the highest epoch, with a warning on stderr naming what was skipped."""
    last = os.path.join(run_checkpoints, "last.pt")
    try:
        return load_checkpoint(last)
    except ConfigError as error:
        skipped = [str(error)]
    found = []
    best = os.path.join(run_checkpoints, "best.pt")
    numbered = sorted((path for path in glob.glob(os.path.join(run_checkpoints, "epoch_*.pt"))
                       if re.fullmatch(r"epoch_\d+\.pt", os.path.basename(path))),
                      key=lambda path: int(os.path.basename(path)[6:-3]), reverse=True)
    for group in ([best], numbered):  # best.pt, and the highest-numbered epoch_NNN.pt that loads
        for path in group:
            try:
                found.append(load_checkpoint(path))
                break
            except ConfigError as error:
                if os.path.exists(path):
                    skipped.append(str(error))
    if not found:
        raise ConfigError(f"--resume latest found no loadable checkpoint in {run_checkpoints} "
                          f"({'; '.join(skipped)})")
    checkpoint = max(found, key=lambda c: c["epoch"])
    print(f"warning: {'; '.join(skipped)}; resuming from {checkpoint['path']} (epoch {checkpoint['epoch']}) "
          f"instead", file=sys.stderr)
    return checkpoint


def shaping_keys(config: dict) -> tuple[str, ...]:
    """The MODEL_KEYS that shape `config`'s network: lambda settings do not shape a baseline, and
    LAMBDA_R only shapes the "conv" mode."""
    if config["model"] == "baseline":
        return tuple(key for key in MODEL_KEYS if key not in LAMBDA_KEYS)
    if config["lambda_position"] != "conv":
        return tuple(key for key in MODEL_KEYS if key != "lambda_r")
    return MODEL_KEYS


def model_differences(saved: dict, config: dict) -> list[str]:
    """The settings shaping `config`'s network that differ in `saved`, as "KEY=saved (now new)".

    A setting that `saved` lacks (a checkpoint older than the setting) counts as its default.
    """
    saved = {**defaults(), **saved}
    return [f"{key.upper()}={saved[key]!r} (now {config[key]!r})" for key in shaping_keys(config)
            if saved[key] != config[key]]


def resolve_resume(config: dict) -> dict | None:
    """The checkpoint to resume from (checked against the model settings), or None.

    "latest" takes the newest run of MODEL and falls back from a damaged last.pt to the newest
    loadable checkpoint of that run; an explicit path must load.
    """
    if not config["resume"]:
        return None
    if config["resume"] == "latest":
        checkpoint = newest_loadable(latest_run(config))
    else:
        checkpoint = load_checkpoint(config["resume"])
    path, different = checkpoint["path"], model_differences(checkpoint["config"], config)
    if different:
        raise ConfigError(f"checkpoint {path} was trained with {', '.join(different)}; "
                          f"resume with the same model settings")
    return checkpoint


def restore(checkpoint: dict, model: nn.Module, optimizer, scheduler, scaler=None) -> None:
    unwrap(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):  # empty when the run was not fp16
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])


if __name__ == "__main__":
    # `python model_preparation.py [the flags of main_general.py]` prints the parameter table
    print(parameter_table(parse_config(prog="model_preparation.py")))
