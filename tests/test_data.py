"""Data: the synthetic set in CIFAR-10's on-disk format, transforms, loaders, missing CIFAR-10."""
from __future__ import annotations

import filecmp
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

import data_preprocessing as data
from user_input import ConfigError, defaults


def unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_synthetic_files_have_the_cifar10_format(synthetic_root):
    folder = os.path.join(synthetic_root, "synthetic", "cifar-10-batches-py")
    names = sorted(os.listdir(folder))
    assert names == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                     "data_batch_5", "test_batch"]
    batch = unpickle(os.path.join(folder, "data_batch_1"))
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (40, 3072)
    assert isinstance(batch["labels"], list) and set(batch["labels"]) <= set(range(10))
    assert len(unpickle(os.path.join(folder, "batches.meta"))["label_names"]) == 10


def test_synthetic_reads_back_through_torchvision(synthetic_root):
    train = data.SyntheticCIFAR10(os.path.join(synthetic_root, "synthetic"), train=True)
    test = data.SyntheticCIFAR10(os.path.join(synthetic_root, "synthetic"), train=False)
    assert isinstance(train, datasets.CIFAR10)
    assert (len(train), len(test)) == (200, 100)
    assert train.data.shape == (200, 32, 32, 3) and train.data.dtype == np.uint8
    assert np.bincount(train.targets).tolist() == [20] * 10  # balanced
    assert len(train.classes) == 10
    image, label = train[0]
    assert image.size == (32, 32) and 0 <= label < 10


def test_synthetic_is_deterministic_in_the_seed(tmp_path):
    first = data.write_synthetic(str(tmp_path / "a"), 50, 20, seed=3)
    second = data.write_synthetic(str(tmp_path / "b"), 50, 20, seed=3)
    other = data.write_synthetic(str(tmp_path / "c"), 50, 20, seed=4)
    batch = os.path.join("cifar-10-batches-py", "data_batch_1")
    assert filecmp.cmp(os.path.join(first, batch), os.path.join(second, batch), shallow=False)
    assert not filecmp.cmp(os.path.join(first, batch), os.path.join(other, batch), shallow=False)
    # a different recipe rewrites the set; the same one leaves it alone
    stamp = os.path.getmtime(os.path.join(first, batch))
    data.write_synthetic(str(tmp_path / "a"), 50, 20, seed=3)
    assert os.path.getmtime(os.path.join(first, batch)) == stamp
    data.write_synthetic(str(tmp_path / "a"), 60, 20, seed=3)
    assert len(data.SyntheticCIFAR10(first, train=True)) == 60
    assert [name for name in os.listdir(tmp_path / "a") if name.startswith(".")] == []  # no staging left


def test_no_single_pixel_separates_the_classes(tmp_path):
    root = data.write_synthetic(str(tmp_path), 2000, 1000, seed=0)
    train = data.SyntheticCIFAR10(root, train=True)
    test = data.SyntheticCIFAR10(root, train=False)
    x_train = train.data.reshape(len(train), -1) // 32  # 8 intensity bins per pixel and channel
    x_test = test.data.reshape(len(test), -1) // 32
    y_train, y_test = np.array(train.targets), np.array(test.targets)
    # best classifier reading one pixel: the majority class of each of its intensity bins
    counts = np.zeros((x_train.shape[1], 8, 10))
    np.add.at(counts, (np.arange(x_train.shape[1])[None, :], x_train, y_train[:, None]), 1)
    predicted = counts.argmax(axis=2)[np.arange(x_test.shape[1])[None, :], x_test]  # [N, pixels]
    accuracy = (predicted == y_test[:, None]).mean(axis=0)
    assert accuracy.max() < 0.2, f"pixel {accuracy.argmax()} alone gives {accuracy.max():.0%}"


def test_synthetic_classes_are_learnable(synthetic_root, tmp_path):
    """A tiny CNN beats chance (10 %) clearly after a few epochs on the augmented synthetic data."""
    torch.manual_seed(0)
    config = dict(defaults(), dataset="synthetic", data_dir=str(tmp_path), synthetic_train_size=1000,
                  synthetic_test_size=200, batch_size=50, num_workers=0)
    train_loader, test_loader, _, _ = data.build_loaders(config, torch.device("cpu"))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for images, labels in train_loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(images).argmax(1) == labels).sum().item() for images, labels in test_loader)
    assert correct / 200 > 0.5


def test_transforms_are_the_reproductions():
    train = data.train_transform().transforms
    crop, flip, _, normalize = train
    assert isinstance(crop, transforms.RandomCrop) and crop.size == (32, 32) and crop.padding == 4
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert normalize.mean == (0.4914, 0.4822, 0.4465) and normalize.std == (0.2023, 0.1994, 0.2010)
    assert [type(t) for t in data.test_transform().transforms] == [transforms.ToTensor, transforms.Normalize]


def test_seed_fixes_the_data_order(synthetic_root):
    config = dict(defaults(), dataset="synthetic", data_dir=synthetic_root, synthetic_train_size=200,
                  synthetic_test_size=100, batch_size=16, num_workers=0)

    def first_batch(epoch):
        loader, _, generator, _ = data.build_loaders(config, torch.device("cpu"))
        data.seed_epoch(generator, config["seed"], epoch)
        return next(iter(loader))

    images, labels = first_batch(0)
    again_images, again_labels = first_batch(0)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(first_batch(1)[0], images)


def test_sample_grid_leaves_the_global_rng_alone(synthetic_root):
    train = data.SyntheticCIFAR10(os.path.join(synthetic_root, "synthetic"), train=True,
                                  transform=data.train_transform())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    grid = data.sample_grid(train, seed=0, count=16)
    assert grid.shape == (3, 2 + 2 * 34, 2 + 8 * 34) and 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(torch.rand(3), expected)


def test_missing_cifar10_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    config = dict(defaults(), data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as error:
        data.build_datasets(config)
    message = str(error.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message
    assert "data_batch_1..5" in message and "--dataset synthetic" in message


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        data.build_datasets(dict(defaults(), data_dir=str(path)))
    assert path.read_text() == "not a folder"
