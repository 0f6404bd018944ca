"""ResNet (depth 26, 50 or 101) whose bottleneck 3x3 convolutions (stages c2-c5) are lambda layers.

Only the spatial mixer of the bottleneck changes (see ``LambdaMixers``); everything else is
``resnet.py``. As in Bello 2021 and the CIFAR-10 reproduction, a stride-2 block runs its lambda
layer at the input resolution and then downsamples with a 3x3 average pool, stride 2, padding 1.

``stages`` picks the mixer per stage c2-c5: "L" lambda layers, "C" the baseline's 3x3 convs
("CCLL" and "CCCL" are the paper's hybrids). Global position embeddings ("absolute", "relative")
are shared by the lambda layers of a stage that work at the same resolution, so a stage has one
embedding before and one after its downsampling, as in the reproduction. The lambda convolution's
r x r kernels ("conv") fit any map size and belong to each layer, as in the paper's code.
"""
from __future__ import annotations

import re

import torch.nn as nn

from lambda_layer import LambdaLayer, make_position_embedding
from resnet import STAGE_WIDTHS, ResNet, conv3x3_mixer

# Largest absolute E (n * m * k * u entries) a model may hold: 2^22 floats are 16 MiB, plus as
# much again for its gradient and twice that for Adam. A 32x32 map (CIFAR stem, c2) needs 2^24.
MAX_ABSOLUTE_ENTRIES = 2 ** 22


def downsampled(size: tuple[int, int]) -> tuple[int, int]:
    """Map size after a 3x3, stride-2, padding-1 conv or pool."""
    return tuple((s - 1) // 2 + 1 for s in size)


def stage_input_sizes(image_size: tuple[int, int], stem: str) -> list[tuple[int, int]]:
    """Feature-map size entering each of the stages c2-c5."""
    size = tuple(image_size)
    if stem == "imagenet":  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
        size = downsampled(downsampled(size))
    sizes = [size]
    for _ in STAGE_WIDTHS[1:]:
        sizes.append(downsampled(sizes[-1]))
    return sizes


def lambda_map_sizes(image_size: tuple[int, int], stem: str, stages: str) -> list[tuple[int, int]]:
    """Map sizes the lambda layers run at: a stage's own size, and the previous one for its first block."""
    sizes = stage_input_sizes(image_size, stem)
    found = []
    for stage, letter in enumerate(stages):
        if letter == "L":
            found += [sizes[stage]] + ([sizes[stage - 1]] if stage > 0 else [])
    return found


def largest_absolute_embedding(image_size: tuple[int, int], stem: str, stages: str, dim_k: int,
                               dim_u: int = 1) -> int:
    """Entries n * m * k * u of the largest absolute E the model would hold (0: no lambda stage)."""
    return max([(h * w) ** 2 * dim_k * dim_u for h, w in lambda_map_sizes(image_size, stem, stages)], default=0)


class LambdaMixers:
    """Mixer factory for ``ResNet``: lambda layers (or 3x3 convs in "C" stages), embeddings shared
    per (stage, map size) for the global position modes."""

    def __init__(self, image_size: tuple[int, int], stem: str, heads: int, dim_k: int, *,
                 position: str = "absolute", r: int = 23, dim_u: int = 1, stages: str = "LLLL"):
        self.heads, self.dim_k, self.dim_u, self.position, self.stages = heads, dim_k, dim_u, position, stages
        self.r = r if position == "conv" else None
        self.sizes = stage_input_sizes(image_size, stem)
        self.embeddings: dict[tuple[int, tuple[int, int]], nn.Parameter] = {}

    def __call__(self, width: int, stride: int, stage: int, block: int) -> nn.Module:
        if self.stages[stage] == "C":
            return conv3x3_mixer(width, stride, stage, block)
        # the first block of c3-c5 still sees the previous stage's map size
        size = self.sizes[stage - 1] if stride == 2 else self.sizes[stage]
        layer = LambdaLayer(width, width, heads=self.heads, dim_k=self.dim_k, dim_u=self.dim_u, r=self.r,
                            size=size, position=self.position, embedding=self.shared_embedding(stage, size))
        if stride == 1:
            return layer
        return nn.Sequential(layer, nn.AvgPool2d(3, stride=2, padding=1))

    def shared_embedding(self, stage: int, size: tuple[int, int]) -> nn.Parameter | None:
        """The stage's E for this map size (global modes); None lets a "conv" layer make its own kernel."""
        if self.position == "conv":
            return None
        key = (stage, size)
        if key not in self.embeddings:
            self.embeddings[key] = make_position_embedding(size, self.dim_k, self.dim_u, self.position)
        return self.embeddings[key]


def lambda_resnet(num_classes: int = 10, stem: str = "imagenet", heads: int = 4, dim_k: int = 16,
                  image_size: int | tuple[int, int] = 32, zero_init_residual: bool = True, *,
                  position: str = "absolute", r: int = 23, dim_u: int = 1, stages: str = "LLLL",
                  depth: int = 50) -> ResNet:
    """ResNet (ResNet-50 unless `depth` says 26 or 101) with lambda layers in place of the bottleneck
    3x3 convs of the "L" stages of c2-c5. LambdaLayer refuses heads that do not divide a stage's
    width, an unknown position and an even r."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not re.fullmatch(r"[CL]{4}", stages):
        raise ValueError(f"stages={stages!r} must be 4 letters C (conv) or L (lambda) for c2-c5, e.g. 'CCLL'")
    entries = largest_absolute_embedding(image_size, stem, stages, dim_k, dim_u) if position == "absolute" else 0
    if entries > MAX_ABSOLUTE_ENTRIES:
        raise ValueError(f"absolute embeddings for {stem!r} stem maps need {entries:,} entries > "
                         f"{MAX_ABSOLUTE_ENTRIES:,}; use position='relative' or 'conv'")
    mixers = LambdaMixers(image_size, stem, heads, dim_k, position=position, r=r, dim_u=dim_u, stages=stages)
    return ResNet(num_classes, stem, zero_init_residual, mixer=mixers, depth=depth)


lambda_resnet50 = lambda_resnet  # the reproduction's model: depth 50 is the default
