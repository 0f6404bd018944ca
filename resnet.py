"""Bottleneck ResNets v1.5 of depth 26, 50 and 101 (He et al. 2016; stride on the 3x3 conv as in torchvision).

The module names and parameter shapes are torchvision's, so a ``torchvision.models.resnet50`` or
``resnet101`` state_dict loads into ``resnet(50)`` or ``resnet(101)``. Depth 26 has two
bottlenecks per stage (as in timm's resnet26 and Bello 2021's smallest LambdaResNet). The bottleneck's spatial mixer (``conv2``) is built by a
factory, which is how ``resnet_lambda.py`` swaps the 3x3 convolutions for lambda layers.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

# mixer(width, stride, stage, block) -> module mapping [B, width, H, W] to [B, width, H/stride, W/stride]
MixerFactory = Callable[[int, int, int, int], nn.Module]

DEPTH_BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottlenecks in stages c2-c5
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x wider
STEMS = ("imagenet", "cifar")


def conv3x3_mixer(width: int, stride: int, stage: int, block: int) -> nn.Module:
    """The baseline's spatial mixer: a 3x3 convolution (stride on the 3x3, ResNet v1.5)."""
    return nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial mixer (3x3 conv or lambda layer) -> 1x1 expand, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, width: int, stride: int, mixer: nn.Module):
        super().__init__()
        planes = width * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = mixer
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet with a choice of depth, of stem and of the bottlenecks' spatial mixer.

    Args:
        num_classes: size of the classifier.
        depth: 26, 50 or 101; the stages c2-c5 hold DEPTH_BLOCKS[depth] bottlenecks (3 layers each,
            plus the stem and the classifier: 3 x 8 + 2 = 26, 3 x 16 + 2 = 50, 3 x 33 + 2 = 101).
        stem: "imagenet" (7x7 stride-2 conv + 3x3 max-pool: a 32x32 image gives 8x8 maps in c2)
            or "cifar" (3x3 stride-1 conv, no max-pool: 32x32 maps in c2).
        zero_init_residual: start every bottleneck's last BatchNorm gamma at zero.
        mixer: factory of the spatial mixer of each bottleneck.
    """

    def __init__(self, num_classes: int = 10, stem: str = "imagenet", zero_init_residual: bool = True,
                 mixer: MixerFactory = conv3x3_mixer, depth: int = 50):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if depth not in DEPTH_BLOCKS:
            raise ValueError(f"depth must be one of {tuple(DEPTH_BLOCKS)}, got {depth!r}")
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for stage, (blocks, width) in enumerate(zip(DEPTH_BLOCKS[depth], STAGE_WIDTHS)):
            layers = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(Bottleneck(inplanes, width, stride, mixer(width, stride, stage, block)))
                inplanes = width * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation; a mixer other than a plain conv keeps its own (the paper's)
        blocks = [m for m in self.modules() if isinstance(m, Bottleneck)]
        own_init = {m for b in blocks if not isinstance(b.conv2, nn.Conv2d) for m in b.conv2.modules()}
        for module in self.modules():
            if module in own_init:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for block in blocks:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int = 50, num_classes: int = 10, stem: str = "imagenet", zero_init_residual: bool = True) -> ResNet:
    """ResNet v1.5 of this depth: the baseline (ResNet-50, the reproduction's: 23,528,522 parameters with 10 classes)."""
    return ResNet(num_classes, stem, zero_init_residual, depth=depth)


def resnet50(num_classes: int = 10, stem: str = "imagenet", zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 v1.5, the reproduction's baseline."""
    return resnet(50, num_classes, stem, zero_init_residual)
