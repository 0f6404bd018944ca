"""Runs as a user starts them with the new settings: DEPTH 26, CIFAR-100 (a small set in its own
format) and an image folder at IMAGE_SIZE 32 and 64; resume and nntest.py follow DEPTH and DATASET."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import main_general
import nntest
import user_input
from conftest import SMOKE_FLAGS, refused_settings, run_main, write_cifar100, write_image_folder
from log_data import read_metrics

ONE_STEP = [*SMOKE_FLAGS, "--max-batches", "1", "--batch-size", "4", "--epochs", "1", "--run-name", "smoke"]


def test_depth_26_run_then_nntest_rebuilds_it(tmp_path, capsys):
    result = run_main([*ONE_STEP, "--depth", "26", "--data-dir", "data"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "lambda ResNet-26, 8,169,242 parameters" in result.stdout
    config = json.loads((tmp_path / "runs" / "Lambda" / "smoke" / "config.json").read_text())
    assert config["depth"] == 26
    best = tmp_path / "checkpoints" / "Lambda" / "smoke" / "best.pt"
    assert nntest.main(["--checkpoint", str(best), "--data-dir", str(tmp_path / "data")]) == 0
    assert "lambda ResNet-26 of run 'smoke', after epoch 1" in capsys.readouterr().out


@pytest.mark.parametrize("size, loader", [(32, "off"), (64, "on")])
def test_image_folder_run(tmp_path, size, loader):
    """PNGs of two sizes, three classes; at 64 through the device loader (on the CPU here)."""
    write_image_folder(str(tmp_path / "images"))
    result = run_main([*ONE_STEP, "--dataset", "folder", "--data-dir", "images", "--image-size", str(size),
                       "--gpu-loader", loader], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "12 train / 12 test images (folder)" in result.stdout and f"device loader {loader == 'on'}" in result.stdout
    run_dir = tmp_path / "runs" / "Lambda" / "smoke"
    (record,) = read_metrics(str(run_dir / "metrics.jsonl"))
    assert record["test_images"] == 4 and record["train_loss"] > 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {tag for tag in events.Tags()["scalars"] if tag.startswith("Accuracy_per_class/")} <= {
        f"Accuracy_per_class/class_{label}" for label in range(3)}
    checkpoint = torch.load(tmp_path / "checkpoints" / "Lambda" / "smoke" / "last.pt", weights_only=False)
    assert checkpoint["model"]["fc.weight"].shape == (3, 2048)


def test_folder_without_images_is_one_line_exit_2(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    result = run_main([*ONE_STEP, "--dataset", "folder", "--data-dir", "images"], cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "DATASET=folder expects images in images/train/<class>/ and images/val/<class>/" in result.stderr
    assert "has no class folders" in result.stderr


def test_cifar100_run_logs_20_superclasses(tmp_path, monkeypatch, capsys, cifar100_without_md5):
    """In this process, so that torchvision's md5 checks stay off for the small set."""
    write_cifar100(str(tmp_path / "data"), 40, 100)  # every class in the test set, as in CIFAR-100's
    monkeypatch.chdir(tmp_path)
    argv = [*SMOKE_FLAGS, "--dataset", "cifar100", "--data-dir", "data", "--model", "baseline", "--depth", "26",
            "--max-batches", "0", "--epochs", "1", "--run-name", "c100"]
    assert main_general.main(argv) == 0
    assert "40 train / 100 test images (cifar100)" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "runs" / "Baseline" / "c100"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert len([tag for tag in scalars if tag.startswith("Accuracy_per_superclass/")]) == 20
    assert "Accuracy_per_superclass/super00" in scalars
    assert not [tag for tag in scalars if tag.startswith("Accuracy_per_class/")]
    assert [image.step for image in events.Images("Confusion/test")] == [1]
    best = os.path.join("checkpoints", "Baseline", "c100", "best.pt")
    assert nntest.main(["--checkpoint", best]) == 0
    assert "baseline ResNet-26 of run 'c100'" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [("--depth", "101", "DEPTH=50 (now 101)"),
                                                  ("--dataset", "cifar100", "DATASET='synthetic' (now 'cifar100')")])
def test_resume_refuses_another_depth_or_data_set(tmp_path, flag, value, message):
    saved = user_input.parse_config(["--model", "baseline", "--dataset", "synthetic"])
    path = tmp_path / "last.pt"
    torch.save({**dict.fromkeys(checkpoints.CHECKPOINT_KEYS), "config": saved}, path)  # only the config is read
    config = user_input.parse_config(["--model", "baseline", "--dataset", "synthetic", flag, value, "--resume", str(path)])
    with pytest.raises(user_input.ConfigError, match=re.escape(message)):
        checkpoints.resolve_resume(config)


def test_new_settings_are_checked(capsys):
    assert "DEPTH=34 is not one of 26, 50, 101" in refused_settings(["--depth", "34"], capsys)
    assert "IMAGE_SIZE=64 needs --dataset folder" in refused_settings(["--image-size", "64"], capsys)
    err = refused_settings(["--dataset", "folder", "--image-size", "128"], capsys)  # absolute E at 32x32 maps
    assert "at IMAGE_SIZE=128" in err and "--lambda-position relative or conv" in err
    user_input.parse_config(["--dataset", "folder", "--image-size", "128", "--lambda-position", "relative"])
