"""ResNet-50 whose bottleneck 3x3 convolutions (stages c2-c5) are lambda layers.

Only the spatial mixer of the bottleneck changes (see ``lambda_mixer``); everything else is
``resnet.py``. As in Bello 2021 and the CIFAR-10 reproduction, a stride-2 block runs its lambda
layer at the input resolution and then downsamples with a 3x3 average pool, stride 2, padding 1.
The position embeddings are shared by the lambda layers of a stage that work at the same
resolution, so a stage has one embedding before and one after its downsampling.
"""
from __future__ import annotations

import torch.nn as nn

from lambda_layer import LambdaLayer, make_position_embedding
from resnet import STAGE_BLOCKS, ResNet


def downsampled(size: tuple[int, int]) -> tuple[int, int]:
    """Map size after a 3x3, stride-2, padding-1 conv or pool."""
    return tuple((s - 1) // 2 + 1 for s in size)


def stage_input_sizes(image_size: tuple[int, int], stem: str) -> list[tuple[int, int]]:
    """Feature-map size entering each of the stages c2-c5."""
    size = tuple(image_size)
    if stem == "imagenet":  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
        size = downsampled(downsampled(size))
    sizes = [size]
    for _ in STAGE_BLOCKS[1:]:
        sizes.append(downsampled(sizes[-1]))
    return sizes


class LambdaMixers:
    """Mixer factory for ``ResNet``: lambda layers sharing one embedding per (stage, map size)."""

    def __init__(self, image_size: tuple[int, int], stem: str, heads: int, dim_k: int):
        self.heads, self.dim_k = heads, dim_k
        self.sizes = stage_input_sizes(image_size, stem)
        self.embeddings: dict[tuple[int, tuple[int, int]], nn.Parameter] = {}

    def __call__(self, width: int, stride: int, stage: int, block: int) -> nn.Module:
        # the first block of c3-c5 still sees the previous stage's map size
        size = self.sizes[stage - 1] if stride == 2 else self.sizes[stage]
        key = (stage, size)
        if key not in self.embeddings:
            self.embeddings[key] = make_position_embedding(size, self.dim_k)
        layer = LambdaLayer(width, width, heads=self.heads, dim_k=self.dim_k, size=size,
                            embedding=self.embeddings[key])
        if stride == 1:
            return layer
        return nn.Sequential(layer, nn.AvgPool2d(3, stride=2, padding=1))


def lambda_resnet50(num_classes: int = 10, stem: str = "imagenet", heads: int = 4, dim_k: int = 16,
                    image_size: int | tuple[int, int] = 32, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 with lambda layers in place of every bottleneck 3x3 conv (c2-c5)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    for width in (64, 128, 256, 512):
        if width % heads:
            raise ValueError(f"heads={heads} must divide every lambda layer's width (64, 128, 256, 512)")
    mixers = LambdaMixers(image_size, stem, heads, dim_k)
    return ResNet(num_classes, stem, zero_init_residual, mixer=mixers)
