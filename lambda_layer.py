"""Lambda layer for [B, C, H, W] feature maps.

Bello, "LambdaNetworks: Modeling long-range interactions without attention", ICLR 2021,
arXiv 2102.08602.

Implemented: the multi-query lambda layer with softmax-normalised keys, batch-normalised queries
and values, no biases, intra-depth u, and three ways to compute the position lambdas
lambda_p[n] = sum_m E[n, m]^T V[m] (the content lambda is the same in all of them):

- ``"absolute"``: global context, one embedding per (query, context) pair, E of shape
  (n, m, k, u) for a fixed H x W map: the CIFAR-10 reproduction's layer.
- ``"relative"``: global context, E[n, m] = R[m - n] read from a table R of shape
  (2H-1, 2W-1, k, u) indexed by the offset of the context position from the query: translation
  equivariant. The (n, m) -> table-row index is a non-persistent buffer.
- ``"conv"``: local context of r x r positions, the lambda convolution: a 3D convolution of the
  values over (H, W) with an r x r kernel per key dimension, kernel shape (k, u, 1, r, r),
  zero padding (0, r // 2, r // 2). Works for any H x W; no (n, m, k) tensor exists.

Embeddings may be shared between layers (pass ``embedding=``). Not implemented: a context other
than the input map itself (C = X in every mode).

Cost per layer, batch b, n = m = H*W positions, h heads, v = dim_out / h (paper, Table 2):

========== ====================== ============================== ===================================
position   parameters of E        time (position lambdas)        memory (activations + E)
========== ====================== ============================== ===================================
absolute   n m k u                Theta(b n m k u v) [1]         Theta(n m k u + b n k v) [1]
relative   (2H-1)(2W-1) k u       Theta(b n m k u v) [1]         Theta(n m k u + b n k v) [1]
conv       r^2 k u                Theta(b n r^2 k u v)           Theta(b n k v), independent of r
========== ====================== ============================== ===================================

plus, in every mode, the projections Theta(b n d (hk + ku + vu)), the content lambda
Theta(b m k u v) and applying the lambdas to the queries Theta(b h n k v). "relative" gathers its
(n, m, k, u) E from the table in each forward pass (the paper's Theta(k n m) memory); "conv"
could equally run a global relative context (r = 2 max(H, W) - 1, tested), at about 4x the time.

[1] Einsum order for the global modes (``queries_first``). Lambdas first: lambda_p = E^T V costs
Theta(b n m k u v) and keeps Theta(b n k v); then q^T lambda_p costs Theta(b h n k v). Queries
first: q^T E costs Theta(b h n m k u) and keeps a Theta(b h n m u) map, then that map times V
costs Theta(b h n m u v). Queries first is taken when it does fewer multiply-adds,
h (k + v) < k v, and its map is no larger than the lambdas, h m u <= k v. With the defaults
(h 4, k 16, u 1) that holds on the ImageNet stem's 8x8 maps of a 32x32 image (c2: v 16, m 64:
128 < 256 and 256 <= 256); on 32x32 maps (CIFAR stem, c2) the map would be 16x the lambdas, so
lambdas first is kept there: the memory advantage the paper claims for lambda layers.

Mixed precision: the 1x1 projections follow autocast; the key softmax and every lambda
contraction run in float32 (autocast disabled inside the layer; float64 stays float64) and the
output is cast back to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("absolute", "relative", "conv")


def make_position_embedding(size: tuple[int, int] | None, dim_k: int, dim_u: int = 1,
                            position: str = "absolute", r: int | None = None) -> nn.Parameter:
    """E ~ N(0, 1) as in the paper: (n, m, k, u), (2H-1, 2W-1, k, u) or conv kernel (k, u, 1, r, r)."""
    if position == "conv":
        return nn.Parameter(torch.randn(dim_k, dim_u, 1, r, r))
    height, width = size
    if position == "relative":
        return nn.Parameter(torch.randn(2 * height - 1, 2 * width - 1, dim_k, dim_u))
    n = height * width
    return nn.Parameter(torch.randn(n, n, dim_k, dim_u))


def relative_index(size: tuple[int, int]) -> torch.Tensor:
    """[n, m] row of the flattened (2H-1)(2W-1) table holding offset m - n (context minus query)."""
    height, width = size
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # n
    offset_rows = rows[None, :] - rows[:, None] + height - 1  # n, m: m_y - n_y + H - 1
    offset_cols = cols[None, :] - cols[:, None] + width - 1   # n, m: m_x - n_x + W - 1
    return offset_rows * (2 * width - 1) + offset_cols  # n, m


def reachable_kernel(kernel: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """The centre of an r x r lambda-convolution kernel that an H x W map can reach, and its padding.

    With zero padding r // 2, a kernel tap at an offset of H or more rows (W or more columns) from
    the query only ever meets padding; cutting those taps away gives the same output with less work
    (a 23 x 23 kernel on an 8 x 8 map runs as 15 x 15).
    """
    centre = kernel.shape[-1] // 2  # kernel: k, u, 1, r, r
    pad_y, pad_x = min(centre, height - 1), min(centre, width - 1)
    kernel = kernel[..., centre - pad_y:centre + pad_y + 1, centre - pad_x:centre + pad_x + 1]  # k, u, 1, <=r, <=r
    return kernel, pad_y, pad_x


def queries_first(heads: int, dim_k: int, dim_u: int, dim_v: int, context: int) -> bool:
    """Contract queries with E before the values: fewer multiply-adds and no larger intermediate."""
    return heads * (dim_k + dim_v) < dim_k * dim_v and heads * context * dim_u <= dim_k * dim_v


def global_position_output(queries: torch.Tensor, embedding: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_k q[b, h, k, n] sum_{m, u} E[n, m, k, u] V[b, u, v, m], in the cheaper order (module docstring)."""
    _, heads, dim_k, _ = queries.shape  # b, h, k, n
    _, dim_u, dim_v, context = values.shape  # b, u, v, m
    if queries_first(heads, dim_k, dim_u, dim_v, context):
        scores = torch.einsum("bhkn,nmku->bhnmu", queries, embedding)  # b, h, n, m, u
        return torch.einsum("bhnmu,buvm->bhvn", scores, values)       # b, h, v, n
    position_lambdas = torch.einsum("nmku,buvm->bnkv", embedding, values)  # b, n, k, v
    return torch.einsum("bhkn,bnkv->bhvn", queries, position_lambdas)     # b, h, v, n


class LambdaLayer(nn.Module):
    """Multi-query lambda layer (Bello 2021, Sec. 3 and 4).

    Every position n of the input produces ``heads`` queries of size k; keys (size k) and values
    (size v) of intra-depth u are computed from the context positions m. The heads share the same
    lambdas, and each head outputs v = dim_out / heads channels, so the output has
    heads * v = dim_out channels. The context is the whole map ("absolute", "relative") or the
    r x r positions around each query ("conv").

    Args:
        dim: input channels d.
        dim_out: output channels (default ``dim``); must be divisible by ``heads``.
        heads: number of queries h per position.
        dim_k: query / key size k.
        dim_u: intra-depth u.
        r: local context size of the lambda convolution (odd); only with ``position="conv"``.
        size: (H, W) of the feature map; required by "absolute" and "relative", unused by "conv".
        position: "absolute", "relative" or "conv" (module docstring).
        embedding: an existing E of this mode's shape to share with other layers.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, heads: int = 4, dim_k: int = 16,
                 dim_u: int = 1, r: int | None = None, size: tuple[int, int] | int | None = None,
                 position: str = "absolute", embedding: nn.Parameter | None = None):
        super().__init__()
        dim_out = dim_out or dim
        assert dim_out % heads == 0, f"dim_out={dim_out} must be divisible by heads={heads}"
        self.position = position
        self.size = self._checked_size(position, r, size)
        self.r = r
        self.dim, self.heads, self.dim_k, self.dim_u = dim, heads, dim_k, dim_u
        self.dim_v = dim_out // heads

        self.to_q = nn.Conv2d(dim, dim_k * heads, 1, bias=False)
        self.to_k = nn.Conv2d(dim, dim_k * dim_u, 1, bias=False)
        self.to_v = nn.Conv2d(dim, self.dim_v * dim_u, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(dim_k * heads)
        self.norm_v = nn.BatchNorm2d(self.dim_v * dim_u)

        if embedding is None:
            embedding = make_position_embedding(self.size, dim_k, dim_u, position, r)
        expected = self._embedding_shape()
        assert tuple(embedding.shape) == expected, (
            f"{position} embedding shape {tuple(embedding.shape)} != {expected}")
        self.embedding = embedding
        if position == "relative":
            self.register_buffer("relative_index", relative_index(self.size), persistent=False)
        self.reset_parameters()

    @staticmethod
    def _checked_size(position: str, r: int | None, size) -> tuple[int, int] | None:
        """(H, W) for the global modes, None for "conv"; refuses arguments that do not fit the mode."""
        if position not in POSITIONS:
            raise ValueError(f"position={position!r} is not one of {', '.join(POSITIONS)}")
        if position == "conv":
            if r is None or r < 1 or r % 2 == 0:
                raise ValueError(f"position='conv' needs an odd local context size r >= 1, got r={r}")
            return None
        if r is not None:
            raise ValueError(f"r={r} is the local context of position='conv'; {position!r} has a global context")
        if size is None:
            raise ValueError(f"size=(H, W) is required for the {position} position embeddings")
        return (size, size) if isinstance(size, int) else tuple(size)

    def _embedding_shape(self) -> tuple[int, ...]:
        k, u = self.dim_k, self.dim_u
        if self.position == "conv":
            return (k, u, 1, self.r, self.r)
        height, width = self.size
        if self.position == "relative":
            return (2 * height - 1, 2 * width - 1, k, u)
        return (height * width, height * width, k, u)

    def reset_parameters(self) -> None:
        # Bello 2021, Appendix: queries N(0, (d k)^-1/2), keys and values N(0, d^-1/2)
        nn.init.normal_(self.to_q.weight, std=(self.dim * self.dim_k) ** -0.5)
        nn.init.normal_(self.to_k.weight, std=self.dim ** -0.5)
        nn.init.normal_(self.to_v.weight, std=self.dim ** -0.5)
        # E ~ N(0, 1) is drawn in make_position_embedding: a shared E is initialised once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        assert self.size is None or (height, width) == self.size, (
            f"input map {height}x{width} != the {self.size[0]}x{self.size[1]} map the {self.position} "
            f"embeddings were made for")
        n = height * width
        # Flatten H, W into positions; channels stay a separate axis (never reshape [B, C, H, W] to [B, n, C]).
        queries = self.norm_q(self.to_q(x)).reshape(b, self.heads, self.dim_k, n)  # b, h, k, n
        keys = self.to_k(x).reshape(b, self.dim_u, self.dim_k, n)                  # b, u, k, m
        values = self.norm_v(self.to_v(x)).reshape(b, self.dim_u, self.dim_v, n)   # b, u, v, m
        # fp16/bf16 would round the softmax and the sums over m; float64 stays float64
        dtype = torch.promote_types(queries.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
            keys = keys.softmax(dim=-1)
            content_lambda = torch.einsum("bukm,buvm->bkv", keys, values)             # b, k, v
            content_output = torch.einsum("bhkn,bkv->bhvn", queries, content_lambda)  # b, h, v, n
            out = content_output + self._position_output(queries, values, height, width)  # b, h, v, n
        return out.reshape(b, self.heads * self.dim_v, height, width).to(x.dtype)  # b, h*v, H, W

    def _position_output(self, queries: torch.Tensor, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
        embedding = self.embedding.to(values.dtype)
        if self.position == "conv":
            b, u, v, n = values.shape
            volume = values.reshape(b, u, v, height, width)  # b, u (channels), v (depth), H, W
            kernel, pad_y, pad_x = reachable_kernel(embedding, height, width)
            position_lambdas = F.conv3d(volume, kernel, padding=(0, pad_y, pad_x))  # b, k, v, H, W
            position_lambdas = position_lambdas.reshape(b, self.dim_k, v, n)          # b, k, v, n
            return torch.einsum("bhkn,bkvn->bhvn", queries, position_lambdas)        # b, h, v, n
        if self.position == "relative":
            table = embedding.reshape(-1, self.dim_k, self.dim_u)  # (2H-1)(2W-1), k, u
            embedding = table[self.relative_index]                  # n, m, k, u
        return global_position_output(queries, embedding, values)
