"""The models part of benchmark.py: training and inference throughput and peak training memory of
the baseline ResNet and the lambda ResNet in each position mode, set up as a run sets them up."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import distributed
import model_preparation as prep
import user_input
from benchmarks.measuring import measure
from lambda_layer import POSITIONS
from speed import resolve_speed, speed_up
from user_input import ConfigError


def model_config(variant: dict, args) -> dict:
    config = dict(user_input.defaults(), **variant, batch_size=args.batch_size, channels_last=args.channels_last,
                  compile=args.compile, amp=args.amp, device=args.device, depth=args.depth, stem=args.stem)
    user_input.validate(config)
    return config


def model_variants(args) -> list[dict]:
    """The baseline and every lambda mode that the settings allow (user_input.validate refuses absolute
    embeddings of the CIFAR stem's 32x32 maps: too many entries); a refused mode is said and skipped."""
    variants = [{"model": "baseline"}]
    for mode in POSITIONS:
        try:
            model_config({"model": "lambda", "lambda_position": mode}, args)
            variants.append({"model": "lambda", "lambda_position": mode})
        except ConfigError as error:
            print(f"lambda {mode} skipped: {error}", flush=True)
    return variants


@dataclass
class ModelSteps:
    """A model set up as a run trains it, on one fixed batch of random 32x32 images (``model_steps``)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor
    train_step: object  # () -> None: forward, loss, backward and optimizer step under the run's AMP
    infer_step: object  # () -> None: a forward under no_grad


def model_steps(variant: dict, args, device: torch.device, build=prep.build_model) -> ModelSteps:
    """The model of one variant (``build(config)``, seed 0) sped up as the run does (channels_last,
    compile), and its training step (the run's own, with its optimizer, loss, autocast and scaler)
    and inference step on --batch-size random images."""
    config = model_config(variant, args)
    speed = resolve_speed(config, device)
    torch.manual_seed(0)
    model = speed_up(build(config).to(device), config, speed)
    optimizer = prep.build_optimizer(model, config)
    step = prep.training_step(model, prep.build_criterion(config), optimizer, speed, speed.scaler())
    images = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=speed.memory_format)
    labels = torch.randint(0, distributed.unwrap(model).fc.out_features, (args.batch_size,), device=device)
    autocast = speed.autocast()

    @torch.no_grad()
    def infer_step():
        with autocast:
            model(images)

    return ModelSteps(model, optimizer, images, labels, lambda: step(images, labels), infer_step)


def benchmark_model(variant: dict, args, device: torch.device, build=prep.build_model) -> dict:
    """Training and inference throughput and peak training memory of one ResNet variant (--depth)
    (``build(config)`` makes the model: the identity-mixer floor of the mixer table passes its own)."""
    steps = model_steps(variant, args, device, build)
    model, optimizer, images, labels = steps.model, steps.optimizer, steps.images, steps.labels
    train_step, infer_step = steps.train_step, steps.infer_step

    model.train()
    static = [*model.parameters(), *model.buffers(), images, labels]
    train = measure(train_step, device, args.warmup, args.iters, static + tree_flatten(optimizer.state_dict()["state"])[0])
    model.eval()
    infer = measure(infer_step, device, args.warmup, args.iters, static)
    result = {"model": variant["model"], "position": variant.get("lambda_position", "-"),
              "params": prep.count_parameters(distributed.unwrap(model)), "batch": args.batch_size,
              "train_img_s": args.batch_size / train["median_s"], "infer_img_s": args.batch_size / infer["median_s"],
              "train_step_ms": 1000 * train["median_s"], "train_peak_mb": train["peak_mb"],
              "infer_peak_mb": infer["peak_mb"]}
    del model, optimizer, steps
    gc.collect()
    return result


def speed_targets(models: list[dict], args) -> dict:
    """The lambda ResNet's training throughput over the baseline's, per position mode (goal 1.3x)."""
    baseline = next((m for m in models if m["model"] == "baseline"), None)
    found = {}
    for m in models:
        if m["model"] == "lambda" and baseline:
            ratio = m["train_img_s"] / baseline["train_img_s"]
            found[f"train_speedup_lambda_{m['position']}"] = {
                "value": ratio, "target": 1.3, "met": ratio >= 1.3,
                "note": f"lambda / baseline training img/s at batch {m['batch']}, 32x32, {args.stem} stem"}
    return found


def models_markdown(models: list[dict], settings: dict) -> list[str]:
    if not models:
        return []
    lines = [f"## Models (ResNet-{settings.get('depth', 50)}, 32x32, {settings.get('stem', 'imagenet')} stem, "
             f"batch {settings['batch_size']})", "",
             "| model | position | params | train img/s | inference img/s | train step ms | train peak MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['model']} | {m['position']} | {m['params']:,} | {m['train_img_s']:.1f} | {m['infer_img_s']:.1f} "
              f"| {m['train_step_ms']:.1f} | {m['train_peak_mb']:.0f} |" for m in models]
    return lines + [""]
