"""benchmarks/layer_versions.py and benchmarks/profile_step.py run, say what they measured, and refuse
bad input in one line (what is in their tables, never the speeds)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

from benchmarks import models, suite

SCRIPTS = os.path.join(ROOT, "benchmarks")


def run_script(name: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_layer_versions_times_both_layers_beside_the_baseline():
    """--commit HEAD: every clone has it. A row per model and layer version, ratios to the baseline."""
    result = run_script("layer_versions.py", "--commit", "HEAD", "--positions", "conv", "--batch-size", "2",
                        "--rounds", "1", "--num-threads", "1")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| model (lambda_layer.py)", "| baseline", "| conv (this tree)",
                                                      "| conv (HEAD)"]
    assert rows[1].endswith("| 1.00x |")


@pytest.mark.parametrize("args, named", [(["--commit", "no-such-commit"], "no-such-commit"),
                                         (["--commit", "HEAD", "--positions", "foo"], "foo"),
                                         (["--commit", "HEAD", "--device", "tpu"], "tpu")],
                         ids=["commit", "position", "device"])
def test_layer_versions_refuses_bad_input_in_one_line(args, named):
    result = run_script("layer_versions.py", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr


@pytest.mark.parametrize("args", [["--positions", "foo"], ["--device", "tpu"]], ids=["position", "device"])
def test_profile_step_refuses_bad_settings_in_one_line(args, tmp_path):
    out = tmp_path / "profile.md"
    result = run_script("profile_step.py", *args, "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("profile_step.py: error:")
    assert not out.exists()


def test_profile_step_writes_a_table_per_model(tmp_path):
    out = tmp_path / "profile.md"
    result = run_script("profile_step.py", "--device", "cpu", "--positions", "relative", "--batch-size", "2",
                        "--steps", "1", "--top", "3", "--num-threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.count("\n## ") == 2 and "## baseline" in text and "## lambda relative" in text
    assert text.count("| `aten::") >= 4  # the top ops of both models by self time


@pytest.mark.parametrize("stem, positions", [("imagenet", ["absolute", "relative", "conv"]),
                                             ("cifar", ["relative", "conv"])])
def test_model_variants_skip_what_the_stem_refuses(stem, positions, capsys):
    """Absolute embeddings of the CIFAR stem's 32x32 maps are refused: the benchmark says so and skips them."""
    args = suite.build_parser().parse_args(["--device", "cpu", "--stem", stem])
    suite.resolve_args(args)
    variants = models.model_variants(args)
    assert variants[0] == {"model": "baseline"}
    assert [v["lambda_position"] for v in variants[1:]] == positions
    assert ("lambda absolute skipped" in capsys.readouterr().out) == (stem == "cifar")
