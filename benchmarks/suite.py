"""benchmark.py's command line (build_parser, resolve_args, main) and its parts in order (run): models,
mixers, layers, epochs, each written to the report as soon as it is measured."""
from __future__ import annotations

import argparse
import os
import re
import sys

import speed
import user_input
from benchmarks.epochs import run_epochs
from benchmarks.layers import benchmark_layer, extra_status, layer_builders, plot
from benchmarks.measuring import default_memory_limit, memory_method
from benchmarks.mixers import benchmark_mixers
from benchmarks.models import benchmark_model, model_variants
from benchmarks.report import machine, write_report
from lambda_layer import POSITIONS
from user_input import ConfigError

PROG = "benchmark.py"
DESCRIPTION = "Speed and memory of the models, their mixers, the lambda layer against attention, and epochs"


def build_parser() -> user_input._OneLineParser:
    parser = user_input._OneLineParser(prog=PROG, description=DESCRIPTION,
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device type>)")
    parser.add_argument("--quick", action="store_true", help="small batches and few steps: about a minute on 2 CPU cores")
    parser.add_argument("--batch-size", type=int, default=None, help="model batch (default 128; --quick: 4)")
    parser.add_argument("--layer-batch", type=int, default=None, help="layer batch (default 8; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick: 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps, median reported (default 5; --quick: 2)")
    parser.add_argument("--sizes", default=None, help="feature-map sizes of the layer comparison (default 8,16,32,64; --quick: 8,16,32)")
    parser.add_argument("--width", type=int, default=64, help="layer width d (c2's lambda layer: 64)")
    parser.add_argument("--heads", type=int, default=4, help="lambda queries / attention heads h")
    parser.add_argument("--qk-size", type=int, default=16, help="lambda query/key size k")
    parser.add_argument("--lambda-r", type=int, default=23, help="local context r of the conv mode (odd)")
    parser.add_argument("--stem", default="imagenet", choices=user_input.CHOICES["stem"],
                        help="stem of the models (as STEM in user_input.py; cifar: 32x32 maps in c2)")
    parser.add_argument("--depth", type=int, default=50, choices=user_input.CHOICES["depth"],
                        help="ResNet depth of the model comparison (as DEPTH in user_input.py)")
    parser.add_argument("--amp", default="auto", choices=user_input.CHOICES["amp"], help="as AMP in user_input.py")
    parser.add_argument("--channels-last", default="auto", choices=user_input.CHOICES["channels_last"],
                        help="as CHANNELS_LAST in user_input.py")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (not the layers)")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads; 0: as NUM_THREADS=0")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="skip a layer case (recorded as OOM) whose analytic memory exceeds this; "
                             "default: half the available RAM on CPU, none on CUDA")
    parser.add_argument("--skip-models", action="store_true", help="only the layer comparison")
    parser.add_argument("--epoch-train-size", type=int, default=None,
                        help="epochs table: synthetic training images (default 50000, CIFAR-10's; --quick: 64)")
    parser.add_argument("--epoch-test-size", type=int, default=None,
                        help="epochs table: synthetic test images (default 10000; --quick: 32)")
    parser.add_argument("--epoch-compile", default="auto",
                        help="epochs table: COMPILE values to measure, comma-separated (e.g. off,graph,reduce-overhead)")
    parser.add_argument("--epoch-models", default="baseline,absolute,relative,conv",
                        help="epochs table: the baseline and/or lambda position modes to run, comma-separated")
    parser.add_argument("--skip-epochs", action="store_true", help="no epochs table")
    return parser


def resolve_args(args) -> None:
    """Fill the defaults that depend on --quick; refuse nonsense with a ConfigError."""
    quick = {"batch_size": (128, 4), "layer_batch": (8, 1), "warmup": (2, 1), "iters": (5, 2),
             "epoch_train_size": (50_000, 64), "epoch_test_size": (10_000, 32)}
    for key, (full, small) in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= {0 if key == 'warmup' else 1}")
    if not re.fullmatch(user_input.DEVICE_PATTERN, args.device):
        raise ConfigError(f"--device {args.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if args.sizes is None:
        args.sizes = "8,16,32" if args.quick else "8,16,32,64"
    try:
        args.sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes={args.sizes!r} must be sizes like 8,16,32,64") from None
    unknown = [name for name in args.epoch_models.split(",") if name not in ("baseline", *POSITIONS)]
    if unknown:
        raise ConfigError(f"--epoch-models {unknown[0]!r} is not one of baseline, {', '.join(POSITIONS)}")
    unknown = [mode for mode in args.epoch_compile.split(",") if mode not in user_input.CHOICES["compile"]]
    if unknown:
        raise ConfigError(f"--epoch-compile {unknown[0]!r} is not one of {', '.join(user_input.CHOICES['compile'])}")
    if min(args.sizes) < 1 or args.width % args.heads or args.num_threads < 0 or args.lambda_r % 2 == 0:
        raise ConfigError("--sizes must be >= 1, --heads must divide --width, --num-threads >= 0, --lambda-r odd")


def run(args, argv: list[str]) -> dict:
    resolve_args(args)
    device = speed.select_device(args.device)
    amp = speed.resolve_amp(args.amp, device)  # as the models' settings resolve it
    speed.configure_backends({"num_threads": args.num_threads, "cudnn_benchmark": True}, device)
    out = args.out or os.path.join("benchmarks", "results", device.type)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create --out {out} ({error.strerror})") from None
    limit = args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb else default_memory_limit(device)
    report = {"machine": machine(device), "settings": {**vars(args), "amp": amp},
              "memory_method": memory_method(device), "timm": extra_status("timm"),
              "command": " ".join(["python", PROG, *argv]), "models": [], "layers": [], "epochs": [],
              "targets": {}, "mixers": None, "lucidrains": extra_status("lambda-networks"), "finished": False}
    models, layers = report["models"], report["layers"]
    if not args.skip_models:
        for variant in model_variants(args):
            models.append(benchmark_model(variant, args, device))
            print(f"{variant}: {models[-1]['train_img_s']:.1f} train img/s, {models[-1]['infer_img_s']:.1f} inference img/s",
                  flush=True)
            write_report(report, args, out)
    report["mixers"] = benchmark_mixers(models, args, device) if models else None
    write_report(report, args, out)
    for size in args.sizes:
        for name, build in layer_builders(args).items():
            layers.append(benchmark_layer(name, build, args, size, device, limit))
            print(f"{size}x{size} {name}: {layers[-1].get('time_ms', layers[-1]['status'])} ms", flush=True)
        write_report(report, args, out)
    if not args.skip_epochs:
        report["epochs"] = run_epochs(args, device, lambda records: write_report({**report, "epochs": records}, args, out))
    report["finished"] = True
    table = write_report(report, args, out)
    plot(report, os.path.join(out, "benchmark.png"))
    print(table)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0
