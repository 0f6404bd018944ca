"""benchmark.py --quick writes its JSON, markdown table and PNG plot (what is in them, never the speeds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from PIL import Image

from conftest import ROOT

from benchmarks import epochs, measuring, models, suite
from lambda_layer import POSITIONS


def test_a_run_cut_short_keeps_the_parts_it_finished(tmp_path, monkeypatch):
    """The JSON and markdown are written after each part: a run stopped in the layer table (a
    timeout's SIGINT) leaves the models' rows on disk, marked unfinished."""
    def model_row(variant, args, device, build=None):
        return {"model": variant["model"], "position": variant.get("lambda_position", "-"), "params": 1, "batch": 2, "train_img_s": 10.0,
                "infer_img_s": 20.0, "train_step_ms": 5.0, "train_peak_mb": 1.0}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(suite, "benchmark_model", model_row)
    monkeypatch.setattr(suite, "benchmark_mixers", lambda *args: None)
    monkeypatch.setattr(suite, "benchmark_layer", interrupted)
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--skip-epochs", "--num-threads", "1"]
    with pytest.raises(KeyboardInterrupt):
        suite.run(suite.build_parser().parse_args(argv), argv)
    with open(tmp_path / "benchmark.json") as f:
        report = json.load(f)
    assert report["finished"] is False and report["layers"] == []
    assert [m["position"] for m in report["models"]] == ["-", *POSITIONS]
    assert "train_speedup_lambda_absolute" in report["targets"]
    with open(tmp_path / "benchmark.md") as f:
        table = f.read()
    assert "Unfinished" in table and "| baseline | - |" in table


def test_quick_benchmark_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "tmp"
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--quick", "--device", "cpu", "--out", str(out),
               "--iters", "1", "--warmup", "0", "--sizes", "4,8", "--batch-size", "2", "--num-threads", "1",
               "--skip-epochs"]  # the epochs table: test_epochs_table_runs_the_training_loop
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    with open(out / "benchmark.json") as f:
        report = json.load(f)
    models = {(m["model"], m["position"]) for m in report["models"]}
    assert ("baseline", "-") in models
    assert {("lambda", mode) for mode in POSITIONS} <= models
    for m in report["models"]:
        assert m["train_img_s"] > 0 and m["infer_img_s"] > 0 and m["train_peak_mb"] > 0
    assert m["params"] > 1_000_000
    layers = {(r["layer"], r["size"]): r for r in report["layers"]}
    for size in (4, 8):
        for name in ("attention (materialised)", "attention (SDPA)", *(f"lambda ({mode})" for mode in POSITIONS)):
            row = layers[(name, size)]
            assert row["status"] == "ok", row  # 8x8 maps never run out of memory
            assert row["time_ms"] > 0 and row["peak_mb"] > 0
    # the materialised maps are b h n m floats: at 8x8, 4 heads, batch 1, 64 KiB of the peak
    assert layers[("attention (materialised)", 8)]["table2_mb"] == 4 * 4 * 64 * 64 / 2 ** 20
    assert report["timm"].startswith("timm")
    assert "TorchDispatchMode" in report["memory_method"]
    assert "train_speedup_lambda_absolute" in report["targets"] and report["finished"] is True
    mixers = report["mixers"]
    # c2 8x8 (3 blocks), c3 8x8 stride 2 + 4x4, c4 4x4 stride 2 + 2x2, c5 2x2 stride 2 + 1x1
    assert [(r["width"], r["size"], r["stride"], r["blocks"]) for r in mixers["rows"]] == [
        (64, 8, 1, 3), (128, 8, 2, 1), (128, 4, 1, 3), (256, 4, 2, 1), (256, 2, 1, 5), (512, 2, 2, 1), (512, 1, 1, 2)]
    for row in mixers["rows"]:
        assert row["conv_kernels"] == 2 and row["conv_ms"] > 0  # a convolution and its backward
        assert all(row[f"lambda_{mode}_ms"] > 0 and 2 < row[f"lambda_{mode}_kernels"] <= 31 for mode in POSITIONS)
    steps = mixers["kernels_per_step"]
    assert steps["floor"] < steps["conv"] < min(steps[f"lambda_{mode}"] for mode in POSITIONS)
    assert mixers["totals"]["bound_baseline_over_floor"] > 0
    with open(out / "benchmark.md") as f:
        table = f.read()
    assert "## Mixers" in table and "| identity-mixer floor |" in table
    assert "| baseline | - |" in table and "| 8x8 | attention (SDPA) |" in table
    assert table.strip() in result.stdout and "Unfinished" not in table
    with Image.open(out / "benchmark.png") as image:
        assert image.size[0] > image.size[1] > 300  # two panels side by side, legend below
        assert len(image.convert("RGB").getcolors(maxcolors=2 ** 20)) > 5  # lines and legend drawn, not a blank canvas


def test_peak_memory_counts_live_tensors():
    import torch

    with measuring.PeakMemory() as tracker:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2                  # 2 MiB live
        del a                      # 1 MiB live
        c = b + 1                  # 2 MiB live again
    assert tracker.peak == 2 * 2 ** 20 and tracker.live == 2 * 2 ** 20
    del b, c
    assert tracker.live == 0


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert suite.main(["--device", "cpu", "--sizes", "8,x", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert suite.main(["--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


def test_epochs_table_runs_the_training_loop(monkeypatch):
    import torch

    import nntrain

    args = suite.build_parser().parse_args(["--device", "cpu", "--batch-size", "2", "--epoch-train-size", "8",
                                                "--epoch-test-size", "4", "--epoch-compile", "off,graph"])
    suite.resolve_args(args)
    calls = []
    train = nntrain.train
    monkeypatch.setattr(nntrain, "train", lambda *a, **k: calls.append(a[3:5]) or train(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = epochs.run_epochs(args, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert [(r["model"], r["lambda_position"]) for r in records[:4]] == [("baseline", "-")] + [
        ("lambda", mode) for mode in POSITIONS]
    assert [r["compile_setting"] for r in records] == ["off"] * 4 + ["graph"] * 4
    assert all(r["compile"] == "off" for r in records)  # no CUDA graph on the CPU
    assert calls == [(0, 4), (1, 0)] * 8  # (epoch, max_batches): the first steps, then a whole epoch
    for r in records:
        assert r["first_step_s"] > 0 and r["train_img_per_s"] > 0 and r["test_img_per_s"] > 0
        assert r["test_images"] == 4 and r["train_images"] == 8
        assert r["epoch_s"] == pytest.approx(8 / r["train_img_per_s"] + 4 / r["test_img_per_s"], rel=0.5)
        steady = 50_000 / r["train_img_per_s"] + 10_000 / r["test_img_per_s"]
        assert r["projected_90_epochs_s"] == pytest.approx(r["first_step_s"] + 90 * steady)
    table = epochs.epochs_markdown(records)
    assert "| baseline | - | off (asked graph) |" in table and table.count("\n| lambda |") == 6


def test_epochs_refuse_an_unknown_compile_mode(tmp_path, capsys):
    assert suite.main(["--device", "cpu", "--epoch-compile", "off,turbo", "--out", str(tmp_path)]) == 2
    assert "--epoch-compile 'turbo' is not one of" in capsys.readouterr().err


def test_benchmark_depth_builds_that_resnet():
    args = suite.build_parser().parse_args(["--depth", "26", "--batch-size", "2", "--iters", "1", "--warmup", "0",
                                                "--amp", "fp32", "--channels-last", "off", "--device", "cpu"])
    import torch

    result = models.benchmark_model({"model": "baseline"}, args, torch.device("cpu"))
    assert result["params"] == 13_966_666 and result["train_img_s"] > 0  # ResNet-26, 10 classes
