"""Every setting of a run. Edit the constants below, or override any of them from the command line
by its kebab-case name: BATCH_SIZE -> --batch-size 64, MODEL -> --model baseline.

`python main_general.py --help` lists them all with their defaults; the trailing comment of each
constant is its help text.
"""
from __future__ import annotations

import argparse
import re
import sys

# --- Model ---
MODEL = "lambda"  # "baseline" (ResNet) or "lambda" (ResNet with lambda layers in c2-c5)
DEPTH = 50  # ResNet-v1.5 depth: 26, 50 or 101 (bottlenecks per stage 2,2,2,2 / 3,4,6,3 / 3,4,23,3)
STEM = "imagenet"  # "imagenet" (7x7 s2 conv + max-pool; 8x8 maps in c2) or "cifar" (3x3 s1 conv)
HEADS = 4  # lambda layer queries per position h; Bello 2021 default
QK_SIZE = 16  # lambda layer query/key size k; Bello 2021 default
ZERO_INIT_RESIDUAL = True  # last BatchNorm gamma of every bottleneck starts at 0; reproduction

# --- Lambda layer ---
LAMBDA_POSITION = "absolute"  # position lambdas: "absolute" (reproduction), "relative" (global) or "conv" (local r x r)
LAMBDA_R = 23  # local context r x r of LAMBDA_POSITION=conv (odd); Bello 2021 ImageNet value
LAMBDA_U = 1  # intra-depth u of keys and values; Bello 2021 default
LAMBDA_STAGES = "LLLL"  # mixer of stages c2-c5: L lambda layer, C 3x3 conv; paper's hybrids: CCLL, CCCL

# --- Data ---
DATASET = "cifar10"  # "cifar10", "cifar100" (downloaded to DATA_DIR), "synthetic" (small offline stand-in) or "folder" (DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*)
DATA_DIR = "data"  # holds cifar-10-batches-py/, cifar-100-python/ (and synthetic/ for the offline demo), or your train/ and val/ folders
IMAGE_SIZE = 32  # side of the square training images in pixels: 32 for the CIFAR sets, e.g. 64, 128 or 224 for a folder
NUM_WORKERS = 2  # DataLoader worker processes; 0 loads in the main process
SYNTHETIC_TRAIN_SIZE = 2000  # images in the synthetic training set
SYNTHETIC_TEST_SIZE = 500  # images in the synthetic test set
VAL_SIZE = 0  # training images held out for validation (stratified by class, drawn with SEED), which then chooses best.pt; 0: none

# --- Optimisation (reproduction, Tables 1-3) ---
EPOCHS = 90  # training epochs
BATCH_SIZE = 128  # images per step
LR = 5e-4  # initial Adam lr; reproduction's sweep over {1e-2 ... 1e-4}
WARMUP_EPOCHS = 5  # lr x (epoch + 1) for these epochs, then cosine decay to the end
WEIGHT_DECAY = 1e-4  # Adam L2 weight decay
ADAM_BETAS = (0.9, 0.9999)  # Adam (beta1, beta2); on the command line: 0.9,0.9999
LABEL_SMOOTHING = 0.1  # eps of the label-smoothed cross-entropy

# --- Run ---
SEED = 0  # seeds weights, data order and augmentation
DEVICE = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps"
RUNS_DIR = "runs"  # TensorBoard events, logs and metrics go to RUNS_DIR/<Model>/<run name>/
CHECKPOINT_DIR = "checkpoints"  # checkpoints go to CHECKPOINT_DIR/<Model>/<run name>/
CHECKPOINT_EVERY = 5  # keep epoch_NNN.pt every this many epochs (0: only last.pt and best.pt)
RUN_NAME = ""  # empty: a timestamped name
RESUME = ""  # empty: start afresh; "latest" (newest run of MODEL) or a checkpoint path
MAX_BATCHES = 0  # 0: full epochs; otherwise at most this many train and test batches (smoke runs)

# --- Speed ---
AMP = "auto"  # "auto" (CUDA: bf16 from compute capability 8.0, fp16 + gradient scaler below; CPU: fp32), "bf16", "fp16", "fp32"
GPU_LOADER = "auto"  # data set kept on the device, augmented there: "auto" (on CUDA), "on" or "off" (DataLoader)
CHANNELS_LAST = "auto"  # channels_last memory format for model and images: "auto" (on CUDA), "on" or "off"
CUDNN_BENCHMARK = True  # cuDNN times its kernels once and keeps the fastest (CUDA only)
COMPILE = "auto"  # "auto" (graph on CUDA with bf16/fp32, else off), "off", "graph" (whole step in one CUDA graph) or a torch.compile mode: "default", "reduce-overhead", "max-autotune"
NUM_THREADS = 0  # CPU threads of torch; 0: at most one per CPU core this process may use

# --- Several processes (torchrun) ---
SYNC_BN = False  # under torchrun: SyncBatchNorm, batch statistics over all ranks' images (no effect on one process)

CHOICES = {
    "model": ("baseline", "lambda"),
    "depth": (26, 50, 101),
    "dataset": ("cifar10", "cifar100", "synthetic", "folder"),
    "stem": ("imagenet", "cifar"),
    "lambda_position": ("absolute", "relative", "conv"),
    "amp": ("auto", "bf16", "fp16", "fp32"),
    "gpu_loader": ("auto", "on", "off"),
    "channels_last": ("auto", "on", "off"),
    "compile": ("auto", "off", "graph", "default", "reduce-overhead", "max-autotune"),
}
COMPILE_ALIASES = {"true": "default", "on": "default", "false": "off"}  # COMPILE was a true/false switch
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"  # the values DEVICE accepts
NOT_SETTINGS = ("CHOICES", "COMPILE_ALIASES", "DEVICE_PATTERN", "NOT_SETTINGS")  # constants that are no flag


class ConfigError(ValueError):
    """A setting or input the user can fix; reported as one line, exit status 2."""


def defaults() -> dict:
    """The constants above as a config dict with lowercase keys."""
    return {name.lower(): value for name, value in vars(sys.modules[__name__]).items()
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in NOT_SETTINGS}


def _help_texts() -> dict:
    """Trailing comment of each constant, read from this file, keyed by lowercase name."""
    with open(__file__, encoding="utf-8") as f:
        pairs = re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", f.read(), flags=re.M)
    return {name.lower(): text for name, text in pairs}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_betas(text: str) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.9999, got {text!r}") from None
    return beta1, beta2


def _parser_type(default):
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, tuple):
        return _parse_betas
    return type(default)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="Train a ResNet or a lambda ResNet on CIFAR-10, CIFAR-100 or your images. "
                            "Each flag overrides the constant of the same name in user_input.py.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _help_texts()
    for key, default in defaults().items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=_parser_type(default),
                            default=default, metavar="B1,B2" if isinstance(default, tuple) else type(default).__name__.upper(),
                            help=helps.get(key, "").replace("%", "%%"))
    return parser


def validate(config: dict) -> None:
    """Raise ConfigError naming the first invalid setting and what would be valid (COMPILE's old
    true/false values are translated in place)."""
    config["compile"] = COMPILE_ALIASES.get(str(config["compile"]).lower(), config["compile"])
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key.upper()}={config[key]!r} is not one of {', '.join(map(str, allowed))}")
    if not re.fullmatch(DEVICE_PATTERN, config["device"]):
        raise ConfigError(f"DEVICE={config['device']!r} is not one of auto, cpu, cuda, cuda:N, mps")
    at_least = {"epochs": 1, "batch_size": 1, "heads": 1, "qk_size": 1, "lambda_r": 1, "lambda_u": 1,
                "warmup_epochs": 0, "num_workers": 0, "checkpoint_every": 0, "max_batches": 0, "num_threads": 0,
                "synthetic_train_size": 1, "synthetic_test_size": 1, "image_size": 8, "val_size": 0}
    for key, low in at_least.items():
        if config[key] < low:
            raise ConfigError(f"{key.upper()}={config[key]} must be >= {low}")
    if not config["lr"] > 0:
        raise ConfigError(f"LR={config['lr']} must be > 0")
    if not config["weight_decay"] >= 0:
        raise ConfigError(f"WEIGHT_DECAY={config['weight_decay']} must be >= 0")
    if not all(0 <= beta < 1 for beta in config["adam_betas"]):
        raise ConfigError(f"ADAM_BETAS={config['adam_betas']} must both be in [0, 1)")
    if not 0 <= config["label_smoothing"] < 1:
        raise ConfigError(f"LABEL_SMOOTHING={config['label_smoothing']} must be in [0, 1)")
    if config["image_size"] != 32 and config["dataset"] != "folder":
        raise ConfigError(f"IMAGE_SIZE={config['image_size']} needs --dataset folder; the images of "
                          f"{config['dataset']} are 32x32 (use --image-size 32)")
    if config["lambda_r"] % 2 == 0:
        raise ConfigError(f"LAMBDA_R={config['lambda_r']} must be odd (an r x r context centred on the query)")
    if not re.fullmatch(r"[CL]{4}", config["lambda_stages"]):
        raise ConfigError(f"LAMBDA_STAGES={config['lambda_stages']!r} must be 4 letters C (conv) or L (lambda) "
                          f"for stages c2-c5, e.g. LLLL, CCLL or CCCL")
    if not isinstance(config["sync_bn"], bool):
        raise ConfigError(f"SYNC_BN={config['sync_bn']!r} must be true or false")
    if config["model"] == "lambda":
        _validate_lambda(config)
    if re.search(r"[/\\]", config["run_name"]) or config["run_name"] in (".", ".."):
        raise ConfigError(f"RUN_NAME={config['run_name']!r} must be a plain name, not a path")


def _validate_lambda(config: dict) -> None:
    from resnet import STAGE_WIDTHS  # the widths of the bottlenecks' lambda layers in c2-c5 (imports torch)

    bad = [width for width in STAGE_WIDTHS if width % config["heads"]]
    if bad:
        raise ConfigError(f"HEADS={config['heads']} must divide every lambda layer's width "
                          f"{STAGE_WIDTHS}; it does not divide {bad[0]} (try 1, 2, 4, 8, 16, 32 or 64)")
    if config["lambda_stages"] == "CCCC":
        raise ConfigError("LAMBDA_STAGES='CCCC' has no lambda stage; use MODEL=baseline for the convolutional ResNet")
    if config["lambda_position"] == "absolute":
        from resnet_lambda import MAX_ABSOLUTE_ENTRIES, largest_absolute_embedding  # imports torch

        size = (config["image_size"],) * 2
        entries = largest_absolute_embedding(size, config["stem"], config["lambda_stages"], config["qk_size"],
                                             config["lambda_u"])
        if entries > MAX_ABSOLUTE_ENTRIES:
            raise ConfigError(f"LAMBDA_POSITION=absolute with STEM={config['stem']} and LAMBDA_STAGES="
                              f"{config['lambda_stages']} needs an (n, m, k, u) embedding of {entries:,} entries "
                              f"(limit {MAX_ABSOLUTE_ENTRIES:,}) at IMAGE_SIZE={config['image_size']}; use --lambda-position relative or conv, "
                              f"or a hybrid such as --lambda-stages CCLL")


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Defaults overridden by the command line, validated. Exits with status 2 on bad input."""
    parser = build_parser(prog)
    config = vars(parser.parse_args(argv))
    try:
        validate(config)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return config
