"""The comparison of training runs that compare_runs.py writes: each run read back from its folder
(Run), runs grouped by the settings that decide their result (Group, group_runs, pairs), each
group's curves over its seeds, the plot, and the markdown tables of runs, groups and their
differences.

The accuracies, in the order they are trusted: the final epoch's test top-1 (the primary figure);
the test top-1 at the epoch of the best validation accuracy (runs with VAL_SIZE); the best test top-1
over the epochs, selected on the test set itself and so optimistic (labelled so).
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import model_preparation as prep
import user_input
from figures import PALETTE, Panel, Series, line_chart
from log_data import read_metrics, run_stats
from seed_statistics import CONFIDENCE, mean_std, welch_interval

REQUIRED_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "train_img_per_s")
# settings that do not change a run's result (only its speed, or where its files go): runs that
# differ only in these and SEED are one group
NOT_GROUPED = ("seed", "run_name", "resume", "runs_dir", "checkpoint_dir", "checkpoint_every", "device",
               "num_workers", "gpu_loader", "channels_last", "cudnn_benchmark", "compile", "num_threads")


class Run:
    """One run directory: its label, settings and per-epoch records."""

    def __init__(self, run_dir: str):
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isfile(metrics):
            raise user_input.ConfigError(f"{run_dir} has no metrics.jsonl; pass run directories such as "
                                         f"runs/Lambda/<run name>")
        try:
            self.records = read_metrics(metrics)
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                self.config = {**user_input.defaults(), **json.load(f)}
        except OSError as error:
            raise user_input.ConfigError(f"{run_dir}: cannot read {error.filename} ({error.strerror})") from None
        except ValueError as error:
            raise user_input.ConfigError(f"{run_dir}: metrics.jsonl or config.json is not valid JSON "
                                         f"({error})") from None
        missing = [key for key in REQUIRED_KEYS for record in self.records if key not in record]
        if missing:
            raise user_input.ConfigError(f"{metrics} lacks {missing[0]!r} in some records; is it a metrics.jsonl "
                                         f"of main_general.py?")
        path = os.path.normpath(os.path.abspath(run_dir))
        self.label = f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"  # Model/run name
        self._parameters: str | None = None

    def parameters(self) -> str:
        """Parameter count of the network the run's settings describe (counted once), "?" when its
        class count cannot be known (DATASET=folder, with the folder gone)."""
        if self._parameters is None:
            try:
                self._parameters = f"{prep.count_parameters(prep.build_model(self.config)):,}"
            except user_input.ConfigError:
                self._parameters = "?"
        return self._parameters

    def settings(self) -> dict:
        """The settings that decide the run's result: all but NOT_GROUPED and the model settings
        that do not shape its network (a baseline's lambda settings)."""
        unused = set(prep.MODEL_KEYS) - set(prep.shaping_keys(self.config))
        if self.config["dataset"] != "folder":  # where CIFAR is stored; a folder's DATA_DIR is its data
            unused.add("data_dir")
        return {key: value for key, value in self.config.items() if key not in NOT_GROUPED and key not in unused}

    def elapsed_s(self) -> list[float]:
        """Wall-clock seconds (training + evaluation) at the end of each epoch."""
        total, times = 0.0, []
        for record in self.records:
            total += record["epoch_time_s"] + record.get("test_time_s", 0.0)
            times.append(total)
        return times


class Group:
    """Runs whose settings differ only in SEED (and in NOT_GROUPED): one configuration, several seeds."""

    def __init__(self, runs: list[Run]):
        self.runs, self.label = runs, runs[0].config["model"]
        self.settings = runs[0].settings()
        self.done = [run for run in runs if run.records]  # runs with at least one finished epoch

    def accuracies(self, which: str) -> list[float]:
        """Each finished run's test top-1 (%): "final", "at_best_val" (runs with a validation split
        only) or "best" (selected on the test set)."""
        return [value for run in self.done if (value := test_accuracy(run.records, which)) is not None]


def test_accuracy(records: list[dict], which: str) -> float | None:
    """The test top-1 of a run's records (at least one) that `which` names (Group.accuracies); None
    for "at_best_val" without a validation split."""
    if which == "final":
        return records[-1]["test_acc"]
    stats = run_stats(records)
    if which == "best":
        return stats["best"]["test_acc"]
    return None if stats["best_val"] is None else stats["best_val"]["test_acc"]


ACCURACIES = {"final": "final test top-1", "at_best_val": "test top-1 at best val",
              "best": "best test top-1 (selected on test)"}


class Curve(NamedTuple):
    """One metric of a group per epoch, over the runs that reached the epoch."""
    epochs: list[int]
    elapsed_s: list[float]  # mean wall-clock seconds at the end of the epoch
    mean: list[float]
    low: list[float]   # band: min over the runs, or mean - std
    high: list[float]  # band: max over the runs, or mean + std (mean alone for a single run)


def curve(group: Group, key: str, band: str = "minmax") -> Curve:
    """Mean of metrics key `key` per epoch over the group's runs, with a band: "minmax" or "std"."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for run in group.done:
        for record, elapsed in zip(run.records, run.elapsed_s()):
            by_epoch.setdefault(record["epoch"], []).append((record[key], elapsed))
    found = Curve([], [], [], [], [])
    for epoch in sorted(by_epoch):
        values = [value for value, _ in by_epoch[epoch]]
        mean, std = mean_std(values)
        low, high = (min(values), max(values)) if band == "minmax" else (mean - (std or 0.0), mean + (std or 0.0))
        for column, value in zip(found, (epoch, sum(e for _, e in by_epoch[epoch]) / len(values), mean, low, high)):
            column.append(value)
    return found


def _comparable(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)  # tuples and lists (ADAM_BETAS) alike


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by their settings, in order of first appearance; each group labelled by its
    model and by the settings in which the groups differ."""
    found: dict[str, list[Run]] = {}
    for run in runs:
        found.setdefault(_comparable(run.settings()), []).append(run)
    groups = [Group(members) for members in found.values()]
    differing = [key for key in differing_settings(groups) if key != "model"]
    for group in groups:
        group.label = " ".join([group.label] + [f"{key}={_show(group.settings[key])}" for key in differing
                                                if key in group.settings])
    return groups


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def differing_settings(groups: list[Group]) -> list[str]:
    """Settings that two of the groups both have, with different values."""
    keys = dict.fromkeys(key for group in groups for key in group.settings)
    return [key for key in keys
            if len({_comparable(group.settings.get(key)) for group in groups if key in group.settings}) > 1]


def pairs(groups: list[Group]) -> list[tuple[Group, Group]]:
    """Groups that differ in exactly one setting (baseline against lambda at equal settings, one
    depth against another, ...); if no two do, every group against the first."""
    found = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:] if len(differing_settings([a, b])) == 1]
    return found or [(groups[0], group) for group in groups[1:]]


def time_unit(seconds: float) -> tuple[str, float]:
    """A readable unit for a time axis that ends at `seconds`: (name, seconds per unit)."""
    if seconds < 180:
        return "s", 1.0
    if seconds < 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


BANDS = {"minmax": "min-max", "std": "mean ± 1 std"}  # --band: what the shaded band around a group's mean shows


def plot(groups: list[Group], path: str, band: str = "minmax"):
    """Each group's mean accuracy and loss over its runs, test (solid, with a shaded band over the
    runs) and train (dashed), against epoch and against time."""
    curves = {(id(group), key): curve(group, key, band) for group in groups
              for key in ("test_acc", "train_acc", "test_loss", "train_loss")}
    unit, scale = time_unit(max((c.elapsed_s[-1] for c in curves.values() if c.epochs), default=0.0))
    panels = []
    for x_name in ("epoch", "time"):
        for metric, y_label in (("acc", "top-1 accuracy (%)"), ("loss", "loss (label-smoothed CE)")):
            series = []
            for i, group in enumerate(groups):
                label = f"{group.label} ({len(group.done)} run{'s' if len(group.done) != 1 else ''})"
                for split in ("test", "train"):
                    c = curves[id(group), f"{split}_{metric}"]
                    xs = c.epochs if x_name == "epoch" else [t / scale for t in c.elapsed_s]
                    shaded = dict(low=c.low, high=c.high) if split == "test" else {}
                    series.append(Series(f"{label} {split}", xs, c.mean, PALETTE[i % len(PALETTE)], split == "train",
                                         **shaded))
            x_label = "epoch" if x_name == "epoch" else f"mean wall-clock time, training + evaluation ({unit})"
            title = f"{'Accuracy' if metric == 'acc' else 'Loss'} vs {x_name}"
            panels.append(Panel(title, x_label, y_label, series))
    return line_chart(panels, path, columns=2, title=f"mean over each group's runs (seeds); solid: test, dashed: train; "
                                              f"shaded: {BANDS[band]} of test over the runs")


def format_time(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} m {seconds:02d} s" if hours else f"{minutes} m {seconds:02d} s"


def table(runs: list[Run]) -> str:
    """The markdown table of the runs, one row each."""
    lines = ["| run | model | parameters | epochs | final test top-1 | test top-1 at best val (epoch) "
             "| best test top-1 (selected on test; epoch) | total time | mean train img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        epochs = f"{len(run.records)}/{run.config['epochs']}"  # done / planned
        row = f"| {run.label} | {run.config['model']} | {run.parameters()} | {epochs} "
        if not run.records:  # started, no epoch finished yet
            lines.append(row + "| - | - | - | - | - |")
            continue
        stats = run_stats(run.records)
        best, chosen = stats["best"], stats["best_val"]
        at_val = "-" if chosen is None else f"{chosen['test_acc']:.2f} ({chosen['epoch']})"
        lines.append(row + f"| {run.records[-1]['test_acc']:.2f} | {at_val} | {best['test_acc']:.2f} ({best['epoch']}) "
                     f"| {format_time(stats['train_time_s'] + stats['test_time_s'])} "
                     f"| {stats['train_img_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def mean_cell(values: list[float]) -> str:
    """"mean ± std" of the runs' values, or what is missing for it."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} (1 run: no std)" if std is None else f"{mean:.2f} ± {std:.2f}"


def group_table(groups: list[Group]) -> str:
    """One row per group: runs and seeds, mean ± std (n - 1) of each test top-1 figure, mean time and speed."""
    lines = ["| group | runs | seeds | parameters | epochs | " + " | ".join(ACCURACIES.values())
             + " | mean total time | mean train img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        runs = f"{len(group.done)}" + (f" (+{len(group.runs) - len(group.done)} without an epoch)"
                                       if len(group.done) < len(group.runs) else "")
        seeds = ", ".join(str(run.config["seed"]) for run in group.runs)
        done = sorted({len(run.records) for run in group.runs})
        epochs = f"{done[0]}" + (f"-{done[-1]}" if len(done) > 1 else "") + f"/{group.runs[0].config['epochs']}"
        stats = [run_stats(run.records) for run in group.done]
        times = [s["train_time_s"] + s["test_time_s"] for s in stats]
        speed = [s["train_img_per_s"] for s in stats]
        time_cell = format_time(sum(times) / len(times)) if times else "-"
        speed_cell = f"{sum(speed) / len(speed):.0f}" if speed else "-"
        lines.append(f"| {group.label} | {runs} | {seeds} | {group.runs[0].parameters()} | {epochs} "
                     f"| {' | '.join(mean_cell(group.accuracies(which)) for which in ACCURACIES)} "
                     f"| {time_cell} | {speed_cell} |")
    return "\n".join(lines) + "\n"


def difference_cell(a: list[float], b: list[float], names: tuple[str, str]) -> str:
    """mean(b) - mean(a) with its Welch interval, and what it says."""
    if not a or not b:
        return "-"
    difference = welch_interval(a, b)
    cell = f"{difference.delta:+.2f}"
    if difference.low is None:
        return cell + f": too few runs to tell (n = {len(b)} vs {len(a)}; need 2 or more seeds in each group)"
    cell += f" [{difference.low:+.2f}, {difference.high:+.2f}]"
    if difference.df is not None:
        cell += f" (df {difference.df:.1f})"
    if difference.low > 0 or difference.high < 0:
        return cell + f": {names[1] if difference.low > 0 else names[0]} higher"
    return cell + ": no clear difference (the interval contains 0)"


def difference_table(groups: list[Group]) -> str:
    """Pairs of groups: the difference of their mean final test top-1 (and of the test top-1 at the
    best validation epoch) with a Welch t interval; never of the best test top-1, which the test set chose."""
    if len(groups) < 2:
        return ""
    level = f"{100 * CONFIDENCE:.0f} %"
    lines = [f"| comparison | differs in | runs | Δ final test top-1 [{level} interval] "
             f"| Δ test top-1 at best val [{level} interval] |", "|---|---|---|---|---|"]
    for a, b in pairs(groups):
        names = (a.label, b.label)
        differs = ", ".join(key.upper() for key in differing_settings([a, b]))
        cells = [difference_cell(a.accuracies(which), b.accuracies(which), names) for which in ("final", "at_best_val")]
        lines.append(f"| {b.label} − {a.label} | {differs} | {len(b.done)} vs {len(a.done)} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Δ: mean of the first group named minus the second, in points of test top-1; the {level} "
              f"interval is Welch's t interval over the runs' seeds (unequal variances, Welch-Satterthwaite df)."]
    return "\n".join(lines) + "\n"


def report(runs: list[Run], groups: list[Group]) -> str:
    """The markdown of comparison.md: the runs, their seed groups and the differences of the groups."""
    parts = ["## Runs\n", table(runs), "## Groups: runs that differ only in their seed\n",
             "mean ± sample standard deviation over the group's runs\n", group_table(groups)]
    if len(groups) > 1:
        parts += ["## Differences\n", difference_table(groups)]
    return "\n".join(parts)
