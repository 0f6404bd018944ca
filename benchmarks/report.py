"""benchmark.json and benchmark.md: the machine, the settings, each part's table and the targets."""
from __future__ import annotations

import json
import os
import platform

import torch

from benchmarks.epochs import epochs_markdown
from benchmarks.layers import layer_targets, layers_markdown
from benchmarks.mixers import mixers_markdown
from benchmarks.models import models_markdown, speed_targets
from speed import available_cpus


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_name()}, {available_cpus()} cores")
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def markdown(report: dict) -> str:
    """The header, the models and layers tables and the targets (the mixers and epochs tables follow)."""
    s, machine = report["settings"], report["machine"]
    lines = [f"# benchmark.py on {machine['device_name']}", "", f"`{report['command']}`", "",
             f"torch {machine['torch']}, {machine['threads']} CPU threads, "
             f"AMP {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}; "
             f"{s['warmup']} warm-up + {s['iters']} timed steps (median); quick {s['quick']}; "
             f"1-minute load average at the start {machine['load_average_1min_at_start']}.", "",
             f"Peak memory: {report['memory_method']}.", ""]
    if not report.get("finished", True):
        lines += ["**Unfinished**: the run is still going or was stopped; the tables hold the parts it finished.", ""]
    lines += models_markdown(report["models"], s) + layers_markdown(report["layers"], s)
    lines += ["", f"timm: {report['timm']}; {report['lucidrains']}.", "", "## Targets", "",
              "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        extra = (f" (Table 2 ratio at batch 128: {t['analytic_table2_ratio_at_batch_128']:.1f})"
                 if "analytic_table2_ratio_at_batch_128" in t else "")
        lines.append(f"| {name}: {t['note']}{extra} | {value} | >= {t['target']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, args, out: str) -> str:
    """benchmark.json and benchmark.md of what is measured so far (after each part, so that a run cut
    short by a timeout keeps its finished parts; "finished" is False until the last part)."""
    report["targets"] = {**speed_targets(report["models"], args), **layer_targets(report["layers"], args)}
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report) + mixers_markdown(report["mixers"]) + epochs_markdown(report["epochs"])
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(table)
    return table
