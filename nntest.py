"""Evaluation on the test set, and `python nntest.py --checkpoint PATH` to evaluate a saved checkpoint.

The command line rebuilds the network from the settings stored in the checkpoint, prints top-1 and
per-class accuracy and saves the confusion matrix as a PNG. Data flags (`--dataset`, `--data-dir`,
`--device`, ...) default to the checkpoint's own settings.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoints
import data_preprocessing
import distributed
import lambda_diagnostics
import model_preparation as prep
import speed
import user_input
from figures import confusion_figure, save
from log_data import per_class_accuracy

PROG = "nntest.py"
# settings the command line may override; the model settings always come from the checkpoint
DATA_KEYS = ("dataset", "data_dir", "synthetic_train_size", "synthetic_test_size", "seed", "batch_size",
             "num_workers", "device", "max_batches")


@torch.no_grad()
def evaluate_confusion(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
                       max_batches: int = 0, *, autocast=None, channels_last: bool = False
                       ) -> tuple[float, float, torch.Tensor]:
    """Return (mean loss, top-1 accuracy %, confusion matrix) over the loader (at most `max_batches`).

    confusion[i, j] counts test images of class i predicted as class j (a CPU long tensor). Sums and
    counts stay on the device until the end: no host sync per step (scatter_add_, unlike bincount
    on CUDA, needs no sync to size its output). ``autocast``: the run's autocast context.
    Under torchrun each rank evaluates its share of the test set (give it the unwrapped model:
    no DDP sync in eval) and the sums are added over the ranks, so every image counts once.
    """
    model.eval()
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    total = min(len(loader), max_batches) if max_batches else len(loader)
    loss_sum = torch.zeros((), device=device)
    confusion = None
    seen = 0
    for step, (images, labels) in enumerate(tqdm(loader, total=total, desc="test", leave=False,
                                                 dynamic_ncols=True, disable=not distributed.is_main())):
        if step == total:
            break
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        classes = logits.size(1)
        if confusion is None:
            confusion = torch.zeros(classes * classes, device=device, dtype=torch.long)  # flat [true, predicted]
        loss_sum += criterion(logits.float(), labels) * labels.size(0)
        cells = labels * classes + logits.argmax(dim=1)  # b: index of (true, predicted) in the flat matrix
        confusion.scatter_add_(0, cells, torch.ones_like(cells))
        seen += labels.size(0)
    if distributed.distributed():  # a rank with no test batch still joins the sums
        classes = distributed.unwrap(model).fc.out_features if confusion is None else classes
        confusion = torch.zeros(classes * classes, device=device, dtype=torch.long) if confusion is None else confusion
        seen_all = torch.tensor(seen, device=device)
        distributed.all_reduce_sum(loss_sum, confusion, seen_all)
        seen = int(seen_all.item())
    if confusion is None:
        return 0.0, 0.0, torch.zeros(0, 0, dtype=torch.long)
    confusion = confusion.view(classes, classes).cpu()  # true class, predicted class
    return loss_sum.item() / max(seen, 1), 100.0 * confusion.trace().item() / max(seen, 1), confusion


# --- command line: evaluate a checkpoint ---

def build_parser() -> argparse.ArgumentParser:
    parser = user_input._OneLineParser(
        prog=PROG, description="Evaluate a checkpoint of main_general.py on the test set: top-1 and "
        "per-class accuracy, and the confusion matrix as a PNG. The network is rebuilt from the "
        "settings stored in the checkpoint; the data flags default to the checkpoint's too.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by main_general.py, "
                        "e.g. checkpoints/Lambda/<run name>/best.pt")
    parser.add_argument("--out", default="", help="folder for <checkpoint name>_confusion.png "
                        "(default: the checkpoint's folder)")
    helps, defaults = user_input._help_texts(), user_input.defaults()
    for key in DATA_KEYS:
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=user_input._parser_type(defaults[key]),
                            default=None, help=helps[key].replace("%", "%%") + " (default: the checkpoint's)")
    return parser


def checkpoint_config(checkpoint: dict, overrides: dict) -> dict:
    """The checkpoint's settings (completed with today's defaults) with the command line's data flags."""
    config = {**user_input.defaults(), **checkpoint["config"]}
    config.update({key: value for key, value in overrides.items() if value is not None})
    user_input.validate(config)
    return config


def evaluate_checkpoint(path: str, overrides: dict, out_dir: str) -> dict:
    """Evaluate the checkpoint at `path`; print the results and save the confusion PNG in `out_dir`."""
    checkpoint = checkpoints.load_checkpoint(path)
    config = checkpoint_config(checkpoint, overrides)
    device = speed.select_device(config["device"])
    model = prep.build_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise user_input.ConfigError(f"{path}: the stored weights do not fit the stored settings "
                                     f"({str(error).splitlines()[0]})") from None
    model.to(device)
    try:  # before the evaluation, so that a bad --out is reported at once
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise user_input.ConfigError(f"cannot create the folder {out_dir} ({error.strerror}); "
                                     f"choose another --out") from None
    _, test_set = data_preprocessing.build_datasets(config)
    loader = DataLoader(test_set, batch_size=config["batch_size"], shuffle=False,
                        num_workers=config["num_workers"], pin_memory=device.type == "cuda")
    loss, accuracy, confusion = evaluate_confusion(model, loader, prep.build_criterion(config), device,
                                                   config["max_batches"])
    name = os.path.splitext(os.path.basename(path))[0]
    png = os.path.join(out_dir, f"{name}_confusion.png")
    title = f"{config['model']} {config['run_name']}, {name}: top-1 {accuracy:.2f}%"
    try:
        save(confusion_figure(confusion, test_set.classes, title), png)
    except OSError as error:
        raise user_input.ConfigError(f"cannot write {png} ({error.strerror}); choose another --out") from None
    report(config, checkpoint, confusion, test_set.classes, loss, accuracy)
    print(f"confusion matrix: {png}")
    found = {"loss": loss, "top1": accuracy, "per_class": per_class_accuracy(confusion), "confusion": confusion,
             "png": png}
    positions = lambda_diagnostics.position_figure(model, f"{config['run_name']}, {name}")
    if positions is not None:  # the lambda layers' learned position tables
        found["positions_png"] = os.path.join(out_dir, f"{name}_positions.png")
        save(positions, found["positions_png"])
        print(f"position tables: {found['positions_png']}")
    return found


def report(config: dict, checkpoint: dict, confusion: torch.Tensor, class_names, loss: float, accuracy: float):
    images = int(confusion.sum())
    print(f"{config['model']} ResNet-{config['depth']} of run {config['run_name']!r}, after epoch {checkpoint.get('epoch', '?')}; "
          f"{images} test images ({config['dataset']})")
    print(f"top-1 accuracy {accuracy:.2f}%  test loss {loss:.4f}")
    width = max(len(name) for name in class_names)
    for name, class_accuracy, count in zip(class_names, per_class_accuracy(confusion), confusion.sum(dim=1).tolist()):
        print(f"  {name:<{width}}  {class_accuracy:6.2f}%  of {count}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    path, out_dir = args.pop("checkpoint"), args.pop("out")
    try:
        evaluate_checkpoint(path, args, out_dir or os.path.dirname(os.path.abspath(path)))
    except user_input.ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
