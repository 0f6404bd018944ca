"""Compare training runs side by side: `python compare_runs.py [RUN_DIR ...] [--out DIR]`.

Reads each run's metrics.jsonl and config.json and writes OUT/comparison.png (test and train accuracy
and loss against epoch and against wall-clock time, like the reproduction's Figures 8 and 9) and
OUT/comparison.md (model, parameters, best and final test accuracy, epoch of best, total time, mean
training images/s), which it also prints. Without RUN_DIRs: the newest run of each model under
RUNS_DIR. Runs of different lengths, and runs still in progress, are fine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import checkpoints
import model_preparation as prep
import user_input
from figures import PALETTE, Panel, Series, line_chart
from log_data import read_metrics, run_stats

PROG = "compare_runs.py"
REQUIRED_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "train_img_per_s")


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

    def parameters(self) -> int:
        """Parameter count of the network the run's settings describe."""
        return prep.count_parameters(prep.build_model(self.config))

    def elapsed_s(self) -> list[float]:
        """Wall-clock seconds (training + evaluation) at the end of each epoch."""
        total, times = 0.0, []
        for record in self.records:
            total += record["epoch_time_s"] + record.get("test_time_s", 0.0)
            times.append(total)
        return times


def newest_runs(runs_dir: str) -> list[str]:
    """The most recently written run directory of each model under runs_dir."""
    found = [folder for model in user_input.CHOICES["model"]
             if (folder := checkpoints.newest_run_folder(runs_dir, model, "metrics.jsonl")) is not None]
    if not found:
        raise user_input.ConfigError(f"no runs found under {runs_dir} (no {runs_dir}/<Model>/<run>/metrics.jsonl); "
                                     f"pass run directories or --runs-dir")
    return found


def time_unit(seconds: float) -> tuple[str, float]:
    """A readable unit for a time axis that ends at `seconds`: (name, seconds per unit)."""
    if seconds < 180:
        return "s", 1.0
    if seconds < 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def plot(runs: list[Run], path: str) -> None:
    """Accuracy and loss, test (solid) and train (dashed), against epoch and against time."""
    unit, scale = time_unit(max((run.elapsed_s()[-1] for run in runs if run.records), default=0.0))
    panels = []
    for x_name in ("epoch", "time"):
        for metric, y_label in (("acc", "top-1 accuracy (%)"), ("loss", "loss (label-smoothed CE)")):
            series = []
            for i, run in enumerate(runs):
                xs = ([r["epoch"] for r in run.records] if x_name == "epoch"
                      else [t / scale for t in run.elapsed_s()])
                for split in ("test", "train"):
                    ys = [r[f"{split}_{metric}"] for r in run.records]
                    series.append(Series(f"{run.label} {split}", xs, ys, PALETTE[i % len(PALETTE)], split == "train"))
            x_label = "epoch" if x_name == "epoch" else f"wall-clock time, training + evaluation ({unit})"
            title = f"{'Accuracy' if metric == 'acc' else 'Loss'} vs {x_name}"
            panels.append(Panel(title, x_label, y_label, series))
    line_chart(panels, path, columns=2, title="solid: test, dashed: train")


def format_time(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} m {seconds:02d} s" if hours else f"{minutes} m {seconds:02d} s"


def table(runs: list[Run]) -> str:
    """The markdown table of the runs, one row each."""
    lines = ["| run | model | parameters | epochs | best test top-1 | epoch of best | final test top-1 "
             "| total time | mean train img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        epochs = f"{len(run.records)}/{run.config['epochs']}"  # done / planned
        row = f"| {run.label} | {run.config['model']} | {run.parameters():,} | {epochs} "
        if not run.records:  # started, no epoch finished yet
            lines.append(row + "| - | - | - | - | - |")
            continue
        stats = run_stats(run.records)
        best = stats["best"]
        lines.append(row + f"| {best['test_acc']:.2f} | {best['epoch']} | {run.records[-1]['test_acc']:.2f} "
                     f"| {format_time(stats['train_time_s'] + stats['test_time_s'])} "
                     f"| {stats['train_img_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = user_input._OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run directories (runs/<Model>/<run name>); none: the newest run of each model")
    parser.add_argument("--runs-dir", default=user_input.RUNS_DIR,
                        help=f"where to look for the newest runs (default: {user_input.RUNS_DIR})")
    parser.add_argument("--out", default="comparison", help="folder for comparison.png and comparison.md "
                        "(default: comparison)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [Run(run_dir) for run_dir in args.run_dirs or newest_runs(args.runs_dir)]
        markdown = table(runs)
        png, md = os.path.join(args.out, "comparison.png"), os.path.join(args.out, "comparison.md")
        try:
            os.makedirs(args.out, exist_ok=True)
            plot(runs, png)
            with open(md, "w", encoding="utf-8") as f:
                f.write(markdown)
        except OSError as error:
            raise user_input.ConfigError(f"cannot write to {args.out} ({error.strerror}); "
                                         f"choose another --out") from None
    except user_input.ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
