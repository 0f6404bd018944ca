"""Compare training runs side by side: `python compare_runs.py [RUN_DIR ...] [--out DIR]`.

Reads each run's metrics.jsonl and config.json and writes OUT/comparison.png (test and train accuracy
and loss against epoch and against wall-clock time, like the reproduction's Figures 8 and 9) and
OUT/comparison.md, which it also prints: one row per run (model, parameters, test accuracy, total
time, mean training images/s); one row per group of runs that differ only in their seed (mean +- std);
and the difference of the means of groups with a Welch t interval.

Without RUN_DIRs: the newest run of each model under RUNS_DIR. Runs of different lengths, and runs
still in progress, are fine. What the tables and the plot show, and how: run_comparison.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import checkpoints
import user_input
from run_comparison import BANDS, Run, group_runs, plot, report

PROG = "compare_runs.py"


def newest_runs(runs_dir: str) -> list[str]:
    """The most recently written run directory of each model under runs_dir."""
    found = [folder for model in user_input.CHOICES["model"]
             if (folder := checkpoints.newest_run_folder(runs_dir, model, "metrics.jsonl")) is not None]
    if not found:
        raise user_input.ConfigError(f"no runs found under {runs_dir} (no {runs_dir}/<Model>/<run>/metrics.jsonl); "
                                     f"pass run directories or --runs-dir")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = user_input._OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run directories (runs/<Model>/<run name>); none: the newest run of each model")
    parser.add_argument("--runs-dir", default=user_input.RUNS_DIR,
                        help=f"where to look for the newest runs (default: {user_input.RUNS_DIR})")
    parser.add_argument("--band", default="minmax", choices=tuple(BANDS),
                        help="shaded band around each group's mean test curve: minmax (over the runs) or "
                        "std (mean ± 1 sample standard deviation); default: minmax")
    parser.add_argument("--out", default="comparison", help="folder for comparison.png and comparison.md "
                        "(default: comparison)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [Run(run_dir) for run_dir in args.run_dirs or newest_runs(args.runs_dir)]
        groups = group_runs(runs)
        markdown = report(runs, groups)
        png, md = os.path.join(args.out, "comparison.png"), os.path.join(args.out, "comparison.md")
        try:
            os.makedirs(args.out, exist_ok=True)
            plot(groups, png, args.band)
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
