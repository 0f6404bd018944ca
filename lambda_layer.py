"""Lambda layer for [B, C, H, W] feature maps.

Bello, "LambdaNetworks: Modeling long-range interactions without attention", ICLR 2021,
arXiv 2102.08602.

Implemented: the multi-query lambda layer with a global context (every position of the map is
context for every query, C = X), softmax-normalised keys, batch-normalised queries and values, no
biases, intra-depth u, and one position embedding per (query, context) pair, E of shape
(n, m, k, u) for a fixed feature-map size -- the "absolute" embeddings the CIFAR-10 reproduction
used. Embeddings may be shared between layers (pass ``embedding=``).

Not implemented yet (the constructor refuses them): relative position embeddings and local
contexts computed as a lambda convolution (``r``).

Cost per layer for batch b (paper, Table 2): time Theta(b n m k v), memory Theta(k n m + b n k v).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def make_position_embedding(size: tuple[int, int], dim_k: int, dim_u: int = 1) -> nn.Parameter:
    """E in R^{n x m x k x u} for an H x W map, E ~ N(0, 1) as in the paper."""
    n = size[0] * size[1]
    return nn.Parameter(torch.randn(n, n, dim_k, dim_u))


class LambdaLayer(nn.Module):
    """Multi-query lambda layer with a global context (Bello 2021, Sec. 3 and 4).

    Every position n of the input produces ``heads`` queries of size k; keys (size k) and values
    (size v) of intra-depth u are computed from the context positions m, here all H*W positions.
    The heads share the same lambdas, and each head outputs v = dim_out / heads channels, so the
    output has heads * v = dim_out channels.

    Args:
        dim: input channels d.
        dim_out: output channels (default ``dim``); must be divisible by ``heads``.
        heads: number of queries h per position.
        dim_k: query / key size k.
        dim_u: intra-depth u.
        r: local context size (lambda convolution); not implemented yet.
        size: (H, W) of the feature map, required for the absolute position embeddings.
        embedding: an existing E of shape (H*W, H*W, k, u) to share with other layers.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, heads: int = 4, dim_k: int = 16,
                 dim_u: int = 1, r: int | None = None, size: tuple[int, int] | int | None = None,
                 embedding: nn.Parameter | None = None):
        super().__init__()
        dim_out = dim_out or dim
        assert dim_out % heads == 0, f"dim_out={dim_out} must be divisible by heads={heads}"
        if r is not None:
            raise NotImplementedError("local contexts (r) are not implemented yet")
        if size is None:
            raise ValueError("size=(H, W) is required for the global position embeddings")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.dim, self.heads, self.dim_k, self.dim_u = dim, heads, dim_k, dim_u
        self.dim_v = dim_out // heads

        self.to_q = nn.Conv2d(dim, dim_k * heads, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim_k * dim_u, 1, bias=False)
        self.to_v = nn.Conv2d(dim, self.dim_v * dim_u, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(dim_k * heads)
        self.norm_v = nn.BatchNorm2d(self.dim_v * dim_u)

        n = self.size[0] * self.size[1]
        if embedding is None:
            embedding = make_position_embedding(self.size, dim_k, dim_u)
        assert embedding.shape == (n, n, dim_k, dim_u), (
            f"embedding shape {tuple(embedding.shape)} != (n, m, k, u) = {(n, n, dim_k, dim_u)}")
        self.embedding = embedding
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Bello 2021, Appendix: queries N(0, (d k)^-1/2), keys and values N(0, d^-1/2)
        nn.init.normal_(self.to_q.weight, std=(self.dim * self.dim_k) ** -0.5)
        nn.init.normal_(self.to_k.weight, std=self.dim ** -0.5)
        nn.init.normal_(self.to_v.weight, std=self.dim ** -0.5)
        # E ~ N(0, 1) is drawn in make_position_embedding: a shared E is initialised once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        assert (height, width) == self.size, (
            f"input map {height}x{width} != the {self.size[0]}x{self.size[1]} map the embeddings were made for")
        n = height * width
        # Flatten H, W into positions; channels stay a separate axis (never reshape [B, C, H, W] to [B, n, C]).
        queries = self.norm_q(self.to_q(x)).reshape(b, self.heads, self.dim_k, n)  # b, h, k, n
        keys = self.to_k(x).reshape(b, self.dim_u, self.dim_k, n).softmax(dim=-1)  # b, u, k, m
        values = self.norm_v(self.to_v(x)).reshape(b, self.dim_u, self.dim_v, n)   # b, u, v, m

        content_lambda = torch.einsum("bukm,buvm->bkv", keys, values)                # b, k, v
        position_lambdas = torch.einsum("nmku,buvm->bnkv", self.embedding, values)   # b, n, k, v
        content_output = torch.einsum("bhkn,bkv->bhvn", queries, content_lambda)     # b, h, v, n
        position_output = torch.einsum("bhkn,bnkv->bhvn", queries, position_lambdas)  # b, h, v, n
        out = content_output + position_output
        return out.reshape(b, self.heads * self.dim_v, height, width)  # b, h*v, H, W
