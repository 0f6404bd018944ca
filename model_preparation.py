"""Model, loss, optimiser, learning-rate schedule, device and speed settings, the training step
they make (build_training), and restoring a checkpoint into them (checkpoint files:
checkpoints.py; torchrun: distributed.py; the CUDA-graph step: cuda_graph.py)."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import checkpoints
import data_preprocessing
import distributed
from cuda_graph import GraphedStep
from distributed import distribute, unwrap
from label_smoothing import LabelSmoothingLoss
from lambda_layer import POSITIONS
from nntrain import EagerStep
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
BF16_CAPABILITY = (8, 0)  # CUDA compute capability from which the GPU has bf16 units (Ampere)


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


def autocast(amp: str, device: torch.device, cache: bool = True):
    """The one autocast context of a run, entered for every step; a no-op context for fp32.
    ``cache=False`` for a step captured in a CUDA graph (casts are then recomputed on replay)."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache)


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


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last for the weights of the 2-D convolutions, the tensors whose layout picks cuDNN's
    kernels. Every other parameter keeps the layout its module chose (the lambda layers store
    their embeddings in the layout of their own matrix products; a memory format exists for 4-D
    tensors only, and the lambda convolution's kernel is 5-D)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


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


def speed_up(model: nn.Module, config: dict, device: torch.device) -> nn.Module:
    """channels_last, DistributedDataParallel under torchrun (``distribute``) and torch.compile as
    configured, in that order; returns the module to train (``unwrap`` gives the plain one back)."""
    if switched_on(config["channels_last"], device):
        model = to_channels_last(model)
    model = distribute(model, config, device)  # unchanged on a single process
    mode = resolve_compile(config["compile"], device, resolve_amp(config["amp"], device))
    if mode in TORCH_COMPILE_MODES:
        model = torch.compile(model, mode=mode)
    return model


def training_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, autocast,
                  scaler: torch.amp.GradScaler, mode: str) -> EagerStep | GraphedStep:
    """The run's training step for COMPILE mode ``mode`` (resolve_compile): eager, compiled (the
    model was compiled in speed_up) or replayed from a CUDA graph."""
    step = EagerStep(model, criterion, optimizer, autocast, scaler, mark_steps=mode in ("reduce-overhead", "max-autotune"))
    return GraphedStep(step) if mode == "graph" else step


@dataclass
class Training:
    """What a run trains with (build_training): the module to train (sped up), the loaders and the
    generator of their order, loss, optimiser, schedule, the speed settings and the step."""
    model: nn.Module
    train_loader: object
    test_loader: object
    generator: torch.Generator
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: str
    autocast: object
    scaler: torch.amp.GradScaler
    channels_last: bool
    compile: str
    step: EagerStep | GraphedStep
    val_loader: object = None  # VAL_SIZE held-out training images, or None


def build_training(config: dict, device: torch.device) -> Training:
    """Everything a run of `config` trains with on `device` (seed the RNGs first); under torchrun
    this rank's share of the data."""
    amp = resolve_amp(config["amp"], device)
    mode = resolve_compile(config["compile"], device, amp)
    model = speed_up(build_model(config).to(device), config, device)  # DDP under torchrun
    # rank 0 first: it writes the synthetic set (or downloads CIFAR-10) that the others read
    loaders = distributed.from_main(
        lambda: data_preprocessing.build_loaders(config, device, distributed.rank(), distributed.world_size()),
        everywhere=True)
    criterion, optimizer = build_criterion(config), build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    cast, scaler = autocast(amp, device, cache=mode != "graph"), build_scaler(amp, device)
    step = training_step(model, criterion, optimizer, cast, scaler, mode)
    return Training(model, loaders.train, loaders.test, loaders.generator, criterion, optimizer, scheduler, amp,
                    cast, scaler, switched_on(config["channels_last"], device), mode, step, loaders.val)


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


def setting_differences(saved: dict, config: dict, keys) -> list[str]:
    """The settings among `keys` that differ in `saved`, as "KEY=saved (now new)".

    A setting that `saved` lacks (a checkpoint older than the setting) counts as its default.
    """
    saved = {**defaults(), **saved}
    return [f"{key.upper()}={saved[key]!r} (now {config[key]!r})" for key in keys if saved[key] != config[key]]


def model_differences(saved: dict, config: dict) -> list[str]:
    """The settings shaping `config`'s network that differ in `saved` (setting_differences)."""
    return setting_differences(saved, config, shaping_keys(config))


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
    # VAL_SIZE, and SEED where there is a split (it draws the held-out images)
    split_keys = ("val_size", "seed") if checkpoint["config"].get("val_size") or config["val_size"] else ()
    split = setting_differences(checkpoint["config"], config, split_keys)
    if split:
        raise ConfigError(f"checkpoint {path} was trained with another validation split ({', '.join(split)}); "
                          f"resume with the same --val-size and --seed")
    return checkpoint


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `state` but keep this optimizer's own capturable flags and a float learning rate (a
    CUDA-graph run saves its learning rate as a float32 device tensor; make_capturable redoes that)."""
    capturable = [group["capturable"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flag in zip(optimizer.param_groups, capturable):
        group["capturable"] = flag
        group["lr"] = float(group["lr"])


def restore(checkpoint: dict, model: nn.Module, optimizer, scheduler, scaler=None) -> None:
    unwrap(model).load_state_dict(checkpoint["model"])
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):  # empty when the run was not fp16
        scaler.load_state_dict(checkpoint["scaler"])
    checkpoints.set_rng_states(checkpoint["rng"])


if __name__ == "__main__":
    # `python model_preparation.py [the flags of main_general.py]` prints the parameter table
    print(parameter_table(parse_config(prog="model_preparation.py")))
