"""What a run leaves behind: console lines, log.txt, metrics.jsonl, TensorBoard events, config.json;
and the PNG drawing shared by the tools that read runs (line charts, confusion matrices).

PNGs are drawn with Pillow (installed with torchvision), so matplotlib is not a dependency.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchvision.utils import save_image

SCALARS = {  # TensorBoard tag -> metrics.jsonl key
    "Loss/train": "train_loss", "Loss/test": "test_loss",
    "Accuracy/train": "train_acc", "Accuracy/test": "test_acc",
    "LR": "lr", "Time/epoch_s": "epoch_time_s", "Throughput/train_img_per_s": "train_img_per_s",
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
    """Over a run's metrics records (at least one): the best record by test accuracy, total training
    and evaluation seconds, and the mean training images/s."""
    return {"best": max(records, key=lambda r: r["test_acc"]),
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

    def evaluation(self, epoch: int, confusion: torch.Tensor, class_names: Sequence[str],
                   groups: Sequence[tuple[str, Sequence[int]]] = ()) -> None:
        """Per-class test accuracy scalars and the confusion-matrix image of one evaluation. With
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
        image = confusion_image(confusion, names, f"test set, epoch {epoch}" + (", superclasses" if groups else ""))
        self.writer.add_image("Confusion/test", np.asarray(image), epoch, dataformats="HWC")
        self.writer.flush()

    def hparams(self) -> None:
        """The settings and the final metrics in TensorBoard's HParams tab, in this run's own events.

        Called by close(), so a finished, stopped or resumed run shows its latest numbers.
        """
        if not self.records or self.settings is None:
            return
        best = run_stats(self.records)["best"]
        final = self.records[-1]
        metrics = {"HParams/best_test_acc": best["test_acc"], "HParams/final_test_acc": final["test_acc"],
                   "HParams/final_train_acc": final["train_acc"], "HParams/final_test_loss": final["test_loss"],
                   "HParams/epochs_done": final["epoch"]}
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
        stats = run_stats(self.records)
        return (f"best test accuracy {stats['best']['test_acc']:.2f}% at epoch {stats['best']['epoch']}; "
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


# --- PNG drawing with Pillow: line charts and confusion matrices ---

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
INK, GRID, WHITE = (40, 40, 40), (225, 225, 225), (255, 255, 255)


class Series(NamedTuple):
    """One line of a chart through the points (x[i], y[i]); non-finite points are left out."""
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = ""  # empty: a palette colour per distinct label
    dashed: bool = False


class Panel(NamedTuple):
    """One chart of a figure: its axes' titles and its lines."""
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a small bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 x 10^k apart) from <= low to >= high."""
    if not high > low:
        low, high = low - 0.5 - abs(low) * 0.05, high + 0.5 + abs(high) * 0.05
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * 0.999)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _tick_text(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill, width: int,
            dash: float = 8.0) -> None:
    """A polyline drawn as dashes of `dash` pixels with equal gaps, continuing across vertices."""
    phase = 0.0  # distance walked along the line, modulo 2 * dash
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        walked = 0.0
        while walked < length:
            step = min(dash - phase % dash, length - walked)
            if phase % (2 * dash) < dash:
                t0, t1 = walked / length, (walked + step) / length
                draw.line([(x0 + t0 * (x1 - x0), y0 + t0 * (y1 - y0)),
                           (x0 + t1 * (x1 - x0), y0 + t1 * (y1 - y0))], fill=fill, width=width)
            walked += step
            phase += step


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], color: str, dashed: bool) -> None:
    if dashed:
        _dashed(draw, points, color, width=3)
    else:
        draw.line(points, fill=color, width=3, joint="curve")


def _draw_panel(image: Image.Image, box: tuple[int, int, int, int], panel: Panel) -> None:
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box[0] + 72, box[1] + 34, box[2] - 16, box[3] - 50  # plot area
    small = font(13)
    draw.text(((box[0] + box[2]) / 2, box[1] + 8), panel.title, fill=INK, font=font(16), anchor="mt")
    points = [[(x, y) for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)] for s in panel.series]
    xs = [x for line in points for x, _ in line] or [0.0, 1.0]
    ys = [y for line in points for _, y in line] or [0.0, 1.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (x_low, x_high), (y_low, y_high) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for x in x_ticks:
        px = to_pixel(x, y_low)[0]
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.text((px, bottom + 5), _tick_text(x, x_ticks[1] - x_ticks[0]), fill=INK, font=small, anchor="mt")
    for y in y_ticks:
        py = to_pixel(x_low, y)[1]
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((left - 6, py), _tick_text(y, y_ticks[1] - y_ticks[0]), fill=INK, font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, box[3] - 8), panel.x_label, fill=INK, font=small, anchor="mb")
    label = Image.new("RGB", (int(small.getlength(panel.y_label)) + 4, 18), WHITE)
    ImageDraw.Draw(label).text((2, 1), panel.y_label, fill=INK, font=small)
    label = label.rotate(90, expand=True)  # read bottom to top
    image.paste(label, (box[0] + 4, int((top + bottom - label.height) / 2)))
    for series, line in zip(panel.series, points):
        pixels = [to_pixel(x, y) for x, y in line]
        color = series.color
        if len(pixels) > 1:
            _polyline(draw, pixels, color, series.dashed)
        if len(pixels) <= 40:  # markers, so that a single point shows
            for px, py in pixels:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=WHITE if series.dashed else color, outline=color)


def _legend_layout(entries: list[Series], width: int) -> list[tuple[int, int]]:
    """Top-left corner of each legend entry, wrapping into rows of at most `width` pixels."""
    small, corners = font(14), []
    x, y = 20, 0
    for series in entries:
        entry_width = 42 + int(small.getlength(series.label)) + 24
        if x + entry_width > width and x > 20:
            x, y = 20, y + 24
        corners.append((x, y))
        x += entry_width
    return corners


def _draw_legend(draw: ImageDraw.ImageDraw, entries: list[Series], corners: list[tuple[int, int]], top: int) -> None:
    for series, (x, y) in zip(entries, corners):
        line = [(x, top + y + 9), (x + 34, top + y + 9)]
        _polyline(draw, line, series.color, series.dashed)
        draw.text((x + 42, top + y + 9), series.label, fill=INK, font=font(14), anchor="lm")


def line_chart(panels: Sequence[Panel], path: str | None = None, columns: int = 2,
               panel_size: tuple[int, int] = (560, 380), title: str = "") -> Image.Image:
    """Draw line charts with Pillow, one per Panel, `columns` to a row, and save a PNG at `path`.

    Each Panel has a title, axis labels and Series (label, x, y, color, dashed); the axes fit the
    data with round ticks. One legend below all panels lists every distinct (label, colour, dash),
    so give a line that appears in several panels the same label. A series without a colour gets
    one per distinct label from PALETTE. Returns the image.

        line_chart([Panel("accuracy", "epoch", "%", [Series("test", [1, 2, 3], [40, 60, 70])])], "a.png")
    """
    labels = list(dict.fromkeys(s.label for panel in panels for s in panel.series))
    panels = [panel._replace(series=[s._replace(color=s.color or PALETTE[labels.index(s.label) % len(PALETTE)])
                                     for s in panel.series]) for panel in panels]
    legend = list(dict.fromkeys(Series(s.label, (), (), s.color, s.dashed) for p in panels for s in p.series))
    rows = math.ceil(len(panels) / columns)
    width, height = panel_size[0] * min(columns, len(panels)), panel_size[1] * rows
    title_height = 36 if title else 0
    corners = _legend_layout(legend, width)
    legend_height = (corners[-1][1] + 24 if corners else 0) + 12
    image = Image.new("RGB", (width, title_height + height + legend_height), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((width / 2, 10), title, fill=INK, font=font(18), anchor="mt")
    for i, panel in enumerate(panels):
        x, y = (i % columns) * panel_size[0], title_height + (i // columns) * panel_size[1]
        _draw_panel(image, (x, y, x + panel_size[0], y + panel_size[1]), panel)
    _draw_legend(draw, legend, corners, title_height + height + 4)
    if path:
        image.save(path)
    return image


def _shade(fraction: float) -> tuple[int, int, int]:
    """White (0) to PALETTE[0] blue (1)."""
    blue = (31, 119, 180)
    return tuple(round(255 - fraction * (255 - c)) for c in blue)


def confusion_image(confusion: torch.Tensor, class_names: Sequence[str], title: str = "") -> Image.Image:
    """The confusion matrix (rows: true class, columns: predicted) as an RGB image.

    Cells show counts, shaded by their share of the row; the right column is each class's accuracy.
    """
    counts = torch.as_tensor(confusion).long().cpu()
    classes = counts.shape[0]
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
    shares = (counts / rows).tolist()
    accuracies = per_class_accuracy(counts)
    text, small, cell = font(14), font(12), 38
    names = [f"{i} {name}" for i, name in enumerate(class_names)]
    left = int(max(text.getlength(name) for name in names)) + 40
    top = 76 if title else 40
    width, height = left + cell * (classes + 2) + 20, top + cell * classes + 40
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((width / 2, 8), title, fill=INK, font=font(16), anchor="mt")
    draw.text((left + cell * classes / 2, top - 26), "predicted", fill=INK, font=text, anchor="mb")
    draw.text((left + cell * (classes + 1), top - 26), "acc %", fill=INK, font=text, anchor="mb")
    for j in range(classes):
        draw.text((left + cell * (j + 0.5), top - 6), str(j), fill=INK, font=text, anchor="mb")
    for i in range(classes):
        y = top + cell * i
        draw.text((left - 8, y + cell / 2), names[i], fill=INK, font=text, anchor="rm")
        for j in range(classes):
            x = left + cell * j
            draw.rectangle([x, y, x + cell, y + cell], fill=_shade(shares[i][j]), outline=GRID)
            if counts[i, j]:
                draw.text((x + cell / 2, y + cell / 2), str(int(counts[i, j])), font=small, anchor="mm",
                          fill=WHITE if shares[i][j] > 0.5 else INK)
        accuracy = "-" if math.isnan(accuracies[i]) else f"{accuracies[i]:.1f}"
        draw.text((left + cell * (classes + 1), y + cell / 2), accuracy, fill=INK, font=small, anchor="mm")
    draw.text((12, height - 14), "rows: true class; shading: share of the row", fill=INK, font=small, anchor="lm")
    return image
