"""main_general.py as a user runs it: a smoke run on synthetic data, then a resume of it."""
from __future__ import annotations

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SMOKE_FLAGS, run_main
from log_data import SCALARS, read_metrics

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
               "train_img_per_s"}


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Two epochs of the lambda ResNet-50, checkpoints every epoch, then resumed to three."""
    work = tmp_path_factory.mktemp("work")
    args = [*SMOKE_FLAGS, "--data-dir", "data", "--epochs", "2", "--checkpoint-every", "1", "--run-name", "smoke"]
    first = run_main(args, cwd=str(work))
    assert first.returncode == 0, first.stderr
    snapshot = {"metrics": read_metrics(work / "runs/Lambda/smoke/metrics.jsonl"),
                "scalars": scalars(work / "runs/Lambda/smoke")}
    resumed = run_main([*args[:-2], "--epochs", "3", "--resume", "latest"], cwd=str(work))
    return work, first, snapshot, resumed


def test_run_directory(smoke_run):
    work, first, snapshot, _ = smoke_run
    run_dir = work / "runs" / "Lambda" / "smoke"
    names = set(os.listdir(run_dir))
    assert {"config.json", "log.txt", "metrics.jsonl", "samples.png"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "lambda" and config["batch_size"] == 8 and config["run_name"] == "smoke"
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "12,971,450 parameters" in first.stdout
    assert "final test accuracy" in first.stdout and "chosen on the test set" in first.stdout


def test_metrics_and_tensorboard_scalars(smoke_run):
    _, _, snapshot, _ = smoke_run
    records = snapshot["metrics"]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert METRIC_KEYS <= set(record)
        assert 0 <= record["train_acc"] <= 100 and 0 <= record["test_acc"] <= 100
        assert record["train_loss"] > 0 and record["epoch_time_s"] > 0 and record["train_img_per_s"] > 0
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3])
    tags = snapshot["scalars"]
    shares = [tag for tag in tags if tag.startswith(("Lambda_content_share/", "Lambda_position_share/"))]
    assert len(shares) == 2 * 16 and "Lambda_position_share/layer4.2.conv2" in shares  # every lambda layer
    assert all([step for step, _ in tags[tag]] == [1, 2] for tag in shares)  # the figure epochs: first and last
    assert all(0 <= value <= 1 for tag in shares for _, value in tags[tag])
    logged = {tag: key for tag, key in SCALARS.items() if not key.startswith("val_")}  # no VAL_SIZE here
    assert set(logged) <= set(tags) and not {"Accuracy/val", "Loss/val"} & set(tags)
    for tag, key in logged.items():
        assert [step for step, _ in tags[tag]] == [1, 2]
        assert [value for _, value in tags[tag]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_the_position_tables_figure_is_in_tensorboard(smoke_run):
    work, *_ = smoke_run
    events = EventAccumulator(str(work / "runs/Lambda/smoke"))
    events.Reload()
    assert [image.step for image in events.Images("Lambda/position_tables")][:2] == [1, 2]


def test_checkpoints(smoke_run):
    work, *_ = smoke_run
    folder = work / "checkpoints" / "Lambda" / "smoke"
    assert {"last.pt", "best.pt", "epoch_001.pt", "epoch_002.pt"} <= set(os.listdir(folder))
    assert not [name for name in os.listdir(folder) if ".tmp" in name]
    state = torch.load(folder / "epoch_002.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "best_acc", "config", "rng"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["model"] == "lambda"
    assert state["scheduler"]["last_epoch"] == 2


def test_resume_continues_the_same_run(smoke_run):
    work, _, snapshot, resumed = smoke_run
    assert resumed.returncode == 0, resumed.stderr
    run_dir = work / "runs" / "Lambda" / "smoke"
    assert os.listdir(work / "runs" / "Lambda") == ["smoke"]  # no second run directory
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[:2] == snapshot["metrics"]
    assert records[2]["lr"] == pytest.approx(1.5e-3)  # the schedule continued, not restarted
    assert [step for step, _ in scalars(run_dir)["Loss/train"]] == [1, 2, 3]
    assert "resumed from" in (run_dir / "log.txt").read_text()
    state = torch.load(work / "checkpoints/Lambda/smoke/last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 3


def test_resume_with_another_model_is_refused(smoke_run):
    work, *_ = smoke_run
    last = work / "checkpoints" / "Lambda" / "smoke" / "last.pt"
    before = last.read_bytes()
    result = run_main([*SMOKE_FLAGS, "--data-dir", "data", "--heads", "8", "--resume", str(last)], cwd=str(work))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "HEADS=4 (now 8)" in result.stderr
    assert last.read_bytes() == before


def test_baseline_smoke_run(tmp_path):
    result = run_main([*SMOKE_FLAGS, "--model", "baseline", "--data-dir", "data", "--epochs", "1"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs" / "Baseline").iterdir()  # a timestamped name
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 1
    assert "23,528,522 parameters" in result.stdout
    assert (tmp_path / "checkpoints" / "Baseline" / run_dir.name / "last.pt").is_file()
