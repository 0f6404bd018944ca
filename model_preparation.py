"""Model, loss, optimiser, learning-rate schedule and the training step they make (build_training).
Speed settings: speed.py; checkpoints and resuming: checkpoints.py; torchrun: distributed.py; the
CUDA-graph step: cuda_graph.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import data_preprocessing
import distributed
from cuda_graph import GraphedStep
from label_smoothing import LabelSmoothingLoss
from lambda_layer import POSITIONS
from nntrain import EagerStep
from resnet import resnet
from resnet_lambda import lambda_resnet
from speed import Speed, resolve_speed, speed_up
from user_input import parse_config

# Settings that define the network's structure and its data: a checkpoint only resumes with the same ones.
MODEL_KEYS = ("model", "depth", "stem", "dataset", "image_size", "heads", "qk_size", "lambda_position", "lambda_r",
              "lambda_u", "lambda_stages")
LAMBDA_KEYS = ("heads", "qk_size", "lambda_position", "lambda_r", "lambda_u", "lambda_stages")  # no baseline's


def training_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, speed: Speed,
                  scaler: torch.amp.GradScaler) -> EagerStep | GraphedStep:
    """The run's training step for ``speed.compile``: eager, compiled (the model was compiled in
    speed_up) or replayed from a CUDA graph."""
    step = EagerStep(model, criterion, optimizer, speed.autocast(), scaler,
                     mark_steps=speed.compile in ("reduce-overhead", "max-autotune"))
    return GraphedStep(step) if speed.compile == "graph" else step


@dataclass
class Training:
    """What a run trains with (build_training): the module to train (sped up), the loaders and the
    generator of their order, loss, optimiser, schedule, the speed settings, scaler and step."""
    model: nn.Module
    train_loader: object
    test_loader: object
    generator: torch.Generator
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    speed: Speed
    scaler: torch.amp.GradScaler
    step: EagerStep | GraphedStep
    val_loader: object = None  # VAL_SIZE held-out training images, or None


def build_training(config: dict, device: torch.device) -> Training:
    """Everything a run of `config` trains with on `device` (seed the RNGs first); under torchrun
    this rank's share of the data."""
    speed = resolve_speed(config, device)
    model = speed_up(build_model(config).to(device), config, speed)  # DDP under torchrun
    # rank 0 first: it writes the synthetic set (or downloads CIFAR-10) that the others read
    loaders = distributed.from_main(
        lambda: data_preprocessing.build_loaders(config, device, distributed.rank(), distributed.world_size()),
        everywhere=True)
    criterion, optimizer = build_criterion(config), build_optimizer(model, config)
    scaler = speed.scaler()
    step = training_step(model, criterion, optimizer, speed, scaler)
    return Training(model, loaders.train, loaders.test, loaders.generator, criterion, optimizer,
                    build_scheduler(optimizer, config), speed, scaler, step, loaders.val)


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


if __name__ == "__main__":
    # `python model_preparation.py [the flags of main_general.py]` prints the parameter table
    print(parameter_table(parse_config(prog="model_preparation.py")))
