"""Speed and memory, measured: `python benchmark.py --device cpu --out DIR` (`--quick`: about a minute).

Four parts, each a module of benchmarks/, timed after warm-up steps (medians of the timed steps):
- models.py: training and inference throughput and peak training memory of the baseline ResNet-50
  and the lambda ResNet-50 in each LAMBDA_POSITION mode, at 32x32 with the run's AMP, channels_last
  and compile settings;
- mixers.py: each 3x3 conv of the baseline and each lambda layer that replaces it, at the network's
  widths, maps and strides; the network's totals against the identity-mixer floor; kernel counts;
- layers.py: one lambda layer against self-attention (materialised and SDPA) and, when installed,
  timm's and lucidrains' lambda layers, on 8x8 ... 64x64 maps; "OOM" when a case does not fit;
- epochs.py: the first steps and a whole epoch of main_general.py's own loop, projected to 90 epochs.

measuring.py says how time, peak memory (on any device) and kernels are measured; suite.py runs the
parts in order and rewrites DIR/benchmark.json and benchmark.md (report.py) after each, then draws
DIR/benchmark.png (time and memory against map size).
"""
import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
