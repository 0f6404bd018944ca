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
