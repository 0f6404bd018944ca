"""What a run leaves behind: console lines, log.txt, metrics.jsonl, TensorBoard events, config.json."""
from __future__ import annotations

import json
import os
import re

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

SCALARS = {  # TensorBoard tag -> metrics.jsonl key
    "Loss/train": "train_loss", "Loss/test": "test_loss",
    "Accuracy/train": "train_acc", "Accuracy/test": "test_acc",
    "LR": "lr", "Time/epoch_s": "epoch_time_s", "Throughput/train_img_per_s": "train_img_per_s",
}


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl, one dict per finished epoch (none if the file is missing).
    A last line without its newline was torn by a crash and is left out."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


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
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def samples(self, grid: torch.Tensor) -> None:
        """Save a [3, H, W] image grid as samples.png and show it in TensorBoard."""
        save_image(grid, os.path.join(self.run_dir, "samples.png"))
        self.writer.add_image("Samples/train_augmented", grid, 0)

    def epoch(self, record: dict, epochs: int) -> None:
        """Log one finished epoch everywhere; `record` has the metrics.jsonl keys."""
        self.records.append(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for tag, key in SCALARS.items():
            self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()
        self.text(f"epoch {record['epoch']:3d}/{epochs}  "
                  f"train loss {record['train_loss']:.4f} acc {record['train_acc']:5.2f}%  "
                  f"test loss {record['test_loss']:.4f} acc {record['test_acc']:5.2f}%  "
                  f"lr {record['lr']:.2e}  {record['epoch_time_s']:.1f} s  "
                  f"{record['train_img_per_s']:.0f} img/s")

    def summary(self) -> str:
        """One line over every epoch of the run, including those before a resume."""
        if not self.records:
            return "no epoch finished"
        best = max(self.records, key=lambda r: r["test_acc"])
        train_time = sum(r["epoch_time_s"] for r in self.records)
        test_time = sum(r.get("test_time_s", 0.0) for r in self.records)
        throughput = sum(r["train_img_per_s"] for r in self.records) / len(self.records)
        return (f"best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']}; "
                f"train time {train_time:.1f} s, test time {test_time:.1f} s, "
                f"mean throughput {throughput:.0f} train img/s")

    def close(self) -> None:
        self.writer.close()
        self.log_file.close()
