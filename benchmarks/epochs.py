"""The epochs part of benchmark.py: a run's first steps, then a whole epoch and its evaluation, with
the functions main_general.py trains with, on a synthetic set; projected to 90 CIFAR-10 epochs."""
from __future__ import annotations

import gc
import tempfile

import torch

import cuda_graph
import data_preprocessing
import model_preparation as prep
import nntrain
import user_input
from benchmarks.measuring import timed
from benchmarks.models import model_variants
from nntest import evaluate_confusion


CIFAR10_TRAIN, CIFAR10_TEST, RUN_EPOCHS = 50_000, 10_000, 90  # what the projection is for
WARMUP_TEST_BATCHES = 2


def epoch_config(variant: dict, args, data_dir: str, compile_mode: str) -> dict:
    config = dict(user_input.defaults(), **variant, dataset="synthetic", data_dir=data_dir,
                  synthetic_train_size=args.epoch_train_size, synthetic_test_size=args.epoch_test_size,
                  batch_size=args.batch_size, device=args.device, amp=args.amp, channels_last=args.channels_last,
                  compile=compile_mode, num_workers=0, stem=args.stem)
    user_input.validate(config)
    return config


def benchmark_epochs(variant: dict, args, device: torch.device, data_dir: str, compile_mode: str) -> dict:
    """A run's first steps, then one whole epoch and evaluation, with the functions main_general.py
    trains with (build_training, nntrain.train, nntest.evaluate_confusion) on the synthetic set."""
    config = epoch_config(variant, args, data_dir, compile_mode)
    torch.manual_seed(config["seed"])
    training = prep.build_training(config, device)

    def train(epoch: int, max_batches: int = 0):
        data_preprocessing.seed_epoch(training.generator, config["seed"], epoch, training.train_loader)
        return nntrain.train(training.step, training.train_loader, device, epoch, max_batches,
                             channels_last=training.speed.channels_last)

    def evaluate(max_batches: int = 0):
        return evaluate_confusion(training.model, training.test_loader, training.criterion, device, max_batches,
                                  autocast=training.speed.autocast(), channels_last=training.speed.channels_last)

    first_steps = cuda_graph.WARMUP_STEPS + 1  # through the capture of a CUDA graph
    _, first_s = timed(lambda: (train(0, first_steps), evaluate(WARMUP_TEST_BATCHES)), device)
    train_img_per_s = train(1)[3]
    (_, _, confusion), test_s = timed(evaluate, device)
    test_img_per_s = int(confusion.sum()) / test_s
    steady_epoch_s = CIFAR10_TRAIN / train_img_per_s + CIFAR10_TEST / test_img_per_s
    record = {"model": config["model"], "lambda_position": variant.get("lambda_position", "-"),
              "compile": training.speed.compile, "compile_setting": compile_mode, "amp": training.speed.amp, "batch": config["batch_size"],
              "train_images": config["synthetic_train_size"], "test_images": int(confusion.sum()),
              "first_step_s": first_s, "first_steps": first_steps, "train_img_per_s": train_img_per_s,
              "test_img_per_s": test_img_per_s,
              "epoch_s": config["synthetic_train_size"] / train_img_per_s + test_s,
              "cifar10_epoch_s": steady_epoch_s, "projected_90_epochs_s": first_s + RUN_EPOCHS * steady_epoch_s}
    del training
    gc.collect()
    return record


def epoch_variants(args) -> list[dict]:
    chosen = args.epoch_models.split(",")
    return [v for v in model_variants(args) if v.get("lambda_position", v["model"]) in chosen]


def run_epochs(args, device: torch.device, finished=lambda records: None) -> list[dict]:
    """The epochs table: every model variant under every --epoch-compile value; ``finished(records)``
    after each row."""
    records = []
    with tempfile.TemporaryDirectory(prefix="benchmark-data-") as data_dir:
        for compile_mode in args.epoch_compile.split(","):
            for variant in epoch_variants(args):
                records.append(benchmark_epochs(variant, args, device, data_dir, compile_mode))
                r = records[-1]
                print(f"epochs {variant} compile {r['compile']}: first steps {r['first_step_s']:.1f} s, "
                      f"{r['train_img_per_s']:.0f} train img/s, {r['test_img_per_s']:.0f} test img/s, "
                      f"90 epochs {r['projected_90_epochs_s'] / 60:.1f} min", flush=True)
                finished(records)
    return records


def epochs_markdown(records: list[dict]) -> str:
    if not records:
        return ""
    first = records[0]
    lines = [f"## Epochs (the training loop of main_general.py, synthetic set of {first['train_images']:,} train / "
             f"{first['test_images']:,} test images, batch {first['batch']}, AMP {first['amp']})", "",
             f"First steps: the first {first['first_steps']} training steps and {WARMUP_TEST_BATCHES} test batches, "
             f"compile and CUDA-graph capture included. 90 epochs: that, plus 90 CIFAR-10-sized epochs "
             f"({CIFAR10_TRAIN:,} train + {CIFAR10_TEST:,} test images) at the steady speeds.", "",
             "| model | position | compile | first steps s | train img/s | test img/s | epoch s | 90 epochs min |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['lambda_position']} | {r['compile']}"
              f"{'' if r['compile'] == r['compile_setting'] else ' (asked ' + r['compile_setting'] + ')'} | {r['first_step_s']:.1f} | "
              f"{r['train_img_per_s']:,.0f} | {r['test_img_per_s']:,.0f} | {r['epoch_s']:.1f} | "
              f"{r['projected_90_epochs_s'] / 60:.1f} |" for r in records]
    return "\n".join(lines) + "\n\n"
