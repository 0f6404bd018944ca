"""Shared pieces of the test suite: the repository on sys.path, a small synthetic data set, a
helper that runs main_general.py as a user would, and the `gpu` marker (skipped without CUDA)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# flags of a smoke run: tiny synthetic data, tiny batches, capped batches per epoch, CPU
SMOKE_FLAGS = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32",
               "--batch-size", "8", "--max-batches", "2", "--num-workers", "0", "--device", "cpu"]


def run_main(args: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python main_general.py ARGS` in `cwd`, with stdout and stderr captured as text."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, os.path.join(ROOT, "main_general.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def refused_settings(argv: list[str], capsys) -> str:
    """Parse `argv` as main_general.py does; assert exit status 2 and one stderr line; return it."""
    import user_input

    with pytest.raises(SystemExit) as exit_info:
        user_input.parse_config(argv, prog="main_general.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main_general.py: error: ")
    return err


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (run them alone with `python -m pytest -m gpu`); "
                                       "skipped where CUDA is absent")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """DATA_DIR holding a small synthetic set (train 200, test 100, seed 0)."""
    import data_preprocessing

    data_dir = str(tmp_path_factory.mktemp("data"))
    data_preprocessing.write_synthetic(data_dir, 200, 100, seed=0)
    return data_dir


def write_cifar100(root: str, train_size: int, test_size: int, seed: int = 0) -> str:
    """A tiny CIFAR-100 in its on-disk format, root/cifar-100-python/{train,test,meta}; fine class i
    belongs to superclass i // 5 here. Read it with torchvision's md5 checks switched off
    (`cifar100_without_md5`)."""
    import pickle

    import numpy as np

    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, size in (("train", train_size), ("test", test_size)):
        fine = [i % 100 for i in range(size)]
        batch = {"filenames": [f"{i}.png" for i in range(size)], "batch_label": f"{name} batch",
                 "fine_labels": fine, "coarse_labels": [label // 5 for label in fine],
                 "data": rng.integers(0, 256, (size, 3072), dtype=np.uint8)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"super{i:02d}" for i in range(20)]}, f)
    return folder


@pytest.fixture
def cifar100_without_md5(monkeypatch):
    """torchvision's CIFAR100 reading files this suite wrote: the md5 of each file is not checked."""
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", None]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", None]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": None})


def write_image_folder(root: str, classes: int = 3, per_class: int = 4) -> str:
    """root/train/<class>/*.png and root/val/<class>/*.png: solid colours with a bar, in two sizes
    (40x30 and 70x90 pixels), so that every image is resized."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for label in range(classes):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                height, width = (30, 40) if i % 2 else (90, 70)
                pixels = np.full((height, width, 3), 60 * label + 40, np.uint8)
                pixels[:, : width // 3, i % 3] = 255
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root
