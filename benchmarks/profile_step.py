"""Where a training step's time goes: torch.profiler over eager steps of each model, one table each.

    python benchmarks/profile_step.py --device cuda --out benchmarks/results/<gpu>/profile.md

For each model (baseline, lambda per --positions): the step's wall time (median of --steps), the
kernels it launches and their summed device time (on a CPU: the aten ops and their summed self
time), so that wall time well above device time says the step waits on launches rather than on
the GPU's work; then the --top ops by self device time, with the share of the step each takes.
The model and step are benchmark.py's (32x32 images, ImageNet stem, AMP and channels_last auto).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speed  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.measuring import timed  # noqa: E402
from user_input import ConfigError  # noqa: E402


def self_time_us(event, on_device: bool) -> float:
    if not on_device:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def profile_model(name: str, step, args, device: torch.device) -> list[str]:
    on_device = device.type == "cuda"
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        walls = [timed(step, device)[1] for _ in range(args.steps)]
    if on_device:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels)
    else:  # the aten ops below autograd, as benchmarks/measuring.py's KernelCount counts them
        kernels = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        busy_us = sum(e.self_cpu_time_total for e in prof.events() if e.name.startswith("aten::"))
    wall_ms = 1000 * statistics.median(walls)
    busy_ms = busy_us / 1000 / args.steps
    what = "kernels" if on_device else "top-level aten ops"
    lines = [f"## {name}", "",
             f"Step {wall_ms:.2f} ms (median wall time, {args.steps} profiled steps; the profiler adds overhead), "
             f"{len(kernels) / args.steps:.0f} {what} per step, {busy_ms:.2f} ms of "
             f"{'device' if on_device else 'aten self'} time per step ({busy_ms / wall_ms:.0%} of the wall time).", "",
             "| op | calls per step | self ms per step | share of step |", "|---|---|---|---|"]
    rows = sorted(prof.key_averages(), key=lambda e: self_time_us(e, on_device), reverse=True)[:args.top]
    for event in rows:
        ms = self_time_us(event, on_device) / 1000 / args.steps
        lines.append(f"| `{event.key[:80]}` | {event.count / args.steps:.0f} | {ms:.3f} | {ms / wall_ms:.1%} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--positions", default="absolute,relative,conv", help="lambda modes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed per model")
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    args.channels_last, args.compile, args.amp, args.depth, args.stem = "auto", False, "auto", 50, "imagenet"
    variants = {"baseline": {"model": "baseline"}}
    variants.update({f"lambda {mode}": {"model": "lambda", "lambda_position": mode} for mode in args.positions.split(",")})
    try:
        for variant in variants.values():  # refuse bad settings (the device's name too) before any work
            models.model_config(variant, args)
        device = speed.select_device(args.device)
    except ConfigError as error:
        print(f"profile_step.py: error: {error}", file=sys.stderr)
        return 2
    amp = speed.resolve_amp(args.amp, device)
    speed.configure_backends({"num_threads": args.num_threads, "cudnn_benchmark": True}, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Training step profile on {name}", "",
             f"`python benchmarks/profile_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"ResNet-50, 32x32, batch {args.batch_size}, AMP {amp}, eager (no CUDA graph), torch {torch.__version__}.", ""]
    for label, variant in variants.items():
        step = models.model_steps(variant, args, device).train_step  # as a run trains
        section = profile_model(label, step, args, device)
        print("\n".join(section), flush=True)
        lines += section
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
