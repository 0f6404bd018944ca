"""Training steps of the lambda ResNet with this tree's lambda_layer.py and with another commit's, side by side.

    python benchmarks/layer_versions.py --commit 6a669d7 --stem cifar --batch-size 32

Builds the baseline and, for each --positions mode, the lambda network twice: once with the working
tree's LambdaLayer and once with the one `git show COMMIT:lambda_layer.py` gives (everything else is
this tree's). Times benchmark.py's training step (forward, loss, backward, optimizer step, with the
run's AMP and channels_last) round-robin, --rounds rounds after 2 untimed ones, and prints the
median step time, images/s and the ratio to the baseline's images/s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from unittest.mock import patch

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model_preparation as prep  # noqa: E402
import speed  # noqa: E402
import user_input  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.measuring import timed  # noqa: E402


def layer_module_at(commit: str):
    """lambda_layer.py as it was at `commit`, imported under another name."""
    shown = subprocess.run(["git", "show", f"{commit}:lambda_layer.py"], capture_output=True, text=True)
    if shown.returncode:
        raise user_input.ConfigError(f"--commit {commit}: {shown.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(prefix="layer-versions-"), f"lambda_layer_{commit}.py")
    with open(path, "w") as f:
        f.write(shown.stdout)
    spec = importlib.util.spec_from_file_location(f"lambda_layer_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_with(layer_module):
    """prep.build_model, its lambda layers from `layer_module` when given (None: this tree's)."""
    if layer_module is None:
        return prep.build_model

    def build(config: dict) -> torch.nn.Module:
        with patch("resnet_lambda.LambdaLayer", layer_module.LambdaLayer), \
                patch("resnet_lambda.make_position_embedding", layer_module.make_position_embedding):
            return prep.build_model(config)
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", required=True, help="the commit whose lambda_layer.py to compare with")
    parser.add_argument("--stem", default="imagenet", choices=user_input.CHOICES["stem"])
    parser.add_argument("--positions", default="relative,conv", help="lambda modes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    args.channels_last, args.compile, args.amp, args.depth = "auto", False, "auto", 50
    try:
        old = layer_module_at(args.commit)
        variants = {"baseline": ({"model": "baseline"}, None)}
        for mode in args.positions.split(","):
            variant = {"model": "lambda", "lambda_position": mode}
            models.model_config(variant, args)  # refuses bad settings (the device's name too) before any work
            variants[f"{mode} (this tree)"] = (variant, None)
            variants[f"{mode} ({args.commit})"] = (variant, old)
        device = speed.select_device(args.device)
        amp = speed.resolve_amp(args.amp, device)
        speed.configure_backends({"num_threads": args.num_threads, "cudnn_benchmark": True}, device)
        steps = {name: models.model_steps(variant, args, device, build_with(module)).train_step
                 for name, (variant, module) in variants.items()}
    except user_input.ConfigError as error:
        print(f"layer_versions.py: error: {error}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(2 + args.rounds):
        for name, step in steps.items():
            _, seconds = timed(step, device)
            if round_ >= 2:
                times[name].append(seconds)
    baseline = statistics.median(times["baseline"])
    lines = [f"ResNet-50, {args.stem} stem, batch {args.batch_size}, {device}, AMP {amp}, {torch.get_num_threads()} threads, "
             f"{args.rounds} rounds (median, min-max); load average {os.getloadavg()[0]:.2f} at the end", "",
             "| model (lambda_layer.py) | step ms | min-max | train img/s | / baseline |", "|---|---|---|---|---|"]
    for name, seconds in times.items():
        median = statistics.median(seconds)
        lines.append(f"| {name} | {1000 * median:.0f} | {1000 * min(seconds):.0f}-{1000 * max(seconds):.0f} "
                     f"| {args.batch_size / median:.1f} | {baseline / median:.2f}x |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
