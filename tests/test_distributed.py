"""torchrun: two CPU processes with gloo train one run, written by rank 0 only, whose checkpoint a
single process resumes and evaluates; one process under torchrun is a torchrun run too; and the
per-rank sharding of the data."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data_preprocessing
import nntest
from conftest import ROOT, SMOKE_FLAGS, run_main

TEST_SIZE = 25  # odd: a padding sampler would evaluate 26 images on 2 ranks


def ddp_flags(epochs: int) -> list[str]:
    """SMOKE_FLAGS without the batch cap, on a 25-image test set: 4 train steps per rank, every test image."""
    flags = list(SMOKE_FLAGS)
    flags[flags.index("--synthetic-test-size") + 1] = str(TEST_SIZE)
    flags[flags.index("--max-batches") + 1] = "0"
    return [*flags, "--epochs", str(epochs), "--num-threads", "1", "--model", "baseline"]


def torchrun(args: list[str], cwd: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", os.path.join(ROOT, "main_general.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_write_one_run_that_one_process_resumes(tmp_path):
    result = torchrun([*ddp_flags(2), "--run-name", "ddp"], str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 x 2 = 16 images per step" in result.stdout
    assert result.stdout.count("epoch   1/2") == 1  # rank 1 prints nothing

    assert os.listdir(tmp_path / "runs" / "Baseline") == ["ddp"]
    assert os.listdir(tmp_path / "checkpoints" / "Baseline") == ["ddp"]
    run_dir, checkpoint_dir = tmp_path / "runs" / "Baseline" / "ddp", tmp_path / "checkpoints" / "Baseline" / "ddp"
    assert len(glob.glob(str(run_dir / "events.out.tfevents.*"))) == 1
    assert sorted(p for p in os.listdir(run_dir) if not p.startswith("events")) == [
        "config.json", "log.txt", "metrics.jsonl", "samples.png"]
    assert sorted(os.listdir(checkpoint_dir)) == ["best.pt", "last.pt"]
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert len(lines) == len(set(lines))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["test_images"] == TEST_SIZE for r in records)

    # the reduced test metrics are those of one process evaluating rank 0's model on the whole set
    checkpoint = torch.load(checkpoint_dir / "last.pt", weights_only=False)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    single = nntest.evaluate_checkpoint(str(checkpoint_dir / "last.pt"), {}, str(tmp_path / "eval"))
    assert int(single["confusion"].sum()) == TEST_SIZE
    assert single["top1"] == pytest.approx(records[-1]["test_acc"])
    assert single["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-4)

    resumed = run_main([*ddp_flags(3), "--resume", "latest"], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "torchrun" not in resumed.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["test_images"] == TEST_SIZE


def test_torchrun_with_one_process_joins_a_process_group(tmp_path):
    """torchrun --nproc-per-node=1 sets WORLD_SIZE=1: still a torchrun run (gloo on the CPU, as nccl
    on CUDA)."""
    result = torchrun([*ddp_flags(1), "--run-name", "one"], str(tmp_path), processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "runs" / "Baseline" / "one" / "log.txt").read_text()
    assert "torchrun: 1 processes (gloo), global batch 8 x 1 = 8 images per step" in log


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 5, 24, 25, 101])
def test_test_shards_hold_every_index_once(count, world):
    indices = [i for rank in range(world) for i in data_preprocessing.shard(count, rank, world)]
    assert sorted(indices) == list(range(count))


def device_loaders(world: int, batch_size: int, train: bool, dataset) -> list:
    return [data_preprocessing.DeviceLoader(dataset, batch_size, torch.device("cpu"), train,
                                            torch.Generator(), rank, world) for rank in range(world)]


def test_device_loader_shards_are_one_global_batch(synthetic_root):
    """The ranks' training batches of one epoch are the batches of one process with the global batch
    size (same images, crops and flips); test batches hold every image once."""
    train_set, test_set = data_preprocessing.build_datasets(
        {"data_dir": synthetic_root, "dataset": "synthetic", "synthetic_train_size": 200,
         "synthetic_test_size": 100, "seed": 0})
    (single,) = device_loaders(1, 24, True, train_set)
    ranks = device_loaders(3, 8, True, train_set)
    for loader in (single, *ranks):
        data_preprocessing.seed_epoch(loader.generator, seed=0, epoch=4)
    assert len(single) == len(ranks[0]) == 200 // 24
    for whole, *parts in zip(single, *ranks):
        for rank, (images, labels) in enumerate(parts):
            assert torch.equal(images, whole[0][rank::3]) and torch.equal(labels, whole[1][rank::3])

    tests = device_loaders(2, 8, False, test_set)
    assert sum(len(loader) for loader in tests) == 7 + 7  # 50 images per rank in batches of 8
    labels = torch.cat([labels for loader in tests for _, labels in loader])
    images = torch.cat([images for loader in tests for images, _ in loader])
    assert len(labels) == 100
    assert torch.equal(labels.sort().values, torch.as_tensor(test_set.targets).sort().values)
    assert len(torch.unique(images.flatten(1), dim=0)) == 100  # no image twice



def worker_pid(tag: str, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` whose environment holds DDP_TEST_TAG=tag, if it runs."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"DDP_TEST_TAG") == tag.encode() and env.get(b"RANK") == str(rank).encode():
            return int(pid)
    return None


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM: both ranks stop before the same step (no rank waits forever),
    rank 0 says so with a torchrun resume command, and last.pt still loads."""
    tag = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DDP_TEST_TAG=tag)
    flags = [*ddp_flags(50), "--synthetic-train-size", "128", "--run-name", "stop"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", os.path.join(ROOT, "main_general.py"), *flags],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = tmp_path / "runs" / "Baseline" / "stop" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)  # until epoch 1 is logged: both ranks are training
        assert metrics.exists(), "the run did not finish its first epoch"
        os.kill(worker_pid(tag, 1), signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0  # torchrun reports the workers' status 143 as a failure
    assert stderr.count("stopped by") == 1, stderr[-3000:]
    message = next(line for line in stderr.splitlines() if "stopped by" in line)
    assert "resume with: torchrun --nproc-per-node=2 main_general.py" in message
    assert "stopped by a signal to another rank in epoch" in message
    assert "]: Traceback" not in stderr  # no worker traceback (torchrun itself prints one for exit 143)
    checkpoint = torch.load(tmp_path / "checkpoints" / "Baseline" / "stop" / "last.pt", weights_only=False)
    assert 1 <= checkpoint["epoch"] < 50


def _earliest_bad_step_worker(rank: int, init_file: str, cases: list, results) -> None:
    import torch.distributed as dist

    import nntrain

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        found = [int(nntrain.earliest_bad_step(torch.tensor(case[rank])).item()) for case in cases]
        results.put((rank, found))
    finally:
        dist.destroy_process_group()


def test_the_earliest_bad_step_of_any_rank_is_reported(tmp_path):
    """(rank 0's first bad step, rank 1's) -> the step every rank reports; 0 means none."""
    cases = [(5, 3), (3, 5), (0, 4), (4, 0), (0, 0)]
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_earliest_bad_step_worker,
                                 args=(rank, str(tmp_path / "init"), cases, results)) for rank in range(2)]
    for process in processes:
        process.start()
    found = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert found[0] == found[1] == [3, 3, 4, 4, 0]
