"""Train a ResNet or a lambda ResNet (DEPTH 26, 50, 101) on CIFAR-10, CIFAR-100 or your own image
folders: `python main_general.py [--flags]`.

Settings come from user_input.py, overridden by flags (`--help` lists them). Watch the run with
`tensorboard --logdir runs`.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time

import numpy as np
import torch

import checkpoints
import data_preprocessing
import distributed
import lambda_diagnostics
import model_preparation as prep
import speed
from cuda_graph import CaptureError
from log_data import RunLogger
from nntest import evaluate_confusion
from nntrain import NonFiniteLossError, StopRequest, TrainingInterrupted, out_of_memory_message, stop_on_signals, train
from user_input import ConfigError, parse_config

PROG = "main_general.py"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SilentLogger:
    """The logger of torchrun's ranks other than 0: only rank 0 writes the run's files and prints."""

    def text(self, line: str) -> None: ...
    def config(self, config: dict) -> None: ...
    def samples(self, grid) -> None: ...
    def epoch(self, record: dict, epochs: int) -> None: ...
    def evaluation(self, epoch: int, confusion, class_names, groups=()) -> None: ...
    def draws_figures(self, epoch: int) -> bool: return False
    def lambdas(self, epoch: int, shares, figure) -> None: ...
    def summary(self) -> str: return ""
    def close(self) -> None: ...


def run(config: dict, stop: StopRequest) -> None:
    """A run, in order: device and resume point, what it trains with, its folders and first
    checkpoint, then the epochs, logged to the run directory."""
    device = prepare_device(config)
    checkpoint = checkpoints.resolve_resume_on_main(config)
    if checkpoint is not None:
        config["run_name"] = checkpoint["config"]["run_name"]
    speed.configure_backends(config, device)
    seed_everything(config["seed"])
    training = prep.build_training(config, device)
    start_epoch, best = checkpoints.restore_training(checkpoint, training)
    # rank 0 names the run (a timestamp) and creates its folders; the other ranks take that name
    run_dir, checkpoint_dir = distributed.from_main(
        lambda: checkpoints.claim_run_dirs(config, resuming=checkpoint is not None))
    config["run_name"] = os.path.basename(run_dir)
    stop.resume_from = checkpoints.first_checkpoint(checkpoint_dir, checkpoint, training, best, config)
    logger = RunLogger(run_dir, start_epoch) if distributed.is_main() else SilentLogger()
    try:
        log_start(logger, config, training, device, checkpoint, start_epoch, (run_dir, checkpoint_dir))
        train_epochs(config, training, device, start_epoch, best, logger, checkpoint_dir, stop)
        logger.text(logger.summary())
    except (TrainingInterrupted, NonFiniteLossError, torch.OutOfMemoryError, CaptureError) as error:
        logger.text(stopped_line(error, config, stop))
        raise
    finally:
        logger.close()


def prepare_device(config: dict) -> torch.device:
    """The run's device, once its folders are known to be writable; under torchrun this rank's."""
    checkpoints.check_writable(config["runs_dir"], "runs_dir")
    checkpoints.check_writable(config["checkpoint_dir"], "checkpoint_dir")
    device = speed.select_device(config["device"])
    return distributed.init_distributed(device) if distributed.launched_by_torchrun() else device


def log_start(logger, config: dict, training: prep.Training, device: torch.device, checkpoint: dict | None,
              start_epoch: int, folders: tuple[str, str]) -> None:
    """The opening lines of log.txt: model, data, settings, speed, torchrun, resume, folders."""
    logger.text(f"{config['model']} ResNet-{config['depth']}, {prep.count_parameters(training.model):,} parameters, on {device}; "
                f"{len(training.train_loader.dataset)} train / {len(training.test_loader.dataset)} test images "
                f"({config['dataset']})" + (f"; {len(training.val_loader.dataset)} training images held out for "
                                            f"validation, which chooses best.pt" if training.val_loader else ""))
    logger.text("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
    logger.text(f"speed: {training.speed.describe_amp()}, channels_last {training.speed.channels_last}, device loader "
                f"{isinstance(training.train_loader, data_preprocessing.DeviceLoader)}, compile {training.speed.compile}, "
                f"{torch.get_num_threads()} CPU threads")
    if distributed.distributed():
        world = distributed.world_size()
        logger.text(f"torchrun: {world} processes ({torch.distributed.get_backend()}), global batch "
                    f"{config['batch_size']} x {world} = {config['batch_size'] * world} images per step "
                    f"(LR is not scaled with it), SyncBatchNorm {config['sync_bn']}")
    if checkpoint is not None:
        logger.text(f"resumed from {checkpoint['path']} at epoch {start_epoch + 1}")
    logger.text(f"run directory {folders[0]}, checkpoints {folders[1]}")
    logger.config(config)
    if distributed.is_main():
        logger.samples(data_preprocessing.sample_grid(training.train_loader.dataset, config["seed"]))


def stopped_line(error: BaseException, config: dict, stop: StopRequest) -> str:
    """The last line log.txt gets when training stops early."""
    if isinstance(error, TrainingInterrupted):
        return f"stopped by {stop.name()} in {error}; a resume from {stop.resume_from} trains that epoch again"
    if isinstance(error, torch.OutOfMemoryError):
        return f"stopped: {out_of_memory_message(config)}"
    return f"stopped: {error}"


def train_epochs(config: dict, training: prep.Training, device: torch.device, start_epoch: int, best: dict,
                 logger, checkpoint_dir: str, stop: StopRequest) -> None:
    """Train and evaluate each epoch from `start_epoch` on; log it and checkpoint it."""
    if start_epoch >= config["epochs"]:
        logger.text(f"the run already has {start_epoch} epochs; pass a larger --epochs to train on")
    probe = probe_images(training) if distributed.is_main() else None
    chosen_by = "val_acc" if training.val_loader is not None else "test_acc"  # what picks best.pt
    for epoch in range(start_epoch, config["epochs"]):
        record = train_and_evaluate(config, training, device, epoch, stop)
        confusion = record.pop("confusion")
        improved = record[chosen_by] > best["acc"]
        if improved:
            best = {"acc": record[chosen_by], "epoch": epoch + 1}
        logger.epoch(record, config["epochs"])
        test_set = training.test_loader.dataset
        logger.evaluation(epoch + 1, confusion, test_set.classes, data_preprocessing.superclasses(test_set))
        if probe is not None and logger.draws_figures(epoch + 1):
            logger.lambdas(epoch + 1, lambda_diagnostics.content_position_shares(training.model, probe),
                           lambda_diagnostics.position_figure(training.model, f"epoch {epoch + 1}"))
        if distributed.is_main():
            state = checkpoints.training_checkpoint(training, epoch + 1, best, config)
            checkpoints.save_checkpoints(state, checkpoint_dir, improved, config["checkpoint_every"])
        if distributed.any_rank(stop.event.is_set())[0] and epoch + 1 < config["epochs"]:
            raise TrainingInterrupted(f"epoch {epoch + 2}, before its first step")


PROBE_IMAGES = 32  # test images on which lambda_diagnostics measures the content and position shares


def probe_images(training: prep.Training) -> torch.Tensor | None:
    """The first PROBE_IMAGES test images, fixed for the run; None for a model without lambda layers."""
    if not lambda_diagnostics.lambda_layers(training.model):
        return None
    images = []
    for batch, _ in training.test_loader:
        images.append(batch)
        if sum(len(b) for b in images) >= PROBE_IMAGES:
            break
    return torch.cat(images)[:PROBE_IMAGES].to(next(training.model.parameters()).device)


def train_and_evaluate(config: dict, training: prep.Training, device: torch.device, epoch: int,
                       stop: StopRequest) -> dict:
    """One epoch: train, evaluate, step the schedule; the epoch's record (and its confusion matrix)."""
    data_preprocessing.seed_epoch(training.generator, config["seed"], epoch, training.train_loader, distributed.rank())
    lr = float(training.optimizer.param_groups[0]["lr"])  # a device tensor under COMPILE=graph
    train_loss, train_acc, train_time, img_per_s = train(training.step, training.train_loader, device, epoch,
                                                         config["max_batches"], stop=stop.event,
                                                         channels_last=training.speed.channels_last)
    test_start = time.perf_counter()
    distributed.sync_buffers(training.model)  # under torchrun: every rank evaluates rank 0's BatchNorm statistics
    evaluated = distributed.unwrap(training.model) if distributed.distributed() else training.model

    def evaluate(loader):
        return evaluate_confusion(evaluated, loader, training.criterion, device, config["max_batches"],
                                  autocast=training.speed.autocast(), channels_last=training.speed.channels_last)
    test_loss, test_acc, confusion = evaluate(training.test_loader)
    record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
              "test_acc": test_acc, "lr": lr, "epoch_time_s": train_time, "train_img_per_s": img_per_s}
    if training.val_loader is not None:
        record["val_loss"], record["val_acc"], _ = evaluate(training.val_loader)
    training.scheduler.step()
    return {**record, "test_time_s": time.perf_counter() - test_start, "test_images": int(confusion.sum()),
            "confusion": confusion}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_config(argv, prog=PROG)
    with stop_on_signals(PROG) as stop:
        try:
            run(config, stop)
        except ConfigError as error:  # printed by every rank: it may be one rank's own
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        except torch.OutOfMemoryError:
            print(f"{PROG}: error: {out_of_memory_message(config)}", file=sys.stderr)
            return 2
        except NonFiniteLossError as error:  # under torchrun every rank stops at the same step: rank 0 says so
            if distributed.is_main():
                print(f"{PROG}: error: {error}; the last checkpoint is the last good one", file=sys.stderr)
            return 1
        except (TrainingInterrupted, KeyboardInterrupt) as error:
            if distributed.is_main():
                where = f"in {error}" if isinstance(error, TrainingInterrupted) else "at once"
                resume = (f"resume with: {checkpoints.resume_command(argv, stop.resume_from, PROG)}" if stop.resume_from
                          else "no checkpoint was written yet; start the run again")
                print(f"{PROG}: stopped by {stop.name()} {where}; {resume}", file=sys.stderr)
            return 128 + (stop.signal or signal.SIGINT)
        finally:
            distributed.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
