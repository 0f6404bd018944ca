"""What a run leaves behind: console lines, log.txt, metrics.jsonl, TensorBoard events, config.json;
and reading them back (metrics records, run statistics). Figures are drawn in figures.py."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchvision.utils import save_image

from figures import confusion_figure

SCALARS = {  # TensorBoard tag -> metrics.jsonl key
    "Loss/train": "train_loss", "Loss/test": "test_loss",
    "Accuracy/train": "train_acc", "Accuracy/test": "test_acc",
    "LR": "lr", "Time/epoch_s": "epoch_time_s", "Throughput/train_img_per_s": "train_img_per_s",
    "Loss/val": "val_loss", "Accuracy/val": "val_acc",  # with VAL_SIZE only
}


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl, one dict per finished epoch (none if the file is missing).

    A last line without its newline is a record still being written, or one torn by a crash:
    left out.
    """
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


# the confusion-matrix image of the first, every CONFUSION_EVERY-th and the last epoch: drawing it
# takes about 0.4 s on a CPU, a noticeable share of a GPU epoch; the per-class scalars are logged every epoch
CONFUSION_EVERY = 10
EPOCH_LINE = re.compile(rb"epoch +(\d+)/\d+ ")  # the start of RunLogger.epoch's console line


def truncate_log(path: str, start_epoch: int) -> None:
    """Cut log.txt before the first line of an epoch after `start_epoch` (it is trained again) or
    a line torn by a crash, so that a resumed run repeats no line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.readlines()
    kept = 0
    for line in lines:
        match = EPOCH_LINE.match(line)
        if not line.endswith(b"\n") or (match and int(match.group(1)) > start_epoch):
            break
        kept += 1
    if kept < len(lines):
        with open(path + ".tmp", "wb") as f:
            f.writelines(lines[:kept])
        os.replace(path + ".tmp", path)


def run_stats(records: list[dict]) -> dict:
    """Over a run's metrics records (at least one): the best record by test accuracy (selected on the
    test set: optimistic), the best by validation accuracy (None without VAL_SIZE; its test accuracy
    is the honest "best" figure), total training and evaluation seconds, and the mean training images/s."""
    validated = [r for r in records if "val_acc" in r]
    return {"best": max(records, key=lambda r: r["test_acc"]),
            "best_val": max(validated, key=lambda r: r["val_acc"]) if validated else None,
            "train_time_s": sum(r["epoch_time_s"] for r in records),
            "test_time_s": sum(r.get("test_time_s", 0.0) for r in records),
            "train_img_per_s": sum(r["train_img_per_s"] for r in records) / len(records)}


class RunLogger:
    """Writes one run directory. On resume it continues the same files and TensorBoard run,
    dropping anything logged for epochs after the checkpoint (they are trained again)."""

    def __init__(self, run_dir: str, start_epoch: int = 0):
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.records = [r for r in read_metrics(self.metrics_path) if r["epoch"] <= start_epoch]
        self._rewrite_metrics()
        # purge_step hides TensorBoard events of the epochs that are trained again
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if start_epoch else None)
        truncate_log(os.path.join(run_dir, "log.txt"), start_epoch)
        self.log_file = open(os.path.join(run_dir, "log.txt"), "a", encoding="utf-8")
        self.settings: dict | None = None
        self.epochs = 0  # the run's planned epochs, known from the first epoch() call

    def _rewrite_metrics(self) -> None:
        temporary = self.metrics_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(temporary, self.metrics_path)

    def text(self, line: str) -> None:
        """Print a line and append it to log.txt."""
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def config(self, config: dict) -> None:
        self.settings = dict(config)  # for the HParams tab, written by close()
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def samples(self, grid: torch.Tensor) -> None:
        """Save a [3, H, W] image grid as samples.png and show it in TensorBoard."""
        save_image(grid, os.path.join(self.run_dir, "samples.png"))
        self.writer.add_image("Samples/train_augmented", grid, 0)

    def epoch(self, record: dict, epochs: int) -> None:
        """Log one finished epoch everywhere; `record` has the metrics.jsonl keys."""
        self.epochs = epochs
        self.records.append(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for tag, key in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()
        val = f"val loss {record['val_loss']:.4f} acc {record['val_acc']:5.2f}%  " if "val_acc" in record else ""
        self.text(f"epoch {record['epoch']:3d}/{epochs}  "
                  f"train loss {record['train_loss']:.4f} acc {record['train_acc']:5.2f}%  {val}"
                  f"test loss {record['test_loss']:.4f} acc {record['test_acc']:5.2f}%  "
                  f"lr {record['lr']:.2e}  {record['epoch_time_s']:.1f} s  "
                  f"{record['train_img_per_s']:.0f} img/s")

    def evaluation(self, epoch: int, confusion: torch.Tensor, class_names: Sequence[str],
                   groups: Sequence[tuple[str, Sequence[int]]] = ()) -> None:
        """Per-class test accuracy scalars and (first, every CONFUSION_EVERY-th and last epoch) the
        confusion-matrix image of one evaluation. With
        `groups` (CIFAR-100's 20 superclasses: name, class indices) one scalar per group, the top-1
        accuracy over its classes' images, and the confusion matrix between the groups."""
        tag, names, accuracies = "Accuracy_per_class", class_names, per_class_accuracy(confusion)
        if groups:
            tag, names = "Accuracy_per_superclass", [name for name, _ in groups]
            accuracies = [group_accuracy(confusion, members) for _, members in groups]
            confusion = grouped_confusion(confusion, [members for _, members in groups])
        for name, accuracy in zip(names, accuracies):
            if not math.isnan(accuracy):  # a class absent from a capped (--max-batches) evaluation
                self.writer.add_scalar(f"{tag}/{name}", accuracy, epoch)
        if self.draws_figures(epoch):
            title = f"test set, epoch {epoch}" + (", superclasses" if groups else "")
            self.writer.add_figure("Confusion/test", confusion_figure(confusion, names, title), epoch)
        self.writer.flush()

    def draws_figures(self, epoch: int) -> bool:
        """The epochs that draw figures: the first, every CONFUSION_EVERY-th and the last."""
        return epoch == 1 or epoch % CONFUSION_EVERY == 0 or epoch == self.epochs

    def lambdas(self, epoch: int, shares: dict[str, tuple[float, float]], figure) -> None:
        """lambda_diagnostics' content and position shares of each lambda layer as scalars, and its
        figure of the learned position tables."""
        for name, (content, position) in shares.items():
            self.writer.add_scalar(f"Lambda_content_share/{name}", content, epoch)
            self.writer.add_scalar(f"Lambda_position_share/{name}", position, epoch)
        if figure is not None:
            self.writer.add_figure("Lambda/position_tables", figure, epoch)
        self.writer.flush()

    def hparams(self) -> None:
        """The settings and the final metrics in TensorBoard's HParams tab, in this run's own events.

        Called by close(), so a finished, stopped or resumed run shows its latest numbers.
        """
        if not self.records or self.settings is None:
            return
        stats = run_stats(self.records)
        final = self.records[-1]
        metrics = {"HParams/best_test_acc": stats["best"]["test_acc"], "HParams/final_test_acc": final["test_acc"],
                   "HParams/final_train_acc": final["train_acc"], "HParams/final_test_loss": final["test_loss"],
                   "HParams/epochs_done": final["epoch"]}
        if stats["best_val"] is not None:
            metrics["HParams/test_acc_at_best_val"] = stats["best_val"]["test_acc"]
        values = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                  for key, value in self.settings.items()}
        for summary in hparams_summaries(values, metrics):
            self.writer.file_writer.add_summary(summary, final["epoch"])
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, final["epoch"])

    def summary(self) -> str:
        """One line over every epoch of the run, including those before a resume."""
        if not self.records:
            return "no epoch finished"
        stats, final = run_stats(self.records), self.records[-1]
        if stats["best_val"] is not None:
            chosen = stats["best_val"]
            accuracy = (f"test accuracy {chosen['test_acc']:.2f}% at the best validation epoch {chosen['epoch']} "
                        f"(validation {chosen['val_acc']:.2f}%), final {final['test_acc']:.2f}%")
        else:
            accuracy = (f"final test accuracy {final['test_acc']:.2f}%; best {stats['best']['test_acc']:.2f}% at epoch "
                        f"{stats['best']['epoch']} (chosen on the test set: --val-size gives an unbiased choice)")
        return (f"{accuracy}; "
                f"train time {stats['train_time_s']:.1f} s, test time {stats['test_time_s']:.1f} s, "
                f"mean throughput {stats['train_img_per_s']:.0f} train img/s")

    def close(self) -> None:
        self.hparams()
        self.writer.close()
        self.log_file.close()


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Top-1 accuracy % of each true class (rows of `confusion`); NaN for a class with no images."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    return (100.0 * confusion.diagonal() / confusion.sum(dim=1)).tolist()  # 0 / 0 -> NaN


def group_accuracy(confusion: torch.Tensor, members: Sequence[int]) -> float:
    """Top-1 accuracy % over the images whose true class is one of `members`; NaN if there are none."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    rows = confusion[list(members)]                                   # members, classes
    return (100.0 * rows[:, list(members)].diagonal().sum() / rows.sum()).item()


def grouped_confusion(confusion: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """The confusion matrix between groups of classes: [g, g'] counts images of a class of group g
    predicted as a class of group g' (classes in no group are left out)."""
    owner = torch.full((confusion.shape[0],), -1, dtype=torch.long)  # class -> its group; -1: in none
    for index, members in enumerate(groups):
        owner[list(members)] = index
    flat = owner[:, None] * len(groups) + owner[None, :]              # classes, classes: (g, g') cell
    kept = (owner[:, None] >= 0) & (owner[None, :] >= 0)              # classes, classes
    counts = torch.zeros(len(groups) ** 2, dtype=torch.long).index_add_(0, flat[kept], confusion.long()[kept])
    return counts.view(len(groups), len(groups))
