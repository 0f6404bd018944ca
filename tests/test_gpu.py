"""CUDA: every model and precision trains; the CUDA-graph step trains as the eager one over
epochs (bf16, fp32, fp16), uses one warm-up stream, returns outputs a replay leaves alone and fails
its capture in one error; compiled lambda models train as eager ones; the device loader; no host
sync inside an epoch; an end-to-end run with resume and nntest; non-finite losses; torchrun with
one process; out-of-memory; benchmark.py. Run them alone with `python -m pytest -m gpu`
(benchmarks/gpu_check.sh does, in three steps: "compiled" tests, runs in subprocesses, the rest);
all skip where CUDA is absent."""
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
import distributed
import main_general
import model_preparation as prep
import nntest
import nntrain
import speed
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
    return nntrain.train(training.step, training.train_loader, CUDA, epoch, steps,
                         channels_last=training.speed.channels_last)[0]


@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("model, position", MODELS)
def test_one_step_of_every_model_and_precision(synthetic_root, model, position, amp):
    torch.manual_seed(0)
    training = prep.build_training(cuda_config(synthetic_root, model=model, lambda_position=position, amp=amp,
                                               compile="off"), CUDA)
    assert training.speed.channels_last and isinstance(training.train_loader, data_preprocessing.DeviceLoader)
    assert training.scaler.is_enabled() == (amp == "fp16")
    loss = train_steps(training, 1)
    assert loss == loss and loss < 10  # finite
    steps = {state["step"].item() for state in training.optimizer.state.values()}
    # fp16: the scaler skips a first step whose gradients overflow at its initial scale, and lowers the scale
    assert steps == {1} or (amp == "fp16" and steps == {0} and training.scaler.get_scale() < 2.0 ** 16)


GRAPH_CASES = [(*model, "bf16") for model in MODELS] + [("baseline", "absolute", "fp32"), ("lambda", "conv", "fp32"),
                                                        ("baseline", "absolute", "fp16")]
EPOCHS = 3  # 12 steps each (200 images, batch 16): warm-up, capture and replays in the first, then new learning rates
STEPS_PER_EPOCH = 200 // 16
DRIFT = 0.05  # graph against eager: distance of weights, BatchNorm statistics and Adam moments / their own size


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().double().flatten() for tensor in tensors])


def drift(tensors, eager, reference) -> float:
    """|tensors - eager| / |reference|, each list taken as one vector."""
    return ((flat(tensors) - flat(eager)).norm() / flat(reference).norm().clamp_min(1e-12)).item()


def run_epoch(config: dict, training: prep.Training, epoch: int) -> dict:
    """An epoch as main_general.py trains it: the learning rate read first (a device tensor under the
    graph), the training epoch, the evaluation, the schedule's step."""
    data_preprocessing.seed_epoch(training.generator, config["seed"], epoch, training.train_loader)
    lr = float(training.optimizer.param_groups[0]["lr"])
    train_loss = nntrain.train(training.step, training.train_loader, CUDA, epoch,
                               channels_last=training.speed.channels_last)[0]
    test_loss, test_acc, _ = nntest.evaluate_confusion(training.model, training.test_loader, training.criterion, CUDA,
                                                       autocast=training.speed.autocast(),
                                                       channels_last=training.speed.channels_last)
    training.scheduler.step()
    return {"lr": lr, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc}


def trained(synthetic_root, model: str, position: str, amp: str, mode: str):
    """(training, epoch records, initial state_dict): EPOCHS epochs (run_epoch) from seed 0, then one
    eager step on a partial batch."""
    config = cuda_config(synthetic_root, model=model, lambda_position=position, amp=amp, compile=mode, epochs=EPOCHS,
                         warmup_epochs=1)
    torch.manual_seed(0)
    training = prep.build_training(config, CUDA)
    initial = {key: value.detach().clone() for key, value in training.model.state_dict().items()}
    records = [run_epoch(config, training, epoch) for epoch in range(EPOCHS)]
    images, labels = next(iter(training.train_loader))
    training.step(images[:5].contiguous(memory_format=training.speed.memory_format), labels[:5])  # a last partial batch: eager
    return training, records, initial


def assert_states_close(state: dict, eager_state: dict, initial: dict) -> None:
    """BatchNorm's step counts equal; weights and running statistics within DRIFT of how far eager
    training moved them."""
    counts = [key for key in eager_state if key.endswith("num_batches_tracked")]
    assert all(state[key].item() == eager_state[key].item() for key in counts)
    groups = {"running statistics": [key for key in eager_state if key.endswith(("running_mean", "running_var"))]}
    groups["weights"] = [key for key in eager_state if key not in counts and key not in groups["running statistics"]]
    for name, keys in groups.items():
        moved = [eager_state[key] - initial[key] for key in keys]
        assert drift([state[k] for k in keys], [eager_state[k] for k in keys], moved) < DRIFT, name


def assert_adam_close(optimizer: torch.optim.Optimizer, eager_optimizer: torch.optim.Optimizer) -> None:
    """Adam's step counts equal, its moments within DRIFT of their size."""
    adam, eager_adam = optimizer.state_dict()["state"], eager_optimizer.state_dict()["state"]
    assert [s["step"].item() for s in adam.values()] == [s["step"].item() for s in eager_adam.values()]
    for moment in ("exp_avg", "exp_avg_sq"):
        ours, theirs = [s[moment] for s in adam.values()], [s[moment] for s in eager_adam.values()]
        assert drift(ours, theirs, theirs) < DRIFT, moment


@pytest.mark.parametrize("model, position, amp", GRAPH_CASES)
def test_graphed_training_equals_eager_training(synthetic_root, model, position, amp, monkeypatch):
    """EPOCHS epochs with the real schedule (LambdaLR fills the captured learning rate in place),
    evaluation, then an eager partial batch after the capture: weights, BatchNorm buffers, Adam's
    state, the fp16 scale, losses and test accuracy as in eager training."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same kernels in both runs
    eager, eager_records, initial = trained(synthetic_root, model, position, amp, "off")
    graphed, records, _ = trained(synthetic_root, model, position, amp, "graph")
    assert isinstance(graphed.step, cuda_graph.GraphedStep) and graphed.step.graph is not None
    assert graphed.step.eager_steps == cuda_graph.WARMUP_STEPS + 1  # warm-up and the partial batch: no recapture
    assert [r["lr"] for r in records] == pytest.approx([r["lr"] for r in eager_records], rel=1e-6)
    assert len({r["lr"] for r in records}) == EPOCHS  # the schedule changed the captured learning rate
    assert [r["train_loss"] for r in records] == pytest.approx([r["train_loss"] for r in eager_records], rel=2e-2)
    assert [r["test_loss"] for r in records] == pytest.approx([r["test_loss"] for r in eager_records], rel=5e-2)
    for record, eager_record in zip(records, eager_records):
        assert abs(record["test_acc"] - eager_record["test_acc"]) <= 5.0, (records, eager_records)
    state = graphed.model.state_dict()
    assert state["bn1.num_batches_tracked"].item() == EPOCHS * STEPS_PER_EPOCH + 1
    assert_states_close(state, eager.model.state_dict(), initial)
    assert_adam_close(graphed.optimizer, eager.optimizer)
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()  # fp16: the same steps skipped (else 1.0)


class StreamRecordingStep(nntrain.EagerStep):
    """An EagerStep that records the CUDA stream each of its calls ran on."""

    def __init__(self, *pieces):
        super().__init__(*pieces)
        self.streams = []

    def __call__(self, images, labels, check=None):
        self.streams.append(torch.cuda.current_stream().cuda_stream)
        return super().__call__(images, labels, check)


def small_graphed_step(criterion=None) -> tuple[nn.Module, torch.optim.Optimizer, cuda_graph.GraphedStep]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).to(CUDA)
    optimizer = prep.build_optimizer(model, user_input.defaults())
    step = StreamRecordingStep(model, criterion or nn.CrossEntropyLoss(), optimizer)
    return model, optimizer, cuda_graph.GraphedStep(step)


def small_batches(count: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(size, 3, 8, 8, device=CUDA), torch.randint(0, 10, (size,), device=CUDA)) for _ in range(count)]


def test_graphed_step_trains_a_partial_batch_eagerly_and_catches_non_finite_losses():
    """Warm-up on one side stream, the partial batch after the capture on the current stream."""
    _, _, step = small_graphed_step()
    batches = small_batches(6) + small_batches(1, size=3)  # the last one partial
    nntrain.train(step, batches, CUDA, 0)
    assert step.graph is not None and step.eager_steps == cuda_graph.WARMUP_STEPS + 1
    streams, current = step.step.streams, torch.cuda.current_stream().cuda_stream
    warm_up, capture, partial = streams[:cuda_graph.WARMUP_STEPS], streams[cuda_graph.WARMUP_STEPS], streams[4:]
    assert len(set(warm_up)) == 1 and warm_up[0] != current  # one side stream, made once
    assert capture not in (current, warm_up[0]) and partial == [current]  # torch.cuda.graph's own stream, then ours
    batches[5] = (torch.full((8, 3, 8, 8), float("nan"), device=CUDA), batches[5][1])
    with pytest.raises(nntrain.NonFiniteLossError, match="in epoch 2, step 6 "):
        nntrain.train(step, batches, CUDA, 1)


def test_replayed_logits_and_loss_outlive_the_next_replay():
    _, _, step = small_graphed_step()
    batches = small_batches(6)
    for images, labels in batches[:4]:  # warm-up, then the capture (and its first replay)
        step(images, labels)
    logits, loss = step(*batches[4])
    kept = logits.clone(), loss.clone()
    step(*batches[5])  # overwrites the graph's own outputs
    assert not torch.equal(step.logits, kept[0])
    assert torch.equal(logits, kept[0]) and torch.equal(loss, kept[1])


COMPILED_CASES = [(position, mode) for position in ("relative", "conv") for mode in ("default", "reduce-overhead")]


@pytest.mark.parametrize("position, mode", COMPILED_CASES)
def test_compiled_step_equals_the_eager_step(synthetic_root, position, mode, monkeypatch):
    """A lambda ResNet-26 (the ResNet-50's layers in half the blocks: less to compile) under
    torch.compile trains 4 steps of the run's own loop with the run's fused Adam as eager fp32 does
    (reduce-overhead: warm-up, recording, then replays)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runs = {}
    for compile_mode in ("off", mode):
        torch.manual_seed(0)
        training = prep.build_training(cuda_config(synthetic_root, model="lambda", lambda_position=position, depth=26,
                                                   amp="fp32", compile=compile_mode), CUDA)
        initial = {key: value.detach().clone() for key, value in distributed.unwrap(training.model).state_dict().items()}
        data_preprocessing.seed_epoch(training.generator, 0, 0)
        losses = nntrain.train(training.step, training.train_loader, CUDA, 0, 4,
                               channels_last=training.speed.channels_last)[0]
        runs[compile_mode] = training, losses, initial
    (eager, eager_loss, initial), (compiled, loss, _) = runs["off"], runs[mode]
    assert compiled.speed.compile == mode and compiled.optimizer.defaults["fused"]
    assert loss == pytest.approx(eager_loss, rel=1e-2)
    assert_states_close(distributed.unwrap(compiled.model).state_dict(), eager.model.state_dict(), initial)
    assert_adam_close(compiled.optimizer, eager.optimizer)
    assert {s["step"].item() for s in compiled.optimizer.state.values()} == {4.0}


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
    train_loader, test_loader, generator, _ = data_preprocessing.build_loaders(config, CUDA)
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
    amp = speed.resolve_amp("auto", CUDA)  # bf16 from compute capability 8.0, fp16 (and no graph) below
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


def test_a_failed_capture_is_a_capture_error_that_leaves_the_device_usable():
    """A loss read by the host (a sync: no capture allows it) fails the capture: a CaptureError
    naming --compile off, the current stream restored, and the process can still train eagerly."""
    def host_reading_loss(logits, labels):
        loss = nn.functional.cross_entropy(logits, labels)
        loss.item()
        return loss
    model, optimizer, step = small_graphed_step(host_reading_loss)
    batches = small_batches(4)
    for images, labels in batches[:cuda_graph.WARMUP_STEPS]:
        step(images, labels)
    with pytest.raises(cuda_graph.CaptureError, match="--compile off"):
        step(*batches[3])
    assert torch.cuda.current_stream() == torch.cuda.default_stream() and not torch.cuda.is_current_stream_capturing()
    with pytest.raises(cuda_graph.CaptureError):
        step(*batches[3])  # no eager training in a process whose capture failed
    eager = nntrain.EagerStep(model, nn.CrossEntropyLoss(), optimizer)
    losses = [eager(*batch)[1] for batch in batches]
    torch.cuda.synchronize()
    assert all(torch.isfinite(loss) for loss in losses)
