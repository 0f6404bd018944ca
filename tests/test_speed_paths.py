"""Speed paths on the CPU: the device-resident loader's augmentation, AMP settings and plumbing,
gradient-scaler state in checkpoints, compiled models' plain checkpoint keys, channels_last."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

import checkpoints
import data_preprocessing
import distributed
import nntrain
import speed
import user_input
from conftest import SMOKE_FLAGS, refused_settings, run_main

CPU = torch.device("cpu")


def coordinate_image() -> torch.Tensor:
    """uint8 [3, 32, 32]: channel 0 holds x + 1, channel 1 holds y + 1 (0 only in the padding)."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([x + 1, y + 1, torch.full_like(x, 7)]).to(torch.uint8)


def decode(crop: torch.Tensor) -> tuple[int, int, bool]:
    """(offset_y, offset_x, flipped) of a crop of coordinate_image() padded by 4.

    Row 16 and column 16 of a crop are inside the image for every offset in 0..8.
    """
    flipped = bool(crop[0, 16, 17] < crop[0, 16, 16])
    offset_y = int(crop[1, 16, 16]) - 13
    offset_x = int(crop[0, 16, 16]) - (12 if flipped else 13)
    return offset_y, offset_x, flipped


def reference_crop(image: torch.Tensor, offset_y: int, offset_x: int, flipped: bool) -> torch.Tensor:
    """torchvision's functional pad + crop + flip at the given offsets."""
    crop = TF.crop(TF.pad(image, [4]), offset_y, offset_x, 32, 32)
    return TF.hflip(crop) if flipped else crop


def test_device_crop_flip_has_torchvisions_distribution():
    count = 3600
    images = coordinate_image().expand(count, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    crops = data_preprocessing.random_crop_flip(images, generator)
    assert crops.shape == (count, 3, 32, 32) and crops.dtype == torch.uint8
    decoded = [decode(crop) for crop in crops]
    for crop, (offset_y, offset_x, flipped) in zip(crops[:200], decoded):
        assert torch.equal(crop, reference_crop(coordinate_image(), offset_y, offset_x, flipped))
    offsets_y, offsets_x, flips = (np.array(column) for column in zip(*decoded))
    for offsets in (offsets_y, offsets_x):  # uniform over 0..8: 400 expected each, sd 19
        assert set(offsets.tolist()) == set(range(9))
        assert np.all(np.abs(np.bincount(offsets) - count / 9) < 100)
    assert abs(flips.mean() - 0.5) < 0.04  # sd 0.008
    assert abs(np.corrcoef(offsets_y, offsets_x)[0, 1]) < 0.08  # drawn independently

    # the torchvision path, decoded the same way, draws from the same offsets and flip rate
    augment = transforms.Compose(data_preprocessing.train_transform().transforms[:2])
    pil = Image.fromarray(coordinate_image().permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    torchvision_decoded = [decode(torch.from_numpy(np.array(augment(pil))).permute(2, 0, 1)) for _ in range(900)]
    ys, xs, tv_flips = zip(*torchvision_decoded)
    assert set(ys) == set(xs) == set(range(9))
    assert abs(np.mean(tv_flips) - 0.5) < 0.06


def fake_cifar(count: int) -> types.SimpleNamespace:
    """A CIFAR10-like set whose images carry their label (value 20 * label + 5) and index (channel 2)."""
    labels = np.arange(count) % 10
    data = np.empty((count, 32, 32, 3), np.uint8)
    data[..., 0] = data[..., 1] = (20 * labels + 5)[:, None, None]
    data[..., 2] = np.arange(count)[:, None, None]
    return types.SimpleNamespace(data=data, targets=labels.tolist())


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """uint8-scale values of normalised images."""
    return (data_preprocessing.denormalize(images) * 255).round()


def test_device_loader_keeps_labels_and_repeats_with_the_seed():
    dataset = fake_cifar(100)
    loader = data_preprocessing.DeviceLoader(dataset, 16, CPU, train=True)
    assert len(loader) == 6 and loader.drop_last  # 100 // 16, the partial batch dropped

    def epoch(seed: int) -> list:
        loader.generator.manual_seed(seed)
        return list(loader)

    batches = epoch(3)
    seen = []
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
        centre = unnormalize(images)[:, :, 16, 16]  # inside the image for every crop offset
        assert torch.equal(centre[:, 0], (20 * labels + 5).float())  # label matches the image
        seen += centre[:, 2].long().tolist()
    assert len(set(seen)) == 96  # a permutation: no image twice in an epoch
    again = epoch(3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = epoch(4)
    assert not torch.equal(batches[0][0], other[0][0])


def test_build_loaders_device_loader_matches_the_torchvision_test_transform(synthetic_root):
    config = dict(user_input.defaults(), dataset="synthetic", data_dir=synthetic_root, synthetic_train_size=200,
                  synthetic_test_size=100, batch_size=32, gpu_loader="on")
    train_loader, test_loader, generator, _ = data_preprocessing.build_loaders(config, CPU)
    assert isinstance(train_loader, data_preprocessing.DeviceLoader) and train_loader.generator is generator
    assert len(test_loader) == 4  # 100 images, the last batch of 4 kept
    images, labels = next(iter(test_loader))
    reference = torch.stack([test_loader.dataset[i][0] for i in range(32)])
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=0)
    assert labels.tolist() == test_loader.dataset.targets[:32]
    first = []
    for _ in range(2):  # main_general seeds every epoch through this generator: same seed, same batch
        data_preprocessing.seed_epoch(generator, config["seed"], 0)
        first.append(next(iter(train_loader)))
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    off = data_preprocessing.build_loaders(dict(config, gpu_loader="auto"), CPU)[0]
    assert isinstance(off, torch.utils.data.DataLoader)  # auto: the device loader only on CUDA


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(capability, expected, monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert speed.resolve_amp("auto", cuda) == expected
    major, minor = capability
    said = speed.describe_amp("auto", expected, cuda)
    if expected == "fp16":  # T4, Turing laptop GPUs: fp16 and its gradient scaler
        assert said == f"amp fp16 with a gradient scaler (auto: compute capability {major}.{minor} has no native bf16)"
    else:
        assert said == f"amp bf16 (auto: compute capability {major}.{minor} has native bf16)"
    assert speed.describe_amp("fp32", "fp32", cuda) == "amp fp32"  # chosen by hand: no reason to give


def test_amp_settings():
    assert speed.resolve_amp("auto", CPU) == "fp32"
    assert speed.describe_amp("auto", "fp32", CPU) == "amp fp32"
    assert speed.resolve_amp("bf16", CPU) == "bf16"
    with pytest.raises(user_input.ConfigError, match="AMP=fp16 needs CUDA"):
        speed.resolve_amp("fp16", CPU)
    assert not speed.Speed(CPU, "bf16", channels_last=False, compile="off").scaler().is_enabled()


@pytest.mark.parametrize("argv, expected", [
    (["--amp", "half"], "AMP='half' is not one of auto, bf16, fp16, fp32"),
    (["--gpu-loader", "yes"], "GPU_LOADER='yes'"),
    (["--channels-last", "1"], "CHANNELS_LAST='1'"),
    (["--num-threads", "-1"], "NUM_THREADS=-1 must be >= 0"),
])
def test_bad_speed_settings_exit_2(argv, expected, capsys):
    assert expected in refused_settings(argv, capsys)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_bf16_autocast_reaches_the_model_and_stays_finite():
    model = tiny_model()
    dtypes = []
    model[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    batches = [(torch.randn(4, 3, 8, 8), torch.arange(4))] * 2
    optimizer = torch.optim.Adam(model.parameters())
    bf16 = speed.Speed(CPU, "bf16", channels_last=True, compile="off")
    step = nntrain.EagerStep(model, nn.CrossEntropyLoss(), optimizer, bf16.autocast(), bf16.scaler())
    loss, *_ = nntrain.train(step, batches, CPU, 0, channels_last=bf16.channels_last)
    assert dtypes == [torch.bfloat16] * 2 and np.isfinite(loss)
    assert model[0].weight.dtype == torch.float32  # autocast casts activations, not the weights


def test_channels_last_only_where_asked():
    config = dict(user_input.defaults(), channels_last="auto")
    assert speed.speed_up(tiny_model(), config, speed.resolve_speed(config, CPU))[0].weight.is_contiguous()  # auto: CUDA only
    config["channels_last"] = "on"
    model = speed.speed_up(tiny_model(), config, speed.resolve_speed(config, CPU))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()


def checkpoint_of(model: nn.Module, scaler) -> dict:
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return checkpoints.checkpoint_state(model, optimizer, scheduler, 1, {"acc": 0.0, "epoch": 0}, {}, scaler)


def test_compiled_model_checkpoints_plain_keys():
    plain = tiny_model()
    compiled = torch.compile(plain)  # lazy: nothing is compiled until the first forward
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    assert distributed.unwrap(compiled) is plain and distributed.unwrap(plain) is plain
    state = checkpoint_of(compiled, None)
    assert list(state["model"]) == list(plain.state_dict())
    fresh = torch.compile(tiny_model())
    with torch.no_grad():
        distributed.unwrap(fresh)[0].weight.zero_()
    optimizer = torch.optim.Adam(fresh.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    state["rng"] = checkpoints.rng_states()
    checkpoints.restore(state, fresh, optimizer, scheduler)
    assert torch.equal(distributed.unwrap(fresh)[0].weight, plain[0].weight)


def test_scaler_state_is_checkpointed_and_restored():
    model = tiny_model()
    saved = checkpoint_of(model, torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert saved["scaler"]["scale"] == 1024.0
    assert checkpoint_of(model, speed.Speed(CPU, "fp32", channels_last=False, compile="off").scaler())["scaler"] == {}
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    checkpoints.restore(saved, model, optimizer, scheduler, scaler)
    assert scaler.get_scale() == 1024.0
    saved["scaler"] = {}  # a bf16 run resumed as fp16 keeps the new scaler's initial scale
    checkpoints.restore(saved, model, optimizer, scheduler, scaler)
    assert scaler.get_scale() == 1024.0


def test_smoke_run_with_every_cpu_speed_path(tmp_path):
    result = run_main([*SMOKE_FLAGS, "--model", "baseline", "--epochs", "1", "--gpu-loader", "on", "--amp", "bf16",
                       "--channels-last", "on", "--num-threads", "1", "--run-name", "fast"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "runs" / "Baseline" / "fast" / "log.txt") as f:
        log = f.read()
    assert "speed: amp bf16, channels_last True, device loader True, compile off, 1 CPU threads" in log
    with open(tmp_path / "runs" / "Baseline" / "fast" / "metrics.jsonl") as f:
        metrics = json.loads(f.readline())
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["test_loss"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "Baseline" / "fast" / "last.pt", weights_only=False)
    assert "scaler" in checkpoint and not any(key.startswith("_orig_mod") for key in checkpoint["model"])
    assert os.path.isfile(tmp_path / "checkpoints" / "Baseline" / "fast" / "best.pt")
