"""Loss, learning-rate schedule, optimizer and device selection."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import model_preparation as prep
import speed
from label_smoothing import LabelSmoothingLoss
from user_input import defaults


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_cross_entropy(eps):
    torch.manual_seed(0)
    logits = torch.randn(16, 10) * 3
    labels = torch.randint(0, 10, (16,))
    torch.testing.assert_close(LabelSmoothingLoss(eps)(logits, labels),
                               F.cross_entropy(logits, labels, label_smoothing=eps))


def test_learning_rate_of_the_first_seven_epochs():
    config = defaults()  # LR 5e-4, 5 warm-up epochs, 90 epochs
    model = torch.nn.Linear(2, 2)
    optimizer = prep.build_optimizer(model, config)
    scheduler = prep.build_scheduler(optimizer, config)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = 2.5e-3
    expected = [5e-4, 1e-3, 1.5e-3, 2e-3, 2.5e-3,
                peak * 0.5 * (1 + math.cos(math.pi * 1 / 86)), peak * 0.5 * (1 + math.cos(math.pi * 2 / 86))]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_cosine_reaches_zero_only_after_the_last_epoch():
    factors = [prep.lr_factor(epoch, 5, 90) for epoch in range(90)]
    assert all(b < a for a, b in zip(factors[4:], factors[5:]))  # decreasing after warm-up
    assert factors[-1] > 0  # the last epoch still learns
    assert prep.lr_factor(90, 5, 90) == pytest.approx(0.0, abs=1e-12)


def test_adam_settings():
    optimizer = prep.build_optimizer(torch.nn.Linear(2, 2), defaults())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert group["betas"] == (0.9, 0.9999) and group["weight_decay"] == 1e-4 and group["lr"] == 5e-4


def test_build_model_follows_the_config():
    config = dict(defaults(), model="baseline")
    assert prep.count_parameters(prep.build_model(config)) == 23_528_522
    config = dict(defaults(), model="lambda")
    assert prep.count_parameters(prep.build_model(config)) == 12_971_450


def test_device_selection():
    assert speed.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert speed.select_device("auto").type == expected


def test_resume_compares_only_the_settings_that_shape_the_network():
    lambda_config = dict(defaults(), model="lambda", lambda_position="absolute")
    assert checkpoints.model_differences(lambda_config, dict(lambda_config, lambda_r=7)) == []  # r: conv only
    assert checkpoints.model_differences(lambda_config, dict(lambda_config, heads=8)) == ["HEADS=4 (now 8)"]
    conv = dict(lambda_config, lambda_position="conv", lambda_r=23)
    assert checkpoints.model_differences(conv, dict(conv, lambda_r=7)) == ["LAMBDA_R=23 (now 7)"]
    baseline = dict(defaults(), model="baseline")
    assert checkpoints.model_differences(baseline, dict(baseline, heads=8, lambda_position="conv")) == []
    assert checkpoints.model_differences(baseline, dict(baseline, stem="cifar")) == ["STEM='imagenet' (now 'cifar')"]
    assert checkpoints.model_differences(baseline, lambda_config) == ["MODEL='baseline' (now 'lambda')"]
