"""Every figure of the project, drawn with matplotlib: line charts (run_comparison.py, benchmark.py)
and confusion matrices (nntest.py, and TensorBoard through log_data.RunLogger).

Figures are built with matplotlib's object-oriented API on an Agg canvas (Figure + FigureCanvasAgg),
never through pyplot: nothing opens a window, nothing is kept in pyplot's global list of figures,
and a figure is freed as soon as its last reference goes. `save(figure, path)` writes a PNG;
`SummaryWriter.add_figure` takes the same Figure.

    save(line_chart([Panel("accuracy", "epoch", "top-1 (%)", [Series("test", [1, 2, 3], [40, 60, 70])])]),
         "accuracy.png")
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DPI = 110               # pixels per inch of PNG files and TensorBoard images
MARKERS_UP_TO = 40      # points per line up to which each point gets a marker (so a single point shows)
ANNOTATED_CLASSES = 20  # up to this many classes a confusion matrix shows counts and class names


class Series(NamedTuple):
    """One line through the points (x[i], y[i]); non-finite points are left out.

    With `low` and `high` (one value per point, e.g. the min and max over seeds) a band between
    them is shaded in the line's colour behind the line.
    """
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = ""  # empty: a palette colour per distinct label
    dashed: bool = False
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None


class Panel(NamedTuple):
    """One chart of a figure: its title, axis labels (with units) and lines."""
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    x_log: int = 0  # base of a logarithmic x axis (2, 10); 0: linear
    y_log: int = 0


def save(figure: Figure, path: str) -> None:
    """Write the figure as a PNG at `path` (OSError if it cannot be written)."""
    figure.savefig(path, dpi=DPI)


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of width x height inches on an Agg canvas (no window, no pyplot)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (8, 16, 32; 0.1, 1, 10), no minor labels."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _draw_series(axes, series: Series) -> None:
    x, y = np.asarray(series.x, dtype=float), np.asarray(series.y, dtype=float)
    kept = np.isfinite(x) & np.isfinite(y)
    if series.low is not None and series.high is not None:
        low, high = np.asarray(series.low, dtype=float), np.asarray(series.high, dtype=float)
        band = kept & np.isfinite(low) & np.isfinite(high)
        axes.fill_between(x[band], low[band], high[band], color=series.color, alpha=0.2, linewidth=0)
    marker = "o" if kept.sum() <= MARKERS_UP_TO else None
    axes.plot(x[kept], y[kept], color=series.color, linestyle="--" if series.dashed else "-", linewidth=1.8,
              marker=marker, markersize=4, markerfacecolor="white" if series.dashed else series.color)


def _draw_panel(axes, panel: Panel) -> None:
    for series in panel.series:
        _draw_series(axes, series)
    for base, set_scale, axis in ((panel.x_log, axes.set_xscale, axes.xaxis),
                                  (panel.y_log, axes.set_yscale, axes.yaxis)):
        if base:
            set_scale("log", base=base)
            _plain_log_ticks(axis)
    if not panel.x_log and all(float(x).is_integer() for s in panel.series for x in s.x):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no tick at 1.5
    axes.set_title(panel.title)
    axes.set_xlabel(panel.x_label)
    axes.set_ylabel(panel.y_label)
    axes.grid(True, which="major", color="#dddddd", linewidth=0.8)


def line_chart(panels: Sequence[Panel], path: str | None = None, columns: int = 2, title: str = "") -> Figure:
    """Line charts, one per Panel, `columns` to a row; saved as a PNG at `path` if given. Returns the figure.

    One legend below all panels lists every distinct (label, colour, dash), so give a line that
    appears in several panels the same label. A series without a colour gets one per distinct
    label from PALETTE.
    """
    labels = list(dict.fromkeys(s.label for panel in panels for s in panel.series))
    panels = [panel._replace(series=[s._replace(color=s.color or PALETTE[labels.index(s.label) % len(PALETTE)])
                                     for s in panel.series]) for panel in panels]
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    legend = list(dict.fromkeys((s.label, s.color, s.dashed) for panel in panels for s in panel.series))
    figure = new_figure(5.6 * columns, 3.9 * rows + 0.3 * math.ceil(len(legend) / 2))
    for axes, panel in zip(figure.subplots(rows, columns, squeeze=False).flat, panels):
        _draw_panel(axes, panel)
    for axes in figure.axes[len(panels):]:  # an odd panel count leaves one cell empty
        axes.set_visible(False)
    if title:
        figure.suptitle(title)
    if legend:
        handles = [Line2D([], [], color=color, linestyle="--" if dashed else "-", linewidth=1.8)
                   for _, color, dashed in legend]
        figure.legend(handles, [label for label, _, _ in legend], loc="outside lower center",
                      ncol=min(len(legend), 2 * columns), frameon=False)
    if path:
        save(figure, path)
    return figure


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix (rows: true class, columns: predicted), each cell shaded by its share of
    the row. Up to ANNOTATED_CLASSES classes the cells show counts and the rows name each class with
    its accuracy; above that (CIFAR-100) only the shading and class indices, which stay readable."""
    counts = torch.as_tensor(confusion).long().cpu().numpy()
    classes = counts.shape[0]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    annotated = classes <= ANNOTATED_CLASSES
    side = 2.5 + 0.45 * classes if annotated else 8.0  # inches of the matrix
    figure = new_figure(side + 2.6, side + 0.8)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's test images")
    if annotated:
        _annotate(axes, counts, shares, class_names)
    axes.set_xlabel("predicted class" if annotated else "predicted class (index)")
    axes.set_ylabel("true class (test top-1 %)" if annotated else "true class (index)")
    axes.set_title(title)
    return figure


def _annotate(axes, counts: np.ndarray, shares: np.ndarray, class_names: Sequence[str]) -> None:
    """Counts in the cells; class names on both axes, each row's name with its accuracy."""
    classes = counts.shape[0]
    for i in range(classes):
        for j in range(classes):
            if counts[i, j]:
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, in_layout=False,
                          color="white" if shares[i, j] > 0.5 else "#282828")  # inside the axes: no layout cost
    accuracies = [f"{100.0 * shares[i, i]:.1f}" if counts[i].any() else "-" for i in range(classes)]
    axes.set_xticks(range(classes), class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(classes), [f"{name} ({accuracy})" for name, accuracy in zip(class_names, accuracies)])


def position_table_figure(tables: dict[str, torch.Tensor], title: str = "", signed: bool = True) -> Figure:
    """One row per lambda layer, one panel per key dimension: each table [keys, rows, columns] as an
    image; signed tables get a "+" at the zero offset (their centre). ``signed``: a diverging map symmetric about 0 per
    row (relative tables, conv kernels); otherwise a sequential map from 0 (mean |E|)."""
    keys = max(table.shape[0] for table in tables.values())
    figure = new_figure(1.0 + 2.1 * keys, 0.9 + 2.1 * len(tables))
    grid = np.atleast_2d(figure.subplots(len(tables), keys, squeeze=False))
    for row, (name, table) in zip(grid, tables.items()):
        values = table.float().numpy()
        bound = max(float(np.abs(values).max()), 1e-12)
        style = dict(cmap="RdBu_r", vmin=-bound, vmax=bound) if signed else dict(cmap="viridis", vmin=0, vmax=bound)
        for k, axes in enumerate(row):
            axes.set_xticks([]), axes.set_yticks([])
            if k >= len(values):
                axes.set_axis_off()
                continue
            image = axes.imshow(values[k], interpolation="nearest", **style)
            if signed:  # the zero offset (the query's own position) at the centre
                rows, columns = values[k].shape
                axes.plot((columns - 1) / 2, (rows - 1) / 2, "+", color="black", markersize=7)
            axes.set_title(f"{name}, k = {k}", fontsize=9)
        figure.colorbar(image, ax=list(row), shrink=0.8)
    figure.suptitle(title, fontsize=10)
    return figure
