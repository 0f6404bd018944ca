"""VAL_SIZE: training images held out for validation, stratified and drawn with the seed, never
trained on; with it, best.pt and the run's summary follow validation, and resume keeps the split."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import data_preprocessing as data
import user_input
from conftest import SMOKE_FLAGS, refused_settings, run_main, write_cifar100, write_image_folder
from log_data import read_metrics

CPU = torch.device("cpu")


def synthetic_config(root: str, **settings) -> dict:
    return dict(user_input.defaults(), dataset="synthetic", data_dir=root, synthetic_train_size=200,
                synthetic_test_size=100, num_workers=0, batch_size=16, **settings)


def test_validation_indices_are_stratified_distinct_and_fixed_by_the_seed():
    targets = np.repeat(np.arange(4), [50, 30, 15, 5])  # unbalanced classes
    held = data.validation_indices(targets, 20, seed=0)
    assert len(held) == len(set(held.tolist())) == 20
    assert np.bincount(targets[held], minlength=4).tolist() == [10, 6, 3, 1]  # each class's share
    assert np.array_equal(held, data.validation_indices(targets, 20, seed=0))
    assert not np.array_equal(held, data.validation_indices(targets, 20, seed=1))
    odd = data.validation_indices(targets, 7, seed=0)  # shares 3.5, 2.1, 1.05, 0.35: largest remainders
    assert len(odd) == 7 and np.bincount(targets[odd], minlength=4).tolist() == [4, 2, 1, 0]


def test_the_synthetic_split_is_disjoint_from_training_and_read_with_the_test_transform(synthetic_root):
    train_set, test_set = data.build_datasets(synthetic_config(synthetic_root))
    kept, val = data.hold_out(train_set, test_set, 40, seed=0)
    assert type(kept) is type(val) is type(train_set)
    assert (len(kept), len(val)) == (160, 40)
    rows = {image.tobytes() for image in train_set.data}
    assert len(rows) == 200  # every synthetic image differs, so disjointness can be read off the pixels
    assert not {image.tobytes() for image in kept.data} & {image.tobytes() for image in val.data}
    assert {image.tobytes() for image in kept.data} | {image.tobytes() for image in val.data} == rows
    assert np.bincount(val.targets).tolist() == [4] * 10
    assert val.transform is test_set.transform and kept.transform is train_set.transform
    again = data.hold_out(*data.build_datasets(synthetic_config(synthetic_root)), 40, seed=0)[1]
    assert np.array_equal(again.data, val.data) and again.targets == val.targets
    assert len(train_set) == 200  # the set it was split from is untouched


def test_cifar100_and_image_folders_split_too(tmp_path, cifar100_without_md5):
    write_cifar100(str(tmp_path / "c100"), 300, 100)
    train_set, test_set = data.build_datasets(dict(user_input.defaults(), dataset="cifar100",
                                                   data_dir=str(tmp_path / "c100")))
    kept, val = data.hold_out(train_set, test_set, 100, seed=0)
    assert (len(kept), len(val)) == (200, 100) and sorted(val.targets) == list(range(100))
    root = write_image_folder(str(tmp_path / "folder"), classes=3, per_class=4)
    train_set, test_set = data.build_datasets(dict(user_input.defaults(), dataset="folder", data_dir=root,
                                                   image_size=32))
    kept, val = data.hold_out(train_set, test_set, 3, seed=0)
    assert len(val.samples) == len(val.imgs) == 3 and sorted(val.targets) == [0, 1, 2]
    assert not {path for path, _ in kept.samples} & {path for path, _ in val.samples}
    assert len(test_set) == 12  # the folder's own val/ stays the test set
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == val.targets[0]


@pytest.mark.parametrize("gpu_loader", ["off", "on"])
def test_build_loaders_gives_a_validation_loader_with_every_held_out_image(synthetic_root, gpu_loader):
    loaders = data.build_loaders(synthetic_config(synthetic_root, val_size=30, gpu_loader=gpu_loader), CPU)
    assert len(loaders.train.dataset) == 170 and len(loaders.test.dataset) == 100
    labels = torch.cat([labels for _, labels in loaders.val])
    assert len(labels) == 30 and labels.tolist() == loaders.val.dataset.targets  # in order, no augmentation
    assert data.build_loaders(synthetic_config(synthetic_root), CPU).val is None


@pytest.mark.parametrize("argv, expected", [(["--val-size", "-1"], "VAL_SIZE=-1 must be >= 0")])
def test_a_negative_validation_size_is_one_line(argv, expected, capsys):
    assert expected in refused_settings(argv, capsys)


def test_a_validation_set_as_large_as_the_training_set_is_one_line_exit_2(tmp_path):
    result = run_main([*SMOKE_FLAGS, "--val-size", "64", "--data-dir", "data"], cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "VAL_SIZE=64 leaves no training images" in result.stderr


def test_resume_refuses_another_split(tmp_path):
    saved = user_input.parse_config(["--val-size", "500"])
    path = tmp_path / "last.pt"
    torch.save({**dict.fromkeys(checkpoints.CHECKPOINT_KEYS), "config": saved}, path)  # only the config is read
    for flags, named in ((["--val-size", "0"], "VAL_SIZE=500"), (["--val-size", "500", "--seed", "1"], "SEED=0")):
        config = user_input.parse_config([*flags, "--resume", str(path)])
        with pytest.raises(user_input.ConfigError, match=f"another validation split.*{named}"):
            checkpoints.resolve_resume(config)
    assert checkpoints.resolve_resume(user_input.parse_config(["--val-size", "500", "--resume", str(path)]))["path"] == str(path)


def test_best_checkpoint_and_summary_follow_validation(tmp_path):
    """Four epochs with 16 images held out: every record has the validation metrics, best.pt is the
    epoch of the best validation accuracy, and the summary gives the test accuracy there."""
    args = [*SMOKE_FLAGS, "--model", "baseline", "--depth", "26", "--val-size", "16", "--epochs", "4",
            "--max-batches", "1", "--lr", "0.01", "--warmup-epochs", "0", "--data-dir", "data", "--run-name", "val"]
    result = run_main(args, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path / "runs/Baseline/val/metrics.jsonl")
    assert len(records) == 4 and all({"val_acc", "val_loss"} <= set(r) for r in records)
    chosen = max(records, key=lambda r: r["val_acc"])  # the first of equal accuracies, as best.pt keeps it
    best = torch.load(tmp_path / "checkpoints/Baseline/val/best.pt", weights_only=False)
    assert (best["best_epoch"], best["best_acc"]) == (chosen["epoch"], chosen["val_acc"])
    assert "48 train / 32 test images (synthetic); 16 training images held out for validation" in result.stdout
    assert (f"test accuracy {chosen['test_acc']:.2f}% at the best validation epoch {chosen['epoch']}"
            in result.stdout)
    assert json.loads((tmp_path / "runs/Baseline/val/config.json").read_text())["val_size"] == 16
    events = EventAccumulator(str(tmp_path / "runs/Baseline/val"))
    events.Reload()
    assert [e.value for e in events.Scalars("Accuracy/val")] == pytest.approx([r["val_acc"] for r in records])
    assert events.Scalars("HParams/test_acc_at_best_val")[-1].value == pytest.approx(chosen["test_acc"])
