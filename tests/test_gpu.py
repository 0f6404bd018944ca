"""CUDA: every model and precision trains, the CUDA-graph and compiled steps equal the eager one,
the device loader, no host sync inside an epoch, an end-to-end run with resume and nntest,
non-finite losses, torchrun with one process, out-of-memory, benchmark.py. Run them alone with
`python -m pytest -m gpu` (benchmarks/gpu_check.sh does); all skip where CUDA is absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import cuda_graph
import data_preprocessing
import main_general
import model_preparation as prep
import nntrain
import user_input
from conftest import ROOT, SMOKE_FLAGS, run_main
from test_speed_paths import coordinate_image, decode, reference_crop

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
MODELS = [("baseline", "absolute"), ("lambda", "absolute"), ("lambda", "relative"), ("lambda", "conv")]
GPU_FLAGS = [flag if flag != "cpu" else "cuda" for flag in SMOKE_FLAGS]


def cuda_config(synthetic_root: str, **settings) -> dict:
    config = dict(user_input.defaults(), dataset="synthetic", data_dir=synthetic_root, synthetic_train_size=200,
                  synthetic_test_size=100, batch_size=16, device="cuda", **settings)
    user_input.validate(config)
    return config


def train_steps(training: prep.Training, steps: int, epoch: int = 0) -> float:
    """Mean loss of `steps` steps of the run's own loop."""
    data_preprocessing.seed_epoch(training.generator, 0, epoch)
    return nntrain.train(training.model, training.train_loader, training.criterion, training.optimizer, CUDA, epoch,
                         steps, channels_last=training.channels_last, step=training.step)[0]


@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("model, position", MODELS)
def test_one_step_of_every_model_and_precision(synthetic_root, model, position, amp):
    torch.manual_seed(0)
    training = prep.build_training(cuda_config(synthetic_root, model=model, lambda_position=position, amp=amp,
                                               compile="off"), CUDA)
    assert training.channels_last and isinstance(training.train_loader, data_preprocessing.DeviceLoader)
    assert training.scaler.is_enabled() == (amp == "fp16")
    loss = train_steps(training, 1)
    assert loss == loss and loss < 10  # finite
    steps = {state["step"].item() for state in training.optimizer.state.values()}
    # fp16: the scaler skips a first step whose gradients overflow at its initial scale, and lowers the scale
    assert steps == {1} or (amp == "fp16" and steps == {0} and training.scaler.get_scale() < 2.0 ** 16)


@pytest.mark.parametrize("model, position", MODELS)
def test_graphed_training_equals_eager_training(synthetic_root, model, position, monkeypatch):
    """Six steps (three eager warm-up steps, a capture, replays), then a learning-rate change."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same kernels in both runs
    results = {}
    for mode in ("off", "graph"):
        torch.manual_seed(0)
        training = prep.build_training(cuda_config(synthetic_root, model=model, lambda_position=position,
                                                   amp="fp32", compile=mode), CUDA)
        losses = [train_steps(training, 2, epoch) for epoch in range(3)]  # 6 steps
        weights = [p.detach().clone() for p in training.model.parameters()]
        results[mode] = losses, weights, training
    (eager_losses, eager_weights, _), (losses, weights, graphed) = results["off"], results["graph"]
    assert isinstance(graphed.step, cuda_graph.GraphedStep) and graphed.step.graph is not None
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    for graph_weight, eager_weight in zip(weights, eager_weights):
        torch.testing.assert_close(graph_weight, eager_weight, rtol=1e-2, atol=2e-3)
    for group in graphed.optimizer.param_groups:  # the schedule fills the captured learning rate in place
        group["lr"].fill_(0.0)
    before = [p.detach().clone() for p in graphed.model.parameters()]
    train_steps(graphed, 2, 3)
    assert graphed.step.eager_steps == cuda_graph.WARMUP_STEPS  # replays only: no recapture
    assert all(torch.equal(a, b) for a, b in zip(before, graphed.model.parameters()))  # lr 0: nothing moves


def test_graphed_step_trains_a_partial_batch_eagerly_and_catches_non_finite_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).to(CUDA)
    optimizer = prep.build_optimizer(model, user_input.defaults())
    step = cuda_graph.GraphedStep(nntrain.EagerStep(model, nn.CrossEntropyLoss(), optimizer))
    batches = [(torch.randn(8, 3, 8, 8, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)) for _ in range(6)]
    batches.append((torch.randn(3, 3, 8, 8, device=CUDA), torch.randint(0, 10, (3,), device=CUDA)))  # partial
    nntrain.train(model, batches, None, optimizer, CUDA, 0, step=step)
    assert step.graph is not None and step.eager_steps == cuda_graph.WARMUP_STEPS + 1
    batches[5] = (torch.full((8, 3, 8, 8), float("nan"), device=CUDA), batches[5][1])
    with pytest.raises(nntrain.NonFiniteLossError, match="in epoch 2, step 6 "):
        nntrain.train(model, batches, None, optimizer, CUDA, 1, step=step)


@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_step_equals_the_eager_step(mode):
    images, labels = torch.randn(16, 3, 16, 16, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    results = []
    for compile_mode in ("off", mode):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(16, 10)).to(CUDA)
        model = prep.speed_up(net, dict(user_input.defaults(), compile=compile_mode, amp="fp32", channels_last="on"), CUDA)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = prep.training_step(model, nn.CrossEntropyLoss(), optimizer, prep.autocast("fp32", CUDA),
                                  prep.build_scaler("fp32", CUDA), compile_mode)
        losses = [step(images, labels)[1].clone() for _ in range(3)]
        results.append((torch.stack(losses), [p.detach().clone() for p in net.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-3, atol=1e-4)
    for compiled, eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("model, position, compile_mode", [("baseline", "absolute", "graph"),
                                                         ("lambda", "relative", "off"), ("lambda", "conv", "off")])
def test_no_host_sync_inside_an_epoch(synthetic_root, monkeypatch, model, position, compile_mode):
    """torch.cuda.set_sync_debug_mode("error") from the epoch's first step to its last: nothing in
    the loop (device loader, graphed step, sums, non-finite check) waits for the device, nor do the
    lambda layers' eager steps (E gathered from the relative table and the conv kernel, the 3D conv)."""
    training = prep.build_training(cuda_config(synthetic_root, amp="bf16", compile=compile_mode, model=model,
                                               lambda_position=position), CUDA)
    train_steps(training, 0)  # epoch 1: cuDNN autotuning, warm-up and capture (these may sync)
    assert (getattr(training.step, "graph", None) is not None) == (compile_mode == "graph")
    monkeypatch.setattr(nntrain, "READ_EVERY_S", float("inf"))
    calls = []

    def guarded_synchronize(device):  # train() calls it right before its first step and after its last
        if calls:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        if not calls:
            torch.cuda.set_sync_debug_mode("error")
        calls.append(device)
    monkeypatch.setattr(nntrain, "synchronize", guarded_synchronize)
    try:
        train_steps(training, 0, epoch=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2


def test_device_loader_on_cuda_keeps_labels_and_repeats_with_the_seed(synthetic_root):
    config = cuda_config(synthetic_root, gpu_loader="on")
    train_loader, test_loader, generator = data_preprocessing.build_loaders(config, CUDA)
    assert train_loader.images.is_cuda and generator.device.type == "cuda"
    images, labels = next(iter(test_loader))  # in order, normalised as torchvision does on the CPU
    reference = torch.stack([test_loader.dataset[i][0] for i in range(len(labels))])
    torch.testing.assert_close(images.cpu(), reference, atol=1e-5, rtol=0)
    assert labels.tolist() == test_loader.dataset.targets[:len(labels)]
    epochs = []
    for _ in range(2):
        data_preprocessing.seed_epoch(generator, 0, 0)
        epochs.append([(x.clone(), y.clone()) for x, y in train_loader])
    for (a, la), (b, lb) in zip(*epochs):
        assert torch.equal(a, b) and torch.equal(la, lb)
    crops = data_preprocessing.random_crop_flip(coordinate_image().to(CUDA).expand(900, 3, 32, 32), generator).cpu()
    decoded = [decode(crop) for crop in crops]  # the CPU test's decoding of crop offsets and flips
    for crop, (offset_y, offset_x, flipped) in zip(crops[:100], decoded):
        assert torch.equal(crop, reference_crop(coordinate_image(), offset_y, offset_x, flipped))
    offsets_y, offsets_x, flips = zip(*decoded)
    assert set(offsets_y) == set(offsets_x) == set(range(9)) and 0.4 < sum(flips) / len(flips) < 0.6


def test_end_to_end_run_resume_and_nntest(tmp_path):
    args = [*GPU_FLAGS, "--model", "baseline", "--synthetic-train-size", "256", "--max-batches", "0",
            "--batch-size", "32", "--epochs", "2", "--run-name", "gpu"]
    first = run_main(args, cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    log = (tmp_path / "runs" / "Baseline" / "gpu" / "log.txt").read_text()
    amp = prep.resolve_amp("auto", CUDA)  # bf16 from compute capability 8.0, fp16 (and no graph) below
    assert f"amp {amp}" in log and f"compile {'off' if amp == 'fp16' else 'graph'}" in log
    assert "channels_last True" in log and "device loader True" in log
    resumed = run_main([*args[:-4], "--epochs", "3", "--resume", "latest"], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "Baseline" / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and all(r["train_loss"] == r["train_loss"] for r in records)
    last = tmp_path / "checkpoints" / "Baseline" / "gpu" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    evaluated = subprocess.run([sys.executable, os.path.join(ROOT, "nntest.py"), "--checkpoint", str(last)],
                               cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, PYTHONPATH=ROOT))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "top-1" in evaluated.stdout


def test_torchrun_with_one_nccl_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(ROOT, "main_general.py"), *GPU_FLAGS, "--model", "baseline", "--epochs", "1",
               "--run-name", "ddp"]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "runs" / "Baseline" / "ddp" / "log.txt").read_text()
    assert "torchrun: 1 processes (nccl)" in log and "compile off" in log  # no CUDA graph under DDP


def test_out_of_memory_is_one_line(tmp_path, capsys):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 ** 30 / total))  # as if the card had 1 GiB
    try:
        status = main_general.main([*GPU_FLAGS, "--model", "baseline", "--batch-size", "4096", "--max-batches", "1",
                                    "--synthetic-train-size", "4096", "--epochs", "1", "--data-dir", str(tmp_path / "data"),
                                    "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "checkpoints"),
                                    "--compile", "off"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    err = capsys.readouterr().err
    assert status == 2 and err.count("error") == 1 and "Traceback" not in err, err
    name = torch.cuda.get_device_properties(0).name
    assert err.splitlines()[-1].startswith(f"main_general.py: error: out of memory: BATCH_SIZE=4096 does not fit "
                                           f"on the {name} ({total / 2 ** 30:.1f} GiB)")


def test_quick_benchmark_on_cuda(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--device", "cuda", "--quick", "--out", str(out),
               "--sizes", "8", "--epoch-train-size", "64", "--epoch-test-size", "32", "--epoch-models", "baseline,conv"]
    result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["machine"]["device"].startswith("cuda")
    assert all(m["train_img_s"] > 0 for m in report["models"])
    assert [(e["model"], e["lambda_position"]) for e in report["epochs"]] == [("baseline", "-"), ("lambda", "conv")]
    assert all(e["train_img_per_s"] > 0 and e["projected_90_epochs_s"] > 0 for e in report["epochs"])
