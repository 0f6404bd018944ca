"""Every setting that exists on the CPU trains: one training step of each model, position mode and
hybrid under channels_last on/off and bf16/fp32 through the run's own build_training, the
channels_last conversion of the convolution weights only, COMPILE's choices, a compiled step, and StepChecks
(stop requests and non-finite losses) on its own."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import checkpoints
import cuda_graph
import model_preparation as prep
import nntrain
import speed
import user_input

CPU = torch.device("cpu")

# (model, position, stages, channels_last, amp): each model and mode, hybrids, both layouts and precisions
MATRIX = [
    ("baseline", "absolute", "LLLL", "on", "bf16"),
    ("baseline", "absolute", "LLLL", "off", "fp32"),
    ("lambda", "absolute", "LLLL", "on", "fp32"),
    ("lambda", "absolute", "CCLL", "off", "bf16"),
    ("lambda", "relative", "LLLL", "off", "bf16"),
    ("lambda", "relative", "CCCL", "on", "fp32"),
    ("lambda", "conv", "LLLL", "on", "bf16"),  # a 5-D embedding: channels_last crashed here on CUDA
    ("lambda", "conv", "CCLL", "off", "fp32"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matrix_config(synthetic_root: str, model: str, position: str, stages: str, channels_last: str, amp: str) -> dict:
    config = dict(user_input.defaults(), model=model, lambda_position=position, lambda_stages=stages,
                  channels_last=channels_last, amp=amp, dataset="synthetic", data_dir=synthetic_root,
                  synthetic_train_size=200, synthetic_test_size=100, batch_size=2, gpu_loader="on", device="cpu")
    user_input.validate(config)
    return config


@pytest.mark.parametrize("model, position, stages, channels_last, amp", MATRIX)
def test_one_training_step_of_every_cpu_setting(synthetic_root, model, position, stages, channels_last, amp):
    torch.manual_seed(0)
    config = matrix_config(synthetic_root, model, position, stages, channels_last, amp)
    training = prep.build_training(config, CPU)
    assert training.speed == speed.Speed(CPU, amp, channels_last == "on", "off", amp)
    parameters = list(training.model.parameters())
    before = [p.detach().clone() for p in parameters]
    loss, _, _, img_per_s = nntrain.train(training.step, training.train_loader, CPU, 0, max_batches=1,
                                          channels_last=training.speed.channels_last)
    assert torch.isfinite(torch.tensor(loss)) and img_per_s > 0
    assert all(state["step"] == 1 for state in training.optimizer.state.values())
    assert sum(not torch.equal(a, p) for a, p in zip(before, parameters)) > len(parameters) // 2
    layout = torch.channels_last if channels_last == "on" else torch.contiguous_format
    convolutions = {id(m.weight) for m in training.model.modules() if isinstance(m, nn.Conv2d)}
    assert all(p.is_contiguous(memory_format=layout) for p in parameters if id(p) in convolutions)
    as_built = [p.stride() for p in prep.build_model(config).parameters()]  # embeddings keep their layout
    assert [p.stride() for p in parameters if id(p) not in convolutions] == \
        [s for s, p in zip(as_built, parameters) if id(p) not in convolutions]
    assert all(p.dtype == torch.float32 for p in parameters)  # autocast casts activations, not weights


def test_channels_last_converts_the_convolution_weights_only():
    model = nn.Module()
    model.conv = nn.Conv2d(3, 4, 3)
    model.embedding = nn.Parameter(torch.randn(2, 3, 1, 5, 5))  # 5-D, as the lambda convolution's
    model.table = nn.Parameter(torch.randn(4, 3, 4, 1).permute(0, 2, 1, 3))  # 4-D, in a layout of its own
    strides = model.table.stride()
    model.conv.weight.grad = None
    speed.to_channels_last(model)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) and not model.conv.weight.is_contiguous()
    assert model.table.stride() == strides
    assert model.embedding.is_contiguous() and isinstance(model.embedding, nn.Parameter)
    assert dict(model.named_parameters())["conv.weight"] is model.conv.weight  # the same Parameter objects


@pytest.mark.parametrize("setting, device, amp, expected", [
    ("auto", "cuda", "bf16", "graph"), ("auto", "cuda", "fp32", "graph"),
    ("auto", "cuda", "fp16", "off"),  # the scaler's host bookkeeping does not replay: only on request
    ("auto", "cpu", "fp32", "off"), ("graph", "cpu", "fp32", "off"),  # no CUDA graph without CUDA
    ("graph", "cuda", "fp16", "graph"), ("reduce-overhead", "cuda", "bf16", "reduce-overhead"),
    ("default", "cpu", "fp32", "default"), ("off", "cuda", "bf16", "off"),
])
def test_compile_setting(setting, device, amp, expected):
    assert speed.resolve_compile(setting, torch.device(device), amp) == expected


@pytest.mark.parametrize("given, stored", [("true", "default"), ("false", "off"), ("max-autotune", "max-autotune")])
def test_compile_accepts_its_old_true_false(given, stored):
    assert user_input.parse_config(["--compile", given])["compile"] == stored


def test_compile_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        user_input.parse_config(["--compile", "fast"], prog="main_general.py")
    assert "COMPILE='fast' is not one of auto, off, graph, default, reduce-overhead, max-autotune" in capsys.readouterr().err


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_compiled_step_equals_the_eager_step():
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    results = []
    for mode in ("off", "default"):
        config = dict(user_input.defaults(), compile=mode, channels_last="on", amp="fp32")
        resolved = speed.resolve_speed(config, CPU)
        model = speed.speed_up(small_net(), config, resolved)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam's first step is sign-like: SGD shows the gradient
        step = prep.training_step(model, nn.CrossEntropyLoss(), optimizer, resolved, resolved.scaler())
        logits, loss = step(images, labels)
        results.append((logits, loss, [p.detach().clone() for p in model.parameters()]))
    (eager_logits, eager_loss, eager_weights), (logits, loss, weights) = results
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(weights, eager_weights):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(weights[0], small_net()[0].weight)  # the step was applied


def test_step_checks_stop_and_non_finite_losses():
    stop = threading.Event()
    checks = nntrain.StepChecks(CPU, epoch=2, total=5, stop=stop)
    checks.before(0)
    checks.loss(torch.tensor(1.0))  # finite: nothing happens
    stop.set()
    with pytest.raises(nntrain.TrainingInterrupted, match="^epoch 3, step 2 of 5$"):
        checks.before(1)
    with pytest.raises(nntrain.NonFiniteLossError, match=r"\(inf\) in epoch 3, step 2$"):
        checks.loss(torch.tensor(float("inf")))  # on the CPU: before the step is applied


def test_step_checks_on_an_accelerator_record_the_first_bad_step(monkeypatch):
    checks = nntrain.StepChecks(CPU, epoch=0, total=9, stop=None)
    checks.check_at_once = False  # as on CUDA: record on the device, raise at the next read
    monkeypatch.setattr(nntrain, "READ_EVERY_S", float("inf"))
    for index, value in enumerate([1.0, float("nan"), 2.0, float("inf")]):
        checks.before(index)
        checks.loss(torch.tensor(value))  # no raise: nothing is read per step
        assert not checks.read_due()
    assert int(checks.first_bad_step) == 2
    with pytest.raises(nntrain.NonFiniteLossError, match="in epoch 1, step 2 "):
        checks.finish()
    monkeypatch.setattr(nntrain, "READ_EVERY_S", 0.0)
    fine = nntrain.StepChecks(CPU, epoch=0, total=9, stop=None)
    fine.check_at_once = False
    fine.before(0)
    fine.loss(torch.tensor(1.0))
    assert fine.read_due()  # due, and nothing to raise


def test_a_graphed_runs_optimizer_state_restores_into_any_run():
    model = small_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    cuda_graph.make_capturable(optimizer, CPU)  # as a CUDA-graph run checkpoints it
    state = optimizer.state_dict()
    assert state["param_groups"][0]["capturable"] and isinstance(state["param_groups"][0]["lr"], torch.Tensor)
    fresh_model = small_net()
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=0.5)
    checkpoints.load_optimizer_state(fresh, state)
    group = fresh.param_groups[0]
    assert group["lr"] == pytest.approx(0.01) and type(group["lr"]) is float and group["capturable"] is False
    fresh_model(torch.randn(2, 3, 8, 8)).sum().backward()
    fresh.step()  # an eager CPU Adam steps with it
    assert all(s["step"] == 2 for s in fresh.state.values())
