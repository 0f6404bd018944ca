"""Speed and memory, measured: `python benchmark.py --device cpu --out DIR` (`--quick`: about a minute).

Three parts, all after warm-up steps, reporting medians over timed steps:
- models: training and inference throughput (images/s) and peak training memory of the baseline
  ResNet-50 and the lambda ResNet-50 (every LAMBDA_POSITION mode there is) at the CIFAR-10 settings
  (32x32 images, ImageNet stem unless --stem cifar, batch 128 unless --batch-size), with the run's
  AMP / channels_last / compile settings;
- layers: one lambda layer against multi-head self-attention of the same width and heads on 8x8 ...
  64x64 maps (a forward and backward pass each), attention both with its maps materialised,
  softmax(QK^T)V as Bello 2021 measured it, and with PyTorch's fused scaled_dot_product_attention;
  timm's LambdaLayer too when timm is importable, lucidrains' when lambda-networks is (an optional
  extra: pip install lambda-networks). An out-of-memory is recorded as "OOM";
- mixers (with the models): each 3x3 conv of the baseline and each lambda layer (per mode) at the
  widths, map sizes and strides of the network, forward + backward at the model batch; the network
  totals against the floor (the lambda network with identities for its lambda layers); and the
  kernel-launching aten ops (KernelCount) per layer and per training step (docs/lambda-speed.md).

Peak memory: on CUDA torch.cuda.max_memory_allocated; elsewhere the bytes of live tensor storages,
counted by a dispatch mode that sees every tensor the step creates (plus parameters, optimizer state
and inputs that exist before it). Writes DIR/benchmark.json, DIR/benchmark.md and DIR/benchmark.png
(time and memory against map size, log scales, drawn with matplotlib) and prints the tables.
"""
from __future__ import annotations

import argparse
import collections
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cuda_graph
import data_preprocessing
import distributed
import model_preparation as prep
import nntrain
import resnet_lambda
import user_input
from figures import Panel, Series, line_chart
from lambda_layer import POSITIONS, LambdaLayer
from nntest import evaluate_confusion
from nntrain import synchronize
from resnet import STAGE_WIDTHS
from user_input import ConfigError

PROG = "benchmark.py"
MB = 2 ** 20
PAPER_BATCH = 128  # Bello 2021's memory comparison: 128 images of 64x64 positions


def build_parser() -> user_input._OneLineParser:
    parser = user_input._OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
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


# --- measuring ---

class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active, on any device.

    Every op's outputs pass through __torch_dispatch__; a storage is counted when first seen and
    uncounted when it is freed (a weakref finaliser on the storage object, which torch keeps alive
    as long as the storage lives).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared parameters count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one step (everything allocated, after reset_peak_memory_stats)"
    return ("peak bytes of live tensor storages over one step, tracked by a TorchDispatchMode, plus the "
            "parameters, buffers, optimizer state and inputs that exist before it (not the allocator's caching, "
            "not the process RSS)")


def measure(step, device: torch.device, warmup: int, iters: int, static: list) -> dict:
    """Median seconds of `step()` after `warmup` calls, and the peak memory of one more call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with PeakMemory() as tracker:
            step()
        peak = tracker.peak + storage_bytes(static)
    return {"median_s": statistics.median(times), "times_s": times, "peak_mb": peak / MB}


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        phrase in text for phrase in ("out of memory", "can't allocate", "not enough memory"))


# --- models ---

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


def model_steps(variant: dict, args, device: torch.device, amp: str, build=prep.build_model) -> ModelSteps:
    """The model of one variant (``build(config)``, seed 0) sped up as the run does (channels_last,
    compile), its optimizer, loss, autocast and scaler, and a training and an inference step on
    --batch-size random images."""
    config = model_config(variant, args)
    torch.manual_seed(0)
    model = prep.speed_up(build(config).to(device), config, device)
    optimizer = prep.build_optimizer(model, config)
    criterion = prep.build_criterion(config)
    autocast, scaler = prep.autocast(amp, device), prep.build_scaler(amp, device)
    memory_format = torch.channels_last if user_input.switched_on(args.channels_last, device) else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, distributed.unwrap(model).fc.out_features, (args.batch_size,), device=device)

    def train_step():
        with autocast:
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step():
        with autocast:
            model(images)

    return ModelSteps(model, optimizer, images, labels, train_step, infer_step)


def benchmark_model(variant: dict, args, device: torch.device, amp: str, build=prep.build_model) -> dict:
    """Training and inference throughput and peak training memory of one ResNet variant (--depth)
    (``build(config)`` makes the model: the identity-mixer floor of the mixer table passes its own)."""
    steps = model_steps(variant, args, device, amp, build)
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


# --- epochs: the run's own training loop ---

CIFAR10_TRAIN, CIFAR10_TEST, RUN_EPOCHS = 50_000, 10_000, 90  # what the projection is for
WARMUP_TEST_BATCHES = 2


def epoch_config(variant: dict, args, data_dir: str, compile_mode: str) -> dict:
    config = dict(user_input.defaults(), **variant, dataset="synthetic", data_dir=data_dir,
                  synthetic_train_size=args.epoch_train_size, synthetic_test_size=args.epoch_test_size,
                  batch_size=args.batch_size, device=args.device, amp=args.amp, channels_last=args.channels_last,
                  compile=compile_mode, num_workers=0, stem=args.stem)
    user_input.validate(config)
    return config


def timed(work, device: torch.device) -> tuple[object, float]:
    """(result of work(), seconds it took on the device)."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def benchmark_epochs(variant: dict, args, device: torch.device, data_dir: str, compile_mode: str) -> dict:
    """A run's first steps, then one whole epoch and evaluation, with the functions main_general.py
    trains with (build_training, nntrain.train, nntest.evaluate_confusion) on the synthetic set."""
    config = epoch_config(variant, args, data_dir, compile_mode)
    torch.manual_seed(config["seed"])
    training = prep.build_training(config, device)

    def train(epoch: int, max_batches: int = 0):
        data_preprocessing.seed_epoch(training.generator, config["seed"], epoch, training.train_loader)
        return nntrain.train(training.model, training.train_loader, training.criterion, training.optimizer, device,
                             epoch, max_batches, channels_last=training.channels_last, step=training.step)

    def evaluate(max_batches: int = 0):
        return evaluate_confusion(training.model, training.test_loader, training.criterion, device, max_batches,
                                  autocast=training.autocast, channels_last=training.channels_last)

    first_steps = cuda_graph.WARMUP_STEPS + 1  # through the capture of a CUDA graph
    _, first_s = timed(lambda: (train(0, first_steps), evaluate(WARMUP_TEST_BATCHES)), device)
    train_img_per_s = train(1)[3]
    (_, _, confusion), test_s = timed(evaluate, device)
    test_img_per_s = int(confusion.sum()) / test_s
    steady_epoch_s = CIFAR10_TRAIN / train_img_per_s + CIFAR10_TEST / test_img_per_s
    record = {"model": config["model"], "lambda_position": variant.get("lambda_position", "-"),
              "compile": training.compile, "compile_setting": compile_mode, "amp": training.amp, "batch": config["batch_size"],
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


# --- layers ---

class SelfAttention(nn.Module):
    """Multi-head self-attention over all H*W positions of a [B, d, H, W] map, content only.

    ``fused=False`` materialises the b x h x n x m attention maps (softmax(QK^T / sqrt(d_h)) V), as
    in Bello 2021's comparison; ``fused=True`` calls F.scaled_dot_product_attention.
    """

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dim, height, width = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, dim // self.heads, height * width)  # b, 3, h, d_h, n
        queries, keys, values = qkv.transpose(-1, -2).unbind(1)                            # b, h, n, d_h each
        if self.fused:
            out = F.scaled_dot_product_attention(queries, keys, values)                     # b, h, n, d_h
        else:
            scale = (dim // self.heads) ** -0.5
            attention = (queries @ keys.transpose(-1, -2) * scale).softmax(dim=-1)         # b, h, n, m
            out = attention @ values                                                        # b, h, n, d_h
        return out.transpose(-1, -2).reshape(b, dim, height, width)                         # b, d, H, W


def lambda_layer(args, size: int, mode: str) -> nn.Module:
    """Our LambdaLayer in position mode `mode` ("conv": an r x r context, r = --lambda-r)."""
    r = args.lambda_r if mode == "conv" else None
    return LambdaLayer(args.width, args.width, heads=args.heads, dim_k=args.qk_size, size=size, position=mode, r=r)


def timm_lambda_layer(args, size: int, r: int | None) -> nn.Module:
    """timm's LambdaLayer: relative position embeddings over the whole map (r=None) or a lambda convolution."""
    from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer
    return TimmLambdaLayer(args.width, args.width, feat_size=(size, size), num_heads=args.heads,
                           dim_head=args.qk_size, r=r)


# optional benchmark extras, distribution -> module: timm, and lucidrains' layer (pip install lambda-networks)
EXTRAS = {"timm": "timm", "lambda-networks": "lambda_networks"}


def extra_version(distribution: str) -> str | None:
    """The installed version of an optional extra, None when it cannot be imported."""
    try:
        importlib.import_module(EXTRAS[distribution])
    except ImportError:
        return None
    return importlib.metadata.version(distribution)


def extra_status(distribution: str) -> str:
    version = extra_version(distribution)
    return f"{distribution} {version}" if version else f"{distribution} not installed"


def lucidrains_lambda_layer(args, size: int, r: int | None) -> nn.Module:
    """lucidrains/lambda-networks' LambdaLayer (PyPI lambda-networks): global relative (n = size) or r x r."""
    from lambda_networks import LambdaLayer as LucidrainsLambdaLayer
    return LucidrainsLambdaLayer(args.width, dim_out=args.width, dim_k=args.qk_size, heads=args.heads,
                                 n=None if r else size, r=r)


def layer_builders(args) -> dict:
    builders = {f"lambda ({mode})": (lambda size, mode=mode: lambda_layer(args, size, mode)) for mode in POSITIONS}
    builders["attention (materialised)"] = lambda size: SelfAttention(args.width, args.heads, fused=False)
    builders["attention (SDPA)"] = lambda size: SelfAttention(args.width, args.heads, fused=True)
    if extra_version("timm"):
        builders["timm lambda (relative)"] = lambda size: timm_lambda_layer(args, size, None)
        builders[f"timm lambda (conv, r={args.lambda_r})"] = lambda size: timm_lambda_layer(args, size, args.lambda_r)
    if extra_version("lambda-networks"):
        builders["lucidrains lambda (relative)"] = lambda size: lucidrains_lambda_layer(args, size, None)
        builders[f"lucidrains lambda (conv, r={args.lambda_r})"] = (
            lambda size: lucidrains_lambda_layer(args, size, args.lambda_r))
    return builders


def table2_floats(name: str, args, size: int, batch: int) -> int | None:
    """Bello 2021, Table 2 memory: lambda k n m + b n k v (global embeddings), b n k v (lambda
    convolution), attention b h n m."""
    n = size * size
    lambdas = batch * n * args.qk_size * (args.width // args.heads)
    if name.startswith("attention (materialised)"):
        return batch * args.heads * n * n
    if "lambda" in name and "conv" in name:
        return lambdas
    if "lambda" in name:
        return args.qk_size * n * n + lambdas
    return None


def benchmark_layer(name: str, build, args, size: int, device: torch.device, limit_bytes: float | None) -> dict:
    """Forward + backward of one layer on a [layer_batch, d, size, size] map; "OOM" when it does not fit."""
    row = {"layer": name, "size": size, "batch": args.layer_batch}
    floats = table2_floats(name, args, size, args.layer_batch)
    row["table2_mb"] = None if floats is None else 4 * floats / MB
    if limit_bytes is not None and floats is not None and 3 * 4 * floats > limit_bytes:
        row.update(status="OOM", note=f"skipped: 3 x the Table 2 memory exceeds the {limit_bytes / 2**30:.1f} GB limit")
        return row
    layer = x = None
    try:
        torch.manual_seed(0)
        layer = build(size).to(device).train()
        x = torch.randn(args.layer_batch, args.width, size, size, device=device, requires_grad=True)

        # a dense output gradient in the output's layout, as the next layer's backward gives it (sum()'s
        # gradient is expanded, stride 0, which sends a batched matmul to a loop over its batch)
        grad = torch.randn_like(layer(x).float())

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).float().backward(grad)

        result = measure(step, device, args.warmup, args.iters, [*layer.parameters(), *layer.buffers(), x])
        row.update(status="ok", time_ms=1000 * result["median_s"], peak_mb=result["peak_mb"])
    except NotImplementedError as error:
        row.update(status="n/a", note=str(error))
    except (RuntimeError, MemoryError) as error:
        if not is_oom(error):
            raise
        row.update(status="OOM", note=str(error).splitlines()[0][:200])
    finally:
        del layer, x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --- mixers and kernels: the lambda layers against the 3x3 convolutions they replace ---

# ops that allocate or only relabel memory: no kernel runs (views are recognised by their schema)
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
                 "aten::_unsafe_view", "aten::promote_types"}
KERNEL_TARGET = 24  # most kernel-launching ops per lambda layer forward + backward (issue 12)


class KernelCount(TorchDispatchMode):
    """Counts the aten ops below autograd that launch a kernel: neither views nor NO_KERNEL_OPS.

    What an op runs inside its own kernel (a copy inside a convolution) is not seen; on a GPU each
    counted op is at least one kernel launch.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in NO_KERNEL_OPS:
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(step) -> int:
    with KernelCount() as counter:
        step()
    return sum(counter.ops.values())


def network_mixers(model: nn.Module, config: dict) -> dict:
    """(width, input map side, stride) -> [one of the model's 3x3 mixers there, how many blocks run one]."""
    sizes = resnet_lambda.stage_input_sizes((32, 32), config["stem"])
    found: dict = {}
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for index, block in enumerate(layer):
            stride = 2 if stage > 0 and index == 0 else 1
            key = (STAGE_WIDTHS[stage], (sizes[stage - 1] if stride == 2 else sizes[stage])[0], stride)
            found.setdefault(key, [block.conv2, 0])[1] += 1
    return found


def mixer_step(mixer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Forward + backward of one mixer: the gradients of its input and parameters (none accumulated)."""
    def step():
        out = mixer(x)
        torch.autograd.grad(out, [x, *mixer.parameters()], grad, allow_unused=True)
    return step


FLOOR = {"model": "lambda", "lambda_position": "conv"}  # any mode: its lambda layers become identities


def identity_mixer_floor(config: dict) -> nn.Module:
    """The lambda network with every lambda layer an identity (a strided block keeps its average pool)."""
    model = prep.build_model(config)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if isinstance(block.conv2, nn.Sequential):
                block.conv2[0] = nn.Identity()
            else:
                block.conv2 = nn.Identity()
    return model


def step_kernels(model: nn.Module, args, device: torch.device) -> int:
    """Kernel-launching ops of one training forward + loss + backward (fp32), gradients None first."""
    model.to(device).train()
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, distributed.unwrap(model).fc.out_features, (args.batch_size,), device=device)
    model.zero_grad(set_to_none=True)
    return count_kernels(lambda: F.cross_entropy(model(images), labels).backward())


def benchmark_mixer(mixer: nn.Module, key: tuple, args, device: torch.device) -> dict:
    """Time (median ms) and kernel count of one mixer's forward + backward at the model batch."""
    width, size, stride = key
    mixer = mixer.to(device).train()
    memory_format = torch.channels_last if user_input.switched_on(args.channels_last, device) else torch.contiguous_format
    x = torch.randn(args.batch_size, width, size, size, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    step = mixer_step(mixer, x, torch.randn_like(mixer(x)))  # the gradient in the output's layout
    result = measure(step, device, args.warmup, args.iters, [])
    return {"ms": 1000 * result["median_s"], "kernels": count_kernels(step)}


def mixer_rows(args, device: torch.device) -> tuple[list[dict], dict]:
    """A row per (width, map size, stride) of the default network: the 3x3 conv and each lambda mode;
    and the kernel-launching ops per training step of each model."""
    rows: dict = {}
    per_step = {}
    for variant in model_variants(args):
        config = model_config(variant, args)
        torch.manual_seed(0)
        model = prep.build_model(config)
        name = "conv" if variant["model"] == "baseline" else f"lambda_{variant['lambda_position']}"
        per_step[name] = step_kernels(model, args, device)
        for key, (mixer, blocks) in network_mixers(model, config).items():
            row = rows.setdefault(key, {"width": key[0], "size": key[1], "stride": key[2], "blocks": blocks})
            measured = benchmark_mixer(mixer, key, args, device)
            row[f"{name}_ms"], row[f"{name}_kernels"] = measured["ms"], measured["kernels"]
            print(f"mixer {key} {name}: {measured['ms']:.2f} ms, {measured['kernels']} kernels", flush=True)
        del model
    per_step["floor"] = step_kernels(identity_mixer_floor(model_config(FLOOR, args)), args, device)
    return list(rows.values()), per_step


def benchmark_mixers(models: list[dict], args, device: torch.device, amp: str) -> dict:
    """The mixer table, the network totals against the identity-mixer floor, and the kernel counts."""
    rows, per_step = mixer_rows(args, device)
    floor = benchmark_model(FLOOR, args, device, amp, build=identity_mixer_floor)
    step_ms = {"conv" if m["model"] == "baseline" else f"lambda_{m['position']}": m["train_step_ms"] for m in models}
    totals = {"floor_step_ms": floor["train_step_ms"], "bound_baseline_over_floor": step_ms["conv"] / floor["train_step_ms"]}
    for name, ms in step_ms.items():
        totals[f"{name}_step_ms"] = ms
        totals[f"{name}_mixers_ms"] = ms - floor["train_step_ms"]  # the network's mixers: step - floor
        totals[f"{name}_mixers_summed_ms"] = sum(row["blocks"] * row[f"{name}_ms"] for row in rows)
    found = {}
    for name in [name for name in step_ms if name != "conv"]:
        for way in ("mixers", "mixers_summed"):
            ratio = totals[f"{name}_{way}_ms"] / totals[f"conv_{way}_ms"]
            found[f"{name}_{way}_over_conv"] = {"value": ratio, "target": 0.5, "met": ratio <= 0.5}
        # stride-1 rows: a strided row's mixer adds its 3x3 average pool (2 kernels) to the layer
        layer = max(row[f"{name}_kernels"] for row in rows if row["stride"] == 1)
        found[f"{name}_kernels_per_layer"] = {"value": layer, "target": KERNEL_TARGET, "met": layer <= KERNEL_TARGET}
        steps = per_step[name] / per_step["conv"]
        found[f"{name}_kernels_per_step_over_baseline"] = {"value": steps, "target": 1.8, "met": steps <= 1.8}
    return {"rows": rows, "totals": totals, "kernels_per_step": per_step, "targets": found}


def mixers_markdown(mixers: dict | None) -> str:
    if not mixers:
        return ""
    names = [name for name in mixers["kernels_per_step"] if name != "floor"]
    lines = ["", "## Mixers (forward + backward at the model batch; kernels: aten ops that launch one)", "",
             "| width | map | stride | blocks | " + " | ".join(f"{n} ms | {n} kernels" for n in names) + " |",
             "|---" * (4 + 2 * len(names)) + "|"]
    for row in mixers["rows"]:
        cells = " | ".join(f"{row[f'{n}_ms']:.2f} | {row[f'{n}_kernels']}" for n in names)
        lines.append(f"| {row['width']} | {row['size']}x{row['size']} | {row['stride']} | {row['blocks']} | {cells} |")
    t = mixers["totals"]
    lines += ["", "| network | train step ms | mixers ms (step - floor) | mixers ms (summed rows) | kernels per step |",
              "|---|---|---|---|---|",
              f"| identity-mixer floor | {t['floor_step_ms']:.1f} | - | - | {mixers['kernels_per_step']['floor']} |"]
    for n in names:
        lines.append(f"| {n} | {t[f'{n}_step_ms']:.1f} | {t[f'{n}_mixers_ms']:.1f} | {t[f'{n}_mixers_summed_ms']:.1f} "
                     f"| {mixers['kernels_per_step'][n]} |")
    lines += ["", f"Bound (baseline / floor): {t['bound_baseline_over_floor']:.2f}x.", "",
              "| mixer target | value | goal | met |", "|---|---|---|---|"]
    for name, target in mixers["targets"].items():
        lines.append(f"| {name} | {target['value']:.2f} | <= {target['target']} | {target['met']} |")
    return "\n".join(lines) + "\n"


def default_memory_limit(device: torch.device) -> float | None:
    """Half of MemAvailable on CPU (an allocation past it could get the process killed); none on CUDA."""
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return available_kb * 1024 / 2
    except (OSError, StopIteration):
        return 8 * 2 ** 30


# --- targets and reports ---

def targets(models: list[dict], layers: list[dict], args) -> dict:
    found = {}
    baseline = next((m for m in models if m["model"] == "baseline"), None)
    for m in models:
        if m["model"] == "lambda" and baseline:
            ratio = m["train_img_s"] / baseline["train_img_s"]
            found[f"train_speedup_lambda_{m['position']}"] = {
                "value": ratio, "target": 1.3, "met": ratio >= 1.3,
                "note": f"lambda / baseline training img/s at batch {m['batch']}, 32x32, {args.stem} stem"}
    largest = max(args.sizes)
    attention = next((r for r in layers if r["layer"] == "attention (materialised)" and r["size"] == largest), None)
    for r in layers:
        if r["layer"].startswith("lambda") and r["size"] == largest and attention and r.get("status") == "ok":
            measured = attention.get("peak_mb") / r["peak_mb"] if attention.get("status") == "ok" else None
            paper = (table2_floats("attention (materialised)", args, largest, PAPER_BATCH)
                     / table2_floats(r["layer"], args, largest, PAPER_BATCH))
            found[f"memory_ratio_{r['layer']}_{largest}x{largest}"] = {
                "value": measured, "target": 10, "met": None if measured is None else measured >= 10,
                "analytic_table2_ratio_at_batch_128": paper,
                "note": f"materialised attention / lambda peak memory, batch {args.layer_batch}"}
    ours = "lambda (relative)"  # timm's layer is relative and global too
    ok = {(r["layer"], r["size"]): r for r in layers if r.get("status") == "ok"}
    for size in args.sizes:
        if (ours, size) in ok and ("timm lambda (relative)", size) in ok:
            ratio = ok[("timm lambda (relative)", size)]["time_ms"] / ok[(ours, size)]["time_ms"]
            found[f"speed_vs_timm_{size}x{size}"] = {
                "value": ratio, "target": 1.0, "met": ratio >= 1.0,
                "note": f"timm's LambdaLayer (relative, global) time / {ours} time, forward + backward"}
    return found


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# benchmark.py on {report['machine']['device_name']}", "", f"`{report['command']}`", "",
             f"torch {report['machine']['torch']}, {report['machine']['threads']} CPU threads, "
             f"AMP {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}; "
             f"{s['warmup']} warm-up + {s['iters']} timed steps (median); quick {s['quick']}; "
             f"1-minute load average at the start {report['machine']['load_average_1min_at_start']}.", "",
             f"Peak memory: {report['memory_method']}.", ""]
    if not report.get("finished", True):
        lines += ["**Unfinished**: the run is still going or was stopped; the tables hold the parts it finished.", ""]
    if report["models"]:
        lines += [f"## Models (ResNet-{s.get('depth', 50)}, 32x32, {s.get('stem', 'imagenet')} stem, "
                  f"batch {s['batch_size']})", "",
                  "| model | position | params | train img/s | inference img/s | train step ms | train peak MB |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {m['model']} | {m['position']} | {m['params']:,} | {m['train_img_s']:.1f} | {m['infer_img_s']:.1f} "
                  f"| {m['train_step_ms']:.1f} | {m['train_peak_mb']:.0f} |" for m in report["models"]]
        lines.append("")
    lines += [f"## Layers (d = {s['width']}, h = {s['heads']}, k = {s['qk_size']}, batch {s['layer_batch']}, "
              f"forward + backward)", "",
              "| map | layer | time ms | peak MB | Table 2 memory MB |", "|---|---|---|---|---|"]
    for r in report["layers"]:
        table2 = "-" if r["table2_mb"] is None else f"{r['table2_mb']:.1f}"
        if r["status"] == "ok":
            lines.append(f"| {r['size']}x{r['size']} | {r['layer']} | {r['time_ms']:.2f} | {r['peak_mb']:.1f} | {table2} |")
        else:
            lines.append(f"| {r['size']}x{r['size']} | {r['layer']} | {r['status']} | {r['status']} | {table2} |")
    lines += ["", f"timm: {report['timm']}; {report['lucidrains']}.", "", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        extra = (f" (Table 2 ratio at batch 128: {t['analytic_table2_ratio_at_batch_128']:.1f})"
                 if "analytic_table2_ratio_at_batch_128" in t else "")
        lines.append(f"| {name}: {t['note']}{extra} | {value} | >= {t['target']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Two panels, time and peak memory against map size, log scales, one line per layer; OOMs left out."""
    settings = report["settings"]
    names = list(dict.fromkeys(r["layer"] for r in report["layers"]))
    panels = []
    for key, title, unit in (("time_ms", "time per forward + backward", "time (ms)"),
                             ("peak_mb", "peak memory", "peak memory (MB)")):
        series = []
        for name in names:
            rows = [r for r in report["layers"] if r["layer"] == name and r["status"] == "ok" and r[key] > 0]
            series.append(Series(name, [r["size"] for r in rows], [r[key] for r in rows]))
        panels.append(Panel(title, "map side n (an n x n feature map)", unit, series, x_log=2, y_log=10))
    line_chart(panels, path, title=f"batch {settings['layer_batch']}, d {settings['width']}, "
                                   f"h {settings['heads']}; {report['machine']['device_name']}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_name()}, {prep.available_cpus()} cores")
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def write_report(report: dict, args, out: str) -> str:
    """benchmark.json and benchmark.md of what is measured so far (after each part, so that a run cut
    short by a timeout keeps its finished parts; "finished" is False until the last part)."""
    report["targets"] = targets(report["models"], report["layers"], args)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report) + mixers_markdown(report["mixers"]) + epochs_markdown(report["epochs"])
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(table)
    return table


def run(args, argv: list[str]) -> dict:
    resolve_args(args)
    device = prep.select_device(args.device)
    amp = prep.resolve_amp(args.amp, device)
    prep.configure_backends({"num_threads": args.num_threads, "cudnn_benchmark": True}, device)
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
            models.append(benchmark_model(variant, args, device, amp))
            print(f"{variant}: {models[-1]['train_img_s']:.1f} train img/s, {models[-1]['infer_img_s']:.1f} inference img/s",
                  flush=True)
            write_report(report, args, out)
    report["mixers"] = benchmark_mixers(models, args, device, amp) if models else None
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


if __name__ == "__main__":
    sys.exit(main())
