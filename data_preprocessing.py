"""CIFAR-10 (or its offline synthetic stand-in), augmentation and data loaders.

Both data sets are read by torchvision's CIFAR10 class from a `cifar-10-batches-py` folder:
CIFAR-10 from DATA_DIR (downloaded when missing), the synthetic set from DATA_DIR/synthetic,
which this module writes in the same pickled format.

Two loaders give the same batches in distribution: torchvision's DataLoader with the transforms
below (worker processes, PIL), and ``DeviceLoader``, which moves the uint8 set to the device once
and augments whole batches there (GPU_LOADER; the default on CUDA).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms, utils
from torchvision.datasets.utils import check_integrity

from user_input import ConfigError, switched_on

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # reproduction, Table 3
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
PADDING = 4  # pad 4 + random 32x32 crop (reproduction, Table 3)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]

# Synthetic classes: sinusoidal stripes told apart by orientation and frequency (cycles per image).
# Random phase makes every pixel's distribution the same in all classes, so no single pixel
# separates them; "diagonal" is +-45 degrees at random, so a horizontal flip keeps the class.
SYNTHETIC_CLASSES = [(orientation, cycles) for cycles in (2, 3.5, 6, 9)
                     for orientation in ("horizontal", "vertical", "diagonal")][:10]
SYNTHETIC_VERSION = 1  # bump when the generator changes, so old files are rewritten


def train_transform() -> transforms.Compose:
    """Pad 4 + random 32x32 crop, horizontal flip p = 0.5, normalise (reproduction, Table 3)."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=PADDING),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


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


def _refuse_damaged_cifar10(folder: str) -> None:
    """ConfigError naming the first file of an existing CIFAR-10 folder that fails its md5 check:
    the user's files are never overwritten by a download."""
    if not os.path.exists(folder):
        return
    cifar = datasets.CIFAR10
    for name, md5 in cifar.train_list + cifar.test_list + [[cifar.meta["filename"], cifar.meta["md5"]]]:
        if not check_integrity(os.path.join(folder, name), md5):
            raise ConfigError(f"CIFAR-10 file {os.path.join(folder, name)} is missing or corrupt (its md5 "
                              f"differs); delete {folder} to download CIFAR-10 again")
    raise ConfigError(f"CIFAR-10 in {folder} cannot be read; delete that folder to download it again")


def _cifar10(root: str, train: bool, transform) -> datasets.CIFAR10:
    """torchvision's CIFAR-10 from root/cifar-10-batches-py, downloading only when it is missing."""
    try:
        return datasets.CIFAR10(root, train=train, transform=transform, download=False)
    except RuntimeError:  # missing, or failing its md5 check
        _refuse_damaged_cifar10(os.path.join(root, FOLDER))
    try:
        return datasets.CIFAR10(root, train=train, transform=transform, download=True)
    except Exception as error:  # offline, unwritable, or a corrupt archive: all fixable by the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"CIFAR-10 not found in {os.path.join(root, FOLDER)} and could not be downloaded ({reason}); "
            f"put the python version of CIFAR-10 there (data_batch_1..5, test_batch, batches.meta) "
            f"or run the offline demo with --dataset synthetic") from None


def build_datasets(config: dict) -> tuple[Dataset, Dataset]:
    """(train, test) data sets with the reproduction's transforms."""
    root = config["data_dir"]
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"DATA_DIR={root!r} is a file; point --data-dir at a folder")
    if config["dataset"] == "cifar10":
        return _cifar10(root, True, train_transform()), _cifar10(root, False, test_transform())
    synthetic_root = write_synthetic(root, config["synthetic_train_size"], config["synthetic_test_size"],
                                     config["seed"])
    try:
        return (SyntheticCIFAR10(synthetic_root, train=True, transform=train_transform()),
                SyntheticCIFAR10(synthetic_root, train=False, transform=test_transform()))
    except Exception as error:
        raise ConfigError(f"could not read the synthetic data in {synthetic_root} ({error}); "
                          f"delete that folder to have it written again") from None


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


class DeviceLoader:
    """Batches of a CIFAR10 data set made on the device, without worker processes.

    The uint8 images move to the device once (150 MB for CIFAR-10's training set); each epoch
    draws its order, crops and flips from ``generator`` (a generator on the same device), so no
    step waits for the host. Yields normalised float images and labels, like the DataLoader with
    train_transform() (``train=True``: shuffled, augmented, last partial batch dropped) or
    test_transform() (in order, every image).
    """

    def __init__(self, dataset: datasets.CIFAR10, batch_size: int, device: torch.device, train: bool,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.rank, self.world = rank, world  # under torchrun: this process's share of every epoch
        self.images = torch.from_numpy(dataset.data).to(device).permute(0, 3, 1, 2).contiguous()  # N, 3, 32, 32
        self.labels = torch.as_tensor(dataset.targets, device=device)                             # N
        self.generator = generator if generator is not None else torch.Generator(device=device)
        self.mean = 255 * torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
        # as in build_loaders: a last batch of one image would break BatchNorm on the 1x1 maps of c5
        self.drop_last = train and len(self.labels) > batch_size * world

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
            images = random_crop_flip(self.images[index], self.generator)[self.rank::self.world]
            yield (images.float() - self.mean) / self.std, self.labels[index][self.rank::self.world]


def build_loaders(config: dict, device: torch.device, rank: int = 0, world: int = 1
                  ) -> tuple[DataLoader | DeviceLoader, DataLoader | DeviceLoader, torch.Generator]:
    """Train and test loaders, and the generator that fixes the training order and augmentation.

    With GPU_LOADER on (by default on CUDA) both are DeviceLoaders and the generator lives on the device.
    Under torchrun (``world`` > 1) each rank gets its share: training batches from a
    DistributedSampler (the DeviceLoader: every world-th image of each global batch; the same
    number of batches on every rank either way), and test images rank, rank + world, ...,
    so that together the ranks see every test image exactly once.
    """
    train_set, test_set = build_datasets(config)
    if switched_on(config["gpu_loader"], device):
        generator = torch.Generator(device=device)
        return (DeviceLoader(train_set, config["batch_size"], device, train=True, generator=generator,
                             rank=rank, world=world),
                DeviceLoader(test_set, config["batch_size"], device, train=False, rank=rank, world=world), generator)
    generator = torch.Generator()
    common = dict(batch_size=config["batch_size"], num_workers=config["num_workers"],
                  pin_memory=device.type == "cuda")
    # drop_last: a last batch of one image would break BatchNorm on the 1x1 maps of c5
    if world == 1:
        train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > config["batch_size"],
                                  generator=generator, **common)
        return train_loader, DataLoader(test_set, shuffle=False, **common), generator
    # the sampler shuffles by (SEED, epoch); the workers' seeds come from the rank's own global RNG
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=config["seed"], drop_last=True)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=len(sampler) > config["batch_size"], **common)
    test_loader = DataLoader(test_set, sampler=shard(len(test_set), rank, world), **common)
    return train_loader, test_loader, generator


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


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def sample_grid(train_set: Dataset, seed: int, count: int = 64) -> torch.Tensor:
    """A [3, H, W] grid of augmented training images, drawn without touching the run's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        images = torch.stack([train_set[i][0] for i in range(min(count, len(train_set)))])
    return utils.make_grid(denormalize(images), nrow=8, padding=2)
