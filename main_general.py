"""Train a ResNet-50 or a lambda ResNet-50 on CIFAR-10: `python main_general.py [--flags]`.

Settings come from user_input.py, overridden by flags (`--help` lists them). Watch the run with
`tensorboard --logdir runs`.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import time
from datetime import datetime

import numpy as np
import torch

import data_preprocessing
import model_preparation as prep
from log_data import RunLogger
from nntest import evaluate_confusion
from nntrain import NonFiniteLossError, train
from user_input import ConfigError, parse_config, switched_on

PROG = "main_general.py"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def claim_run_dirs(config: dict, resuming: bool) -> tuple[str, str]:
    """(run dir, checkpoint dir) of this run. A new run never reuses an existing directory."""
    folder = prep.model_folder(config)
    name = config["run_name"] or datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(config["runs_dir"], folder, name)
    run_dir = base
    try:
        if resuming:
            os.makedirs(run_dir, exist_ok=True)
        else:
            for suffix in range(1, 1000):  # two runs started in the same second get -2, -3, ...
                try:
                    os.makedirs(run_dir)
                    break
                except FileExistsError:
                    if config["run_name"]:
                        raise ConfigError(f"run {run_dir} already exists; choose another --run-name "
                                          f"or continue it with --resume latest") from None
                    run_dir = f"{base}-{suffix + 1}"
        checkpoint_dir = os.path.join(config["checkpoint_dir"], folder, os.path.basename(run_dir))
        os.makedirs(checkpoint_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the run's folders ({error.strerror}: {error.filename}); "
                          f"check --runs-dir and --checkpoint-dir") from None
    config["run_name"] = os.path.basename(run_dir)
    return run_dir, checkpoint_dir


def checkpoint_state(model, optimizer, scheduler, next_epoch: int, best: dict, config: dict,
                     scaler=None) -> dict:
    return {"model": prep.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": next_epoch, "best_acc": best["acc"], "best_epoch": best["epoch"], "config": config,
            "rng": prep.rng_states()}


def save_checkpoints(state: dict, checkpoint_dir: str, improved: bool, every: int) -> None:
    """last.pt every epoch, epoch_NNN.pt every `every` epochs, best.pt when the test accuracy improved."""
    last = os.path.join(checkpoint_dir, "last.pt")
    prep.save_checkpoint(state, last)
    epoch = state["epoch"]
    if every and epoch % every == 0:
        shutil.copyfile(last, os.path.join(checkpoint_dir, f"epoch_{epoch:03d}.pt"))
    if improved:
        temporary = os.path.join(checkpoint_dir, "best.pt.tmp")
        shutil.copyfile(last, temporary)
        os.replace(temporary, os.path.join(checkpoint_dir, "best.pt"))


def run(config: dict) -> None:
    checkpoint = prep.resolve_resume(config)
    if checkpoint is not None:
        config["run_name"] = checkpoint["config"]["run_name"]
    device = prep.select_device(config["device"])
    amp = prep.resolve_amp(config["amp"], device)
    prep.configure_backends(config, device)
    seed_everything(config["seed"])
    model = prep.speed_up(prep.build_model(config).to(device), config, device)
    train_loader, test_loader, generator = data_preprocessing.build_loaders(config, device)
    criterion = prep.build_criterion(config)
    optimizer = prep.build_optimizer(model, config)
    scheduler = prep.build_scheduler(optimizer, config)
    speed = {"autocast": prep.autocast(amp, device), "scaler": prep.build_scaler(amp, device),
             "channels_last": switched_on(config["channels_last"], device)}
    start_epoch, best = 0, {"acc": -1.0, "epoch": 0}
    if checkpoint is not None:
        prep.restore(checkpoint, model, optimizer, scheduler, speed["scaler"])
        start_epoch, best = checkpoint["epoch"], {"acc": checkpoint["best_acc"], "epoch": checkpoint["best_epoch"]}

    run_dir, checkpoint_dir = claim_run_dirs(config, resuming=checkpoint is not None)
    logger = RunLogger(run_dir, start_epoch)
    try:
        logger.text(f"{config['model']} ResNet-50, {prep.count_parameters(model):,} parameters, on {device}; "
                    f"{len(train_loader.dataset)} train / {len(test_loader.dataset)} test images ({config['dataset']})")
        logger.text("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
        logger.text(f"speed: amp {amp}, channels_last {speed['channels_last']}, device loader "
                    f"{isinstance(train_loader, data_preprocessing.DeviceLoader)}, compile {config['compile']}, "
                    f"{torch.get_num_threads()} CPU threads")
        if checkpoint is not None:
            logger.text(f"resumed from {checkpoint['path']} at epoch {start_epoch + 1}")
        logger.text(f"run directory {run_dir}, checkpoints {checkpoint_dir}")
        logger.config(config)
        logger.samples(data_preprocessing.sample_grid(train_loader.dataset, config["seed"]))
        train_epochs(config, model, (train_loader, test_loader, generator), criterion, optimizer, scheduler,
                     device, start_epoch, best, logger, checkpoint_dir, speed)
        logger.text(logger.summary())
    finally:
        logger.close()


def train_epochs(config, model, data, criterion, optimizer, scheduler, device, start_epoch, best,
                 logger, checkpoint_dir, speed: dict) -> None:
    """``speed``: autocast context, gradient scaler and channels_last flag, as made in run()."""
    train_loader, test_loader, generator = data
    if start_epoch >= config["epochs"]:
        logger.text(f"the run already has {start_epoch} epochs; pass a larger --epochs to train on")
    for epoch in range(start_epoch, config["epochs"]):
        data_preprocessing.seed_epoch(generator, config["seed"], epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, train_time, img_per_s = train(model, train_loader, criterion, optimizer, device,
                                                             epoch, config["max_batches"], **speed)
        test_start = time.perf_counter()
        test_loss, test_acc, confusion = evaluate_confusion(model, test_loader, criterion, device, config["max_batches"],
                                                            autocast=speed["autocast"],
                                                            channels_last=speed["channels_last"])
        test_time = time.perf_counter() - test_start
        scheduler.step()
        improved = test_acc > best["acc"]
        if improved:
            best = {"acc": test_acc, "epoch": epoch + 1}
        logger.epoch({"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                      "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                      "epoch_time_s": train_time,
                      "train_img_per_s": img_per_s, "test_time_s": test_time}, config["epochs"])
        logger.evaluation(epoch + 1, confusion, test_loader.dataset.classes)
        state = checkpoint_state(model, optimizer, scheduler, epoch + 1, best, config, speed["scaler"])
        save_checkpoints(state, checkpoint_dir, improved, config["checkpoint_every"])


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, prog=PROG)
    try:
        run(config)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"{PROG}: error: {error}; the last checkpoint is the last good one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
