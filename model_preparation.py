"""Model, loss, optimiser, learning-rate schedule, device and speed settings, and restoring a
checkpoint into them (checkpoint files: checkpoints.py; torchrun: distributed.py)."""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn

import checkpoints
import data_preprocessing
from distributed import distribute, unwrap
from label_smoothing import LabelSmoothingLoss
from lambda_layer import POSITIONS
from resnet import resnet
from resnet_lambda import lambda_resnet
from user_input import ConfigError, defaults, parse_config, switched_on

# Settings that define the network's structure and its data: a checkpoint only resumes with the same ones.
MODEL_KEYS = ("model", "depth", "stem", "dataset", "image_size", "heads", "qk_size", "lambda_position", "lambda_r",
              "lambda_u", "lambda_stages")
LAMBDA_KEYS = ("heads", "qk_size", "lambda_position", "lambda_r", "lambda_u", "lambda_stages")  # no baseline's


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
        checkpoint = checkpoints.newest_loadable(checkpoints.latest_run(config))
    else:
        checkpoint = checkpoints.load_checkpoint(config["resume"])
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
    checkpoints.set_rng_states(checkpoint["rng"])


if __name__ == "__main__":
    # `python model_preparation.py [the flags of main_general.py]` prints the parameter table
    print(parameter_table(parse_config(prog="model_preparation.py")))
