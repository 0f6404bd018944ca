"""CIFAR-100 read from a small set in its own on-disk format, your own image folders (ImageFolder at
IMAGE_SIZE), the device-side random-resized crop, superclass scalars, and one-line errors."""
from __future__ import annotations

import os
import shutil
import urllib.error

import pytest
import torch
from torchvision import datasets, transforms

import data_preprocessing as data
import log_data
import model_preparation as prep
from conftest import write_cifar100, write_image_folder
from user_input import ConfigError, defaults


def test_cifar100_is_read_by_torchvision_with_its_own_normalisation(tmp_path, cifar100_without_md5):
    write_cifar100(str(tmp_path), 200, 100)
    config = dict(defaults(), dataset="cifar100", data_dir=str(tmp_path))
    train, test = data.build_datasets(config)
    assert isinstance(train, datasets.CIFAR100) and (len(train), len(test)) == (200, 100)
    assert train.classes[:2] == ["fine00", "fine01"] and data.num_classes(config) == 100
    assert data.normalization_of(train) == (data.CIFAR100_MEAN, data.CIFAR100_STD)
    assert prep.build_model(config).fc.out_features == 100
    groups = data.superclasses(test)
    assert len(groups) == 20 and groups[3] == ("super03", [15, 16, 17, 18, 19])
    loader = data.DeviceLoader(test, 16, torch.device("cpu"), train=False)  # the device loader reads it too
    images, labels = next(iter(loader))
    expected = test.transform(transforms.functional.to_pil_image(test.data[0]))
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=0)


def test_missing_cifar100_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR100, "download", offline)
    with pytest.raises(ConfigError) as error:
        data.build_datasets(dict(defaults(), dataset="cifar100", data_dir=str(tmp_path)))
    message = str(error.value)
    assert "\n" not in message and os.path.join(str(tmp_path), "cifar-100-python") in message
    assert "CIFAR-100 not found" in message and "train, test, meta" in message and "--dataset synthetic" in message


def test_superclass_accuracy_and_confusion_from_a_hand_made_matrix():
    confusion = torch.zeros(4, 4, dtype=torch.long)  # classes 0, 1 in group A; 2, 3 in group B
    confusion[0, 0], confusion[0, 1], confusion[1, 1], confusion[1, 2] = 6, 2, 3, 1
    confusion[2, 2], confusion[3, 0] = 5, 3
    groups = [[0, 1], [2, 3]]
    assert log_data.group_accuracy(confusion, groups[0]) == pytest.approx(100 * 9 / 12)  # fine top-1 on A's images
    assert log_data.group_accuracy(confusion, groups[1]) == pytest.approx(100 * 5 / 8)
    assert log_data.grouped_confusion(confusion, groups).tolist() == [[11, 1], [3, 5]]
    assert log_data.grouped_confusion(confusion, [[0], [2, 3]]).tolist() == [[6, 0], [3, 5]]  # class 1 in none


def test_logger_shows_superclass_scalars_and_their_confusion_matrix(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(log_data, "confusion_figure",
                        lambda confusion, names, title: drawn.append((confusion.tolist(), list(names), title)))
    confusion = torch.zeros(4, 4, dtype=torch.long)
    confusion[0, 0], confusion[0, 1], confusion[2, 3], confusion[3, 3] = 4, 4, 2, 6
    logger = log_data.RunLogger(str(tmp_path))
    logger.writer.add_figure = lambda *args, **kwargs: None  # drawing the figure is figures.py's (tested there)
    logger.evaluation(1, confusion, ["a0", "a1", "b0", "b1"], [("A", [0, 1]), ("B", [2, 3])])
    logger.close()
    assert drawn == [([[8, 0], [0, 8]], ["A", "B"], "test set, epoch 1, superclasses")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"] if "class" in tag}
    assert scalars == {"Accuracy_per_superclass/A": 50.0, "Accuracy_per_superclass/B": 100 * 6 / 8}


@pytest.mark.parametrize("size", [32, 64])
def test_image_folder_classes_sizes_and_transforms(tmp_path, size):
    root = write_image_folder(str(tmp_path))
    config = dict(defaults(), dataset="folder", data_dir=root, image_size=size)
    train, val = data.build_datasets(config)
    assert train.classes == val.classes == ["class_0", "class_1", "class_2"] and data.num_classes(config) == 3
    assert (len(train), len(val)) == (12, 12) and prep.build_model(config).fc.out_features == 3
    kinds = [type(t) for t in train.transform.transforms]
    assert (transforms.RandomResizedCrop in kinds) == (size > 32) and (transforms.RandomCrop in kinds) == (size == 32)
    assert train[1][0].shape == val[0][0].shape == (3, size, size)  # 40x30 and 70x90 files alike
    assert data.normalization_of(train) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    for loader in (data.DeviceLoader(train, 4, torch.device("cpu"), train=True),
                   data.DeviceLoader(val, 4, torch.device("cpu"), train=False)):
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, size, size) and torch.isfinite(images).all() and set(labels.tolist()) <= {0, 1, 2}
    images, _ = next(iter(data.DeviceLoader(val, 12, torch.device("cpu"), train=False)))
    torch.testing.assert_close(images, torch.stack([val[i][0] for i in range(12)]), atol=1e-5, rtol=0)


def test_device_random_resized_crop_keeps_rows_monotone_and_flips_half():
    """A left-to-right ramp stays a ramp in every row after a crop, resize and flip (or its mirror)."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    images = ramp.view(1, 1, 1, 64).expand(400, 3, 64, 64).contiguous()
    out = data.random_resized_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == (400, 3, 64, 64) and out.min() >= 0 and out.max() <= 255
    steps = out[:, 0].diff(dim=-1)                                   # B, 64, 63
    rising, falling = (steps >= -1e-3).all(dim=(1, 2)), (steps <= 1e-3).all(dim=(1, 2))
    assert (rising | falling).all() and 150 < int(falling.sum()) < 250
    assert torch.allclose(out[:, 0], out[:, 0, :1].expand(-1, 64, -1))  # every row alike: no vertical mixing
    widths = out[:, 0, 0, -1].sub(out[:, 0, 0, 0]).abs()
    assert widths.min() < 0.5 * 255 and widths.max() > 0.9 * 255 * 63 / 64  # small and large crops


@pytest.mark.parametrize("damage, expected", [
    ("no train", "is not a folder"),
    ("no classes", "has no class folders"),
    ("empty class", "has no images"),
    ("other val classes", "with the same classes in both; only one of them has class_2"),
])
def test_bad_image_folders_are_one_line_naming_what_is_expected(tmp_path, damage, expected):
    root = write_image_folder(str(tmp_path / "images"))
    if damage == "no train":
        shutil.rmtree(os.path.join(root, "train"))
    elif damage == "no classes":
        for name in os.listdir(os.path.join(root, "train")):
            shutil.rmtree(os.path.join(root, "train", name))
    elif damage == "empty class":
        for name in os.listdir(os.path.join(root, "val", "class_1")):
            os.remove(os.path.join(root, "val", "class_1", name))
    else:
        shutil.rmtree(os.path.join(root, "val", "class_2"))
    with pytest.raises(ConfigError) as error:
        data.build_datasets(dict(defaults(), dataset="folder", data_dir=root))
    message = str(error.value)
    assert "\n" not in message and expected in message
    assert message.startswith(f"DATASET=folder expects images in {os.path.join(root, 'train', '<class>')}/")


def test_decoded_set_too_large_for_the_device_falls_back_to_the_dataloader(tmp_path, monkeypatch, capsys):
    root = write_image_folder(str(tmp_path))
    config = dict(defaults(), dataset="folder", data_dir=root, image_size=64, gpu_loader="on", num_workers=0,
                  batch_size=4)
    train_loader = data.build_loaders(config, torch.device("cpu")).train
    assert isinstance(train_loader, data.DeviceLoader)
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)  # 4 KiB free
    train_loader = data.build_loaders(config, torch.device("cpu")).train
    assert isinstance(train_loader, torch.utils.data.DataLoader)
    assert "loading them with the DataLoader instead" in capsys.readouterr().err
