"""The data sets (CIFAR-10, CIFAR-100, the offline synthetic stand-in, your own image folders),
augmentation and data loaders.

CIFAR-10 and CIFAR-100 are read by torchvision's CIFAR10 and CIFAR100 classes from DATA_DIR
(downloaded when missing), the synthetic set from DATA_DIR/synthetic, which this module writes in
CIFAR-10's pickled format, and DATASET=folder by torchvision's ImageFolder from DATA_DIR/train and
DATA_DIR/val (one sub-folder per class).

Two loaders give the same batches in distribution: torchvision's DataLoader with the transforms
below (worker processes, PIL), and ``DeviceLoader``, which moves the uint8 set to the device once
and augments whole batches there (GPU_LOADER; the default on CUDA).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms, utils
from torchvision.datasets.utils import check_integrity

from speed import switched_on
from user_input import ConfigError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # reproduction, Table 3
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # per-channel mean and std of CIFAR-100's training images
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet values, for DATASET=folder
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "synthetic": (CIFAR10_MEAN, CIFAR10_STD),
                 "cifar100": (CIFAR100_MEAN, CIFAR100_STD), "folder": (IMAGENET_MEAN, IMAGENET_STD)}
CLASSES = {"cifar10": 10, "synthetic": 10, "cifar100": 100}  # DATASET=folder: one per class folder
PADDING = 4  # pad 4 + random 32x32 crop (reproduction, Table 3)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_SIZE = 32  # side of CIFAR images; IMAGE_SIZE above it switches to the random-resized crop
IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS  # what ImageFolder reads: .jpg, .png, ...

# Synthetic classes: sinusoidal stripes told apart by orientation and frequency (cycles per image).
# Random phase makes every pixel's distribution the same in all classes, so no single pixel
# separates them; "diagonal" is +-45 degrees at random, so a horizontal flip keeps the class.
SYNTHETIC_CLASSES = [(orientation, cycles) for cycles in (2, 3.5, 6, 9)
                     for orientation in ("horizontal", "vertical", "diagonal")][:10]
SYNTHETIC_VERSION = 1  # bump when the generator changes, so old files are rewritten


def train_transform(size: int = CIFAR_SIZE, mean=CIFAR10_MEAN, std=CIFAR10_STD, resize: bool = False
                    ) -> transforms.Compose:
    """At 32x32: pad 4 + random 32x32 crop, horizontal flip p = 0.5, normalise (reproduction, Table 3);
    ``resize`` first brings images of another size to 32x32 (shorter side, centre crop). Larger:
    random-resized crop (8-100 % of the area, aspect 3/4-4/3) and flip, as for ImageNet."""
    if size > CIFAR_SIZE:
        crop = [transforms.RandomResizedCrop(size, antialias=True)]
    else:
        crop = ([transforms.Resize(size, antialias=True), transforms.CenterCrop(size)] if resize else []) + \
               [transforms.RandomCrop(size, padding=PADDING)]
    return transforms.Compose([*crop, transforms.RandomHorizontalFlip(p=0.5), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def test_transform(size: int = CIFAR_SIZE, mean=CIFAR10_MEAN, std=CIFAR10_STD, resize: bool = False
                   ) -> transforms.Compose:
    """Normalise; ``resize``: first the shorter side to 8/7 of `size` (to `size` at 32) and a centre crop."""
    resize_to = size if size <= CIFAR_SIZE else round(size * 8 / 7)  # 256 for 224, as for ImageNet
    crop = [transforms.Resize(resize_to, antialias=True), transforms.CenterCrop(size)] if resize else []
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(mean, std)])


class SyntheticCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 reader for files this module wrote: same format, no md5 to check."""

    train_list = [[name, None] for name in TRAIN_FILES]
    test_list = [["test_batch", None]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": None}


def _stripes(rng: np.random.Generator, label: int, count: int) -> np.ndarray:
    """`count` images of class `label` as uint8 [count, 3, 32, 32]."""
    orientation, cycles = SYNTHETIC_CLASSES[label]
    angle = {"horizontal": 0.0, "vertical": 90.0}.get(orientation)
    angles = np.full(count, angle) if angle is not None else rng.choice([45.0, 135.0], count)
    theta = np.deg2rad(angles + rng.uniform(-8, 8, count))[:, None, None]              # N, 1, 1
    freq = (2 * np.pi * cycles / 32 * rng.uniform(0.9, 1.1, count))[:, None, None]      # N, 1, 1
    phase = rng.uniform(0, 2 * np.pi, count)[:, None, None]                             # N, 1, 1
    y, x = np.mgrid[0:32, 0:32]                                                         # 32, 32
    wave = np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)              # N, 32, 32
    contrast = rng.uniform(0.15, 0.35, (count, 1, 1, 1))
    colour = rng.uniform(0.5, 1.0, (count, 3, 1, 1))                                    # per image, not class
    brightness = rng.uniform(0.35, 0.65, (count, 1, 1, 1))
    images = brightness + contrast * colour * wave[:, None] + rng.normal(0, 0.1, (count, 3, 32, 32))
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _make_split(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    labels = rng.permutation(np.arange(size) % len(SYNTHETIC_CLASSES))
    images = np.empty((size, 3, 32, 32), np.uint8)
    for label in range(len(SYNTHETIC_CLASSES)):
        images[labels == label] = _stripes(rng, label, int((labels == label).sum()))
    return images.reshape(size, 3 * 32 * 32), labels.tolist()  # N, 3072 (R, G, B planes), as CIFAR-10


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_synthetic(root: str, train_size: int, test_size: int, seed: int) -> str:
    """Write a learnable CIFAR-10-format data set under root/synthetic (once); return its root.

    Deterministic in (sizes, seed). Written into a temporary folder and moved into place, so an
    interrupted write never leaves a half-written data set behind.
    """
    synthetic_root = os.path.join(root, "synthetic")
    recipe = {"version": SYNTHETIC_VERSION, "train_size": train_size, "test_size": test_size, "seed": seed}
    recipe_path = os.path.join(synthetic_root, "synthetic.json")
    if os.path.isfile(recipe_path):
        with open(recipe_path) as f:
            if json.load(f) == recipe:
                return synthetic_root
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    staging = tempfile.mkdtemp(prefix=".synthetic-", dir=root)
    folder = os.path.join(staging, FOLDER)
    os.makedirs(folder)
    data, labels = _make_split(rng, train_size)
    for i, part in enumerate(np.array_split(np.arange(train_size), len(TRAIN_FILES))):
        _dump(os.path.join(folder, TRAIN_FILES[i]), {"batch_label": f"training batch {i + 1} of 5",
                                                    "data": data[part], "labels": [labels[j] for j in part]})
    data, labels = _make_split(rng, test_size)
    _dump(os.path.join(folder, "test_batch"), {"batch_label": "testing batch 1 of 1", "data": data, "labels": labels})
    names = [f"{orientation}-{cycles}" for orientation, cycles in SYNTHETIC_CLASSES]
    _dump(os.path.join(folder, "batches.meta"), {"label_names": names, "num_vis": 3072})
    with open(os.path.join(staging, "synthetic.json"), "w") as f:
        json.dump(recipe, f)
    shutil.rmtree(synthetic_root, ignore_errors=True)
    os.replace(staging, synthetic_root)
    return synthetic_root


CIFAR = {"cifar10": (datasets.CIFAR10, "CIFAR-10", "data_batch_1..5, test_batch, batches.meta"),
         "cifar100": (datasets.CIFAR100, "CIFAR-100", "train, test, meta")}  # reader, name, files


def _refuse_damaged_cifar(reader: type, name: str, folder: str) -> None:
    """ConfigError naming the first file of an existing CIFAR folder that fails its md5 check:
    the user's files are never overwritten by a download."""
    if not os.path.exists(folder):
        return
    for filename, md5 in reader.train_list + reader.test_list + [[reader.meta["filename"], reader.meta["md5"]]]:
        if not check_integrity(os.path.join(folder, filename), md5):
            raise ConfigError(f"{name} file {os.path.join(folder, filename)} is missing or corrupt (its md5 "
                              f"differs); delete {folder} to download {name} again")
    raise ConfigError(f"{name} in {folder} cannot be read; delete that folder to download it again")


def _cifar(dataset: str, root: str, train: bool, transform) -> datasets.CIFAR10:
    """torchvision's CIFAR10 or CIFAR100 from root/<its folder>, downloading only when it is missing."""
    reader, name, files = CIFAR[dataset]
    try:
        return reader(root, train=train, transform=transform, download=False)
    except RuntimeError:  # missing, or failing its md5 check
        _refuse_damaged_cifar(reader, name, os.path.join(root, reader.base_folder))
    try:
        return reader(root, train=train, transform=transform, download=True)
    except Exception as error:  # offline, unwritable, or a corrupt archive: all fixable by the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"{name} not found in {os.path.join(root, reader.base_folder)} and could not be downloaded ({reason}); "
            f"put the python version of {name} there ({files}) "
            f"or run the offline demo with --dataset synthetic") from None


def folder_classes(root: str) -> list[str]:
    """The class folders of root/train, checked against root/val: ConfigError naming what is expected."""
    expected = f"DATASET=folder expects images in {os.path.join(root, 'train', '<class>')}/ and " \
               f"{os.path.join(root, 'val', '<class>')}/"
    found = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ConfigError(f"{expected}; {path} is not a folder")
        found[split] = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not found[split]:
            raise ConfigError(f"{expected}; {path} has no class folders")
        for name in found[split]:
            folder = os.path.join(path, name)
            if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(folder) for f in files):
                raise ConfigError(f"{expected}; {folder} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    if found["train"] != found["val"]:
        differ = sorted(set(found["train"]) ^ set(found["val"]))
        raise ConfigError(f"{expected}, with the same classes in both; only one of them has {', '.join(differ)}")
    return found["train"]


def num_classes(config: dict) -> int:
    """Classes of the configured data set (DATASET=folder: its class folders)."""
    if config["dataset"] == "folder":
        return len(folder_classes(config["data_dir"]))
    return CLASSES[config["dataset"]]


def _image_folders(config: dict) -> tuple[Dataset, Dataset]:
    root, size = config["data_dir"], config["image_size"]
    folder_classes(root)
    mean, std = NORMALIZATION["folder"]
    try:
        return (datasets.ImageFolder(os.path.join(root, "train"), train_transform(size, mean, std, resize=True)),
                datasets.ImageFolder(os.path.join(root, "val"), test_transform(size, mean, std, resize=True)))
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"cannot read the images under {root} ({error})") from None


def build_datasets(config: dict) -> tuple[Dataset, Dataset]:
    """(train, test) data sets with their transforms (the reproduction's for the CIFAR sets)."""
    root, dataset = config["data_dir"], config["dataset"]
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"DATA_DIR={root!r} is a file; point --data-dir at a folder")
    if dataset == "folder":
        return _image_folders(config)
    mean, std = NORMALIZATION[dataset]
    if dataset in CIFAR:
        return (_cifar(dataset, root, True, train_transform(mean=mean, std=std)),
                _cifar(dataset, root, False, test_transform(mean=mean, std=std)))
    synthetic_root = write_synthetic(root, config["synthetic_train_size"], config["synthetic_test_size"],
                                     config["seed"])
    try:
        return (SyntheticCIFAR10(synthetic_root, train=True, transform=train_transform()),
                SyntheticCIFAR10(synthetic_root, train=False, transform=test_transform()))
    except Exception as error:
        raise ConfigError(f"could not read the synthetic data in {synthetic_root} ({error}); "
                          f"delete that folder to have it written again") from None


def validation_indices(targets, size: int, seed: int) -> np.ndarray:
    """`size` indices into `targets`, drawn with `seed` and stratified: each class keeps its share of
    the set (largest remainders), so the validation set has the training set's class balance."""
    targets = np.asarray(targets)
    classes, counts = np.unique(targets, return_counts=True)
    quota = size * counts / len(targets)
    taken = np.floor(quota).astype(int)
    taken[np.argsort(taken - quota, kind="stable")[:size - taken.sum()]] += 1  # largest remainders first
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(targets == label))[:count] for label, count in zip(classes, taken)]
    return np.sort(np.concatenate(chosen))


def _subset(dataset: Dataset, indices: np.ndarray, transform) -> Dataset:
    """A copy of a CIFAR set or an ImageFolder holding only the images at `indices`, with `transform`
    (a data set of the same class, so that the DeviceLoader and sample_grid read it as they read the whole)."""
    part = copy.copy(dataset)
    part.transform = transform
    part.targets = [dataset.targets[i] for i in indices]
    if hasattr(dataset, "data"):
        part.data = dataset.data[indices]
    else:
        part.samples = part.imgs = [dataset.samples[i] for i in indices]
    return part


def hold_out(train_set: Dataset, test_set: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training images kept, validation set): VAL_SIZE images of the training set held out (never
    trained on) and read with the test transform; (train_set, None) for size 0."""
    if size == 0:
        return train_set, None
    if size >= len(train_set):
        raise ConfigError(f"VAL_SIZE={size} leaves no training images: the training set has {len(train_set)}; "
                          f"choose --val-size below that (e.g. {len(train_set) // 10})")
    held = validation_indices(train_set.targets, size, seed)
    kept = np.setdiff1d(np.arange(len(train_set)), held)
    return _subset(train_set, kept, train_set.transform), _subset(train_set, held, test_set.transform)


def superclasses(dataset: Dataset) -> list[tuple[str, list[int]]]:
    """CIFAR-100's 20 superclasses as (name, [class indices]), read from its files; [] for other data."""
    if not isinstance(dataset, datasets.CIFAR100):
        return []
    return _superclasses(os.path.join(dataset.root, dataset.base_folder), dataset.meta["filename"],
                         dataset.test_list[0][0])


@functools.lru_cache(maxsize=4)
def _superclasses(folder: str, meta: str, test: str) -> list[tuple[str, list[int]]]:
    with open(os.path.join(folder, meta), "rb") as f:
        names = pickle.load(f, encoding="latin1")["coarse_label_names"]
    with open(os.path.join(folder, test), "rb") as f:
        labels = pickle.load(f, encoding="latin1")
    members = [sorted({fine for fine, c in zip(labels["fine_labels"], labels["coarse_labels"]) if c == coarse})
               for coarse in range(len(names))]
    return list(zip(names, members))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad 4 with zeros, crop 32x32 at a uniform offset in 0..8, flip with p = 0.5: per image, on the device.

    The batch-wise twin of RandomCrop(32, padding=4) + RandomHorizontalFlip() on uint8 [B, 3, H, W].
    """
    b, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (PADDING,) * 4).permute(0, 2, 3, 1)                               # B, H+8, W+8, 3
    offset_y = torch.randint(0, 2 * PADDING + 1, (b,), generator=generator, device=device)  # B
    offset_x = torch.randint(0, 2 * PADDING + 1, (b,), generator=generator, device=device)  # B
    flip = torch.rand(b, generator=generator, device=device) < 0.5                          # B
    rows = offset_y[:, None] + torch.arange(height, device=device)                          # B, H
    cols = offset_x[:, None] + torch.arange(width, device=device)                           # B, W
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns right to left
    batch = torch.arange(b, device=device)[:, None, None]                                   # B, 1, 1
    crops = padded[batch, rows[:, :, None], cols[:, None, :]]                               # B, H, W, 3
    return crops.permute(0, 3, 1, 2).contiguous()                                           # B, 3, H, W


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A crop of 8-100 % of the area with aspect 3/4-4/3 at a uniform place, resized to the input's
    size (bilinear), flipped with p = 0.5: per image, on the device, as one affine grid_sample.

    The batch-wise twin of RandomResizedCrop + RandomHorizontalFlip on uint8 [B, 3, S, S], except
    that a crop wider or taller than the image is clamped to it (torchvision draws again). Returns
    float [B, 3, S, S] in 0..255.
    """
    b, _, height, width = images.shape
    device = images.device
    area = torch.empty(b, device=device).uniform_(0.08, 1.0, generator=generator)                   # B
    ratio = torch.empty(b, device=device).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    crop_w, crop_h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)      # B, B
    centre = (torch.rand(2, b, generator=generator, device=device) * 2 - 1) * (1 - torch.stack([crop_w, crop_h]))
    flip = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)         # B
    theta = torch.zeros(b, 2, 3, device=device)  # output (x, y) in [-1, 1] -> input (x, y)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, centre[0]
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, centre[1]
    grid = F.affine_grid(theta, [b, 3, height, width], align_corners=False)                         # B, S, S, 2
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalization_of(dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the Normalize transform of the data set's transform; CIFAR-10's for a data
    set without one (a bare array set, as the DeviceLoader always assumed before)."""
    steps = getattr(getattr(dataset, "transform", None), "transforms", [])
    normalize = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    if normalize is None:
        return CIFAR10_MEAN, CIFAR10_STD
    return tuple(normalize.mean), tuple(normalize.std)


def decoded_images(dataset: Dataset, train: bool) -> np.ndarray:
    """The data set's images as uint8 [N, S, S, 3]: a CIFAR set's own array, or an ImageFolder's
    files decoded and brought to the size of its transform (training: shorter side to S and the
    centre crop, from which the device's random-resized crop draws, where the DataLoader's draws
    from the whole file; test: the test transform's own resize and crop)."""
    if hasattr(dataset, "data"):
        return dataset.data
    size = next(t.size for t in dataset.transform.transforms
                if isinstance(t, (transforms.RandomResizedCrop, transforms.CenterCrop)))
    geometry = [transforms.Resize(list(size)[0], antialias=True), transforms.CenterCrop(size)] if train else \
        [t for t in dataset.transform.transforms if isinstance(t, (transforms.Resize, transforms.CenterCrop))]
    resize = transforms.Compose(geometry)
    return np.stack([np.asarray(resize(dataset.loader(path).convert("RGB"))) for path, _ in dataset.samples])


class DeviceLoader:
    """Batches of a data set made on the device, without worker processes.

    The uint8 images move to the device once (150 MB for CIFAR-10's training set; an ImageFolder
    is decoded first, see decoded_images); each epoch draws its order and augmentation from
    ``generator`` (a generator on the same device), so no step waits for the host: at 32x32 the
    pad-4 crop and flip of train_transform(), above it the random-resized crop and flip. Yields
    normalised float images and labels, like the DataLoader with the data set's training
    transform (``train=True``: shuffled, augmented, last partial batch dropped) or its test
    transform (in order, every image).
    """

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, train: bool,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.rank, self.world = rank, world  # under torchrun: this process's share of every epoch
        images = torch.from_numpy(decoded_images(dataset, train))                                  # N, S, S, 3
        self.images = images.to(device).permute(0, 3, 1, 2).contiguous()                          # N, 3, S, S
        self.labels = torch.as_tensor(dataset.targets, device=device)                             # N
        self.generator = generator if generator is not None else torch.Generator(device=device)
        mean, std = normalization_of(dataset)
        self.mean = 255 * torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(std, device=device).view(1, 3, 1, 1)
        # as in build_loaders: a last batch of one image would break BatchNorm on the 1x1 maps of c5
        self.drop_last = train and len(self.labels) > batch_size * world

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> augmented [B, 3, S, S] (0..255)."""
        if images.shape[-1] > CIFAR_SIZE:
            return random_resized_crop_flip(images, self.generator)
        return random_crop_flip(images, self.generator)

    def __len__(self) -> int:
        if not self.train:  # every rank's share of the test set, each image once
            return -(-len(shard(len(self.labels), self.rank, self.world)) // self.batch_size)
        count, global_batch = len(self.labels), self.batch_size * self.world
        return count // global_batch if self.drop_last else -(-count // global_batch)

    def __iter__(self):
        """Training: every rank draws the same order and crops of each global batch (batch size x
        world size images) and keeps every world-th image from its rank on, so the ranks' batches
        together are the batch a single process with the global batch size would see."""
        count, device = len(self.labels), self.images.device
        if not self.train:
            order = torch.as_tensor(shard(count, self.rank, self.world), device=device)
            for step in range(len(self)):
                index = order[step * self.batch_size:(step + 1) * self.batch_size]
                yield (self.images[index].float() - self.mean) / self.std, self.labels[index]  # ToTensor + Normalize
            return
        order = torch.randperm(count, generator=self.generator, device=device)
        global_batch = self.batch_size * self.world
        for step in range(len(self)):
            index = order[step * global_batch:(step + 1) * global_batch]
            images = self.augment(self.images[index])[self.rank::self.world]
            yield (images.float() - self.mean) / self.std, self.labels[index][self.rank::self.world]


class Loaders(NamedTuple):
    train: DataLoader | DeviceLoader
    test: DataLoader | DeviceLoader
    generator: torch.Generator  # fixes the training order and augmentation
    val: DataLoader | DeviceLoader | None  # VAL_SIZE held-out training images; None without


def build_loaders(config: dict, device: torch.device, rank: int = 0, world: int = 1) -> Loaders:
    """Train, test and validation loaders, and the generator of the training order and augmentation.

    With GPU_LOADER on (by default on CUDA) they are DeviceLoaders and the generator lives on the device.
    Under torchrun (``world`` > 1) each rank gets its share: training batches from a
    DistributedSampler (the DeviceLoader: every world-th image of each global batch; the same
    number of batches on every rank either way), and test (and validation) images rank, rank + world,
    ..., so that together the ranks see every test image exactly once.
    """
    train_set, test_set = build_datasets(config)
    train_set, val_set = hold_out(train_set, test_set, config["val_size"], config["seed"])
    sets = (train_set, test_set) + ((val_set,) if val_set is not None else ())
    if switched_on(config["gpu_loader"], device) and fits_on_device(sets, config["image_size"], device):
        generator = torch.Generator(device=device)

        def evaluated(dataset):
            return DeviceLoader(dataset, config["batch_size"], device, train=False, rank=rank, world=world)
        train_loader = DeviceLoader(train_set, config["batch_size"], device, train=True, generator=generator,
                                    rank=rank, world=world)
    else:
        generator = torch.Generator()
        common = dict(batch_size=config["batch_size"], num_workers=config["num_workers"],
                      pin_memory=device.type == "cuda")

        def evaluated(dataset):
            return DataLoader(dataset, sampler=shard(len(dataset), rank, world), **common)
        # drop_last: a last batch of one image would break BatchNorm on the 1x1 maps of c5
        if world == 1:
            train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > config["batch_size"],
                                      generator=generator, **common)
        else:  # the sampler shuffles by (SEED, epoch); the workers' seeds come from the rank's own global RNG
            sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=config["seed"], drop_last=True)
            train_loader = DataLoader(train_set, sampler=sampler, drop_last=len(sampler) > config["batch_size"],
                                      **common)
    return Loaders(train_loader, evaluated(test_set), generator, evaluated(val_set) if val_set is not None else None)


def fits_on_device(sets: tuple[Dataset, ...], size: int, device: torch.device) -> bool:
    """Whether the decoded uint8 images of the data sets take at most half of the device's free
    memory (the host's available memory for the CPU); prints on stderr when they do not."""
    needed = sum(len(dataset) for dataset in sets) * 3 * size * size
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return True
    if needed <= free / 2:
        return True
    print(f"warning: the decoded images need {needed / 2 ** 30:.1f} GiB, more than half of the "
          f"{free / 2 ** 30:.1f} GiB free on {device}; loading them with the DataLoader instead", file=sys.stderr)
    return False


def shard(count: int, rank: int, world: int) -> range:
    """The indices of `count` items that rank `rank` of `world` handles: each exactly once over all ranks."""
    return range(rank, count, world)


def seed_epoch(generator: torch.Generator, seed: int, epoch: int, train_loader=None, rank: int = 0) -> None:
    """Make epoch `epoch`'s data order and augmentation depend only on (seed, epoch) (and the rank).

    The generator draws the shuffle and the worker seeds (and, for a DeviceLoader, the crops and
    flips); the global RNG drives the DataLoader's augmentation when NUM_WORKERS is 0. Seeding both per epoch is what lets a resumed run see the same data.
    Under torchrun the generator is the same on every rank (a DeviceLoader's shared order), the
    global RNG differs per rank (the DataLoader's augmentation and worker seeds), and a
    DistributedSampler of `train_loader` is told the epoch.
    """
    epoch_seed = seed * 100_003 + epoch
    generator.manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed + 1_000_003 * rank)
    if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
        train_loader.sampler.set_epoch(epoch)


def denormalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def sample_grid(train_set: Dataset, seed: int, count: int = 64) -> torch.Tensor:
    """A [3, H, W] grid of augmented training images, drawn without touching the run's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        images = torch.stack([train_set[i][0] for i in range(min(count, len(train_set)))])
    return utils.make_grid(denormalize(images, *normalization_of(train_set)), nrow=8, padding=2)
